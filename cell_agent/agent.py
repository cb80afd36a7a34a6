"""The agent's main loop: connect out, register, heartbeat, sync, and handle commands.

The agent only ever opens connections; its one listening socket is the metrics/health port on
loopback. Reconnects are the bus's job (robust connection); after each one the agent registers
again and asks for its desired state, so whatever it missed while away is re-sent.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import timedelta
from importlib.metadata import version
from typing import TypeVar

from prometheus_client import Counter, Gauge

from cell_agent.appliers import Applier, CommandApplier, LocalApplier
from cell_agent.aws import CellAws
from cell_agent.debug_access import DebugAccess
from cell_agent.deferral import DeferralFile
from cell_agent.flags import LocalFlags
from cell_agent.infra import RequirementFile
from cell_agent.journal import Journal
from cell_agent.maintenance import MaintenanceGate
from cell_agent.ofrep import FlagRoutes
from cell_agent.pending import (
    Pending,
    PendingDebugAccess,
    PendingDeferral,
    PendingMaintenance,
    PendingReports,
    PendingUpgrade,
    deferral_fields,
)
from cell_agent.settings import AgentSettings
from cell_agent.state import StateStore
from cell_agent.status import write_link
from cell_agent.upgrade import EcrVerifier, ImageVerifier, Upgrader
from common import broker_urls, sealing
from common.bus.errors import BusError, QueueMissing
from common.bus.rabbit_bus import RabbitBus
from common.clock import Clock, SystemClock
from common.deferrals import DeferralDecided
from common.health import Verdict
from common.messages import (
    CellDebugAccess,
    CellHeartbeat,
    CellMaintenance,
    CellRegister,
    CellReport,
    CellSync,
    CellUpgrade,
    Delivery,
    DesiredState,
    FlagsBroadcast,
    FlagsSnapshot,
    InfraRequired,
    RotateCredentials,
    SealedRotateCredentials,
    command_queue,
)
from common.metrics import MetricsServer
from common.routes import route
from common.vocabulary import SyncReason, UpgradePhase

log = logging.getLogger(__name__)

AGENT_VERSION = version("substrate")

CONNECTED = Gauge("cell_agent_connected", "1 while the agent is connected to the control plane")
LAST_HEARTBEAT = Gauge(
    "cell_agent_last_heartbeat_timestamp_seconds", "When the last heartbeat was confirmed"
)
T = TypeVar("T")
REPORTS = Counter(
    "cell_agent_reports", "Reports published, by kind and outcome", ["kind", "outcome"]
)
FLAGS_VERSION = Gauge("cell_agent_flags_snapshot_version", "The flags snapshot the agent holds")


def _tls(settings: AgentSettings) -> ssl.SSLContext | None:
    """For an amqps:// URL: verify the broker (certificate chain and host name) against
    CELL_CA_FILE, or the system's CAs."""
    if not broker_urls.is_tls(settings.amqp_url):
        return None
    cafile = str(settings.ca_file) if settings.ca_file else None
    return ssl.create_default_context(cafile=cafile)


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        state: StateStore,
        aws: CellAws,
        *,
        clock: Clock | None = None,
        applier: Applier | None = None,
        verifier: ImageVerifier | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.aws = aws
        self.clock = clock or SystemClock()
        self.journal = Journal(settings.state_dir)
        self.gate = MaintenanceGate(
            settings.state_dir, self.clock, timedelta(minutes=settings.maintenance_minutes)
        )
        self.upgrader = Upgrader(
            self.journal,
            applier=applier or _applier(settings),
            verifier=verifier or EcrVerifier(settings.aws_region),
            gate=self.gate,
            clock=self.clock,
            report=self.report_upgrade,
            report_maintenance=self.report_maintenance,
            progress_after=settings.progress_report_seconds,
        )
        self.flags = LocalFlags(settings.state_dir, self.own_attributes)
        self.requirement = RequirementFile(settings.state_dir)
        self.pending = PendingReports(settings.state_dir)
        self.debug = DebugAccess(settings.aws_region)
        FLAGS_VERSION.set_function(lambda: self.flags.version)
        self.bus: RabbitBus | None = None
        self.account_id: str | None = None
        self.template_version: str | None = None
        self._registered = asyncio.Event()
        self._sending = asyncio.Lock()
        self._failing = False
        self._background: set[asyncio.Task[bool]] = set()
        CONNECTED.set_function(
            lambda: 1.0 if self.bus is not None and self.bus.is_connected else 0.0
        )

    # -- reports --------------------------------------------------------------------------------

    async def _send(self, report: CellReport) -> bool:
        """Publish a report; a failure is logged and counted, and the next tick tries again."""
        if self.bus is None:
            return False
        try:
            await self.bus.publish(report)
        except BusError as exc:
            REPORTS.labels(report.kind, "failed").inc()
            # Once per outage at WARNING; the robust connection logs its own retries.
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "could not send %s: %s", report.kind, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("sending reports again")
            self._failing = False
        REPORTS.labels(report.kind, "sent").inc()
        return True

    @property
    def installed(self) -> tuple[str | None, int | None]:
        """The installed release and the generation that installed it."""
        applied = self.journal.applied
        release = applied.release.version if applied.release else None
        return release, (applied.generation if applied.generation >= 0 else None)

    def own_attributes(self) -> dict[str, str | None]:
        """What the agent knows of itself better than the control plane's copy."""
        return {
            "id": self.settings.id,
            "installed_release": self.installed[0],
            "agent_version": AGENT_VERSION,
        }

    @property
    def flags_version(self) -> int | None:
        return self.flags.version or None

    async def on_flags_broadcast(self, msg: FlagsBroadcast, delivery: Delivery) -> None:
        """A snapshot for every cell. Without attributes of its own yet (a new cell whose first
        sync has not been answered), the agent asks for its own snapshot instead."""
        if not self.flags.has_attributes:
            if msg.version > self.flags.version:
                await self.sync("flags")
            return
        await self.on_flags_snapshot(msg, delivery)

    async def on_flags_snapshot(
        self, msg: FlagsSnapshot | FlagsBroadcast, delivery: Delivery
    ) -> None:
        if self.flags.apply(msg):
            # Tell the control plane at once which snapshot this cell holds.
            confirm = asyncio.get_running_loop().create_task(self.heartbeat())
            self._background.add(confirm)
            confirm.add_done_callback(self._background.discard)

    async def report_upgrade(
        self,
        generation: int,
        version: str | None,
        phase: UpgradePhase,
        error: str | None,
        *,
        verdict: Verdict | None = None,
        check: str | None = None,
    ) -> bool:
        """Kept in the outbox, then sent if the broker is there: True once it is kept (it goes
        out, in order, when the link returns)."""
        self.pending.add(
            PendingUpgrade(
                generation=generation,
                release_version=version,
                phase=phase,
                error=error,
                verdict=verdict,
                check=check,
                installed_release=self.installed[0],
            )
        )
        await self.send_pending()
        return True

    async def report_maintenance(self, enabled: bool, reason: str) -> bool:
        until = self.gate.state.enabled_until if enabled else None
        self.pending.add(PendingMaintenance(enabled=enabled, enabled_until=until, reason=reason))
        await self.send_pending()
        return True

    def _numbered(self, report: Pending) -> CellReport:
        """The wire report for a kept one, numbered now: sequence numbers follow sending order."""
        fields = report.model_dump(exclude={"kind"})
        head = {
            "cell_id": self.settings.id,
            "seq": self.state.next_seq(),
            "sent_at": self.clock.now(),
        }
        if isinstance(report, PendingUpgrade):
            return CellUpgrade(**head, **fields)
        if isinstance(report, PendingMaintenance):
            return CellMaintenance(**head, **fields)
        if isinstance(report, PendingDeferral):
            return CellSync(**head, reason="defer", **deferral_fields(report))
        return CellDebugAccess(**head, **fields)

    async def send_pending(self) -> bool:
        """The outbox's reports in the order they were made; one that cannot be sent now stops
        the rest until the next try (the heartbeat tick, a reconnect, the next report). One
        sender at a time, so the order holds. True if the outbox is empty after."""
        async with self._sending:
            for path, report in self.pending.waiting():
                if not await self._send(self._numbered(report)):
                    return False
                self.pending.sent(path)
        return True

    async def expire_debug_access(self) -> None:
        """Delete debug access past its time (also after a restart) and report it."""
        try:
            gone = await asyncio.to_thread(self.debug.expire)
        except Exception as exc:
            log.warning("could not check debug access for expiry (%r); next time", exc)
            return
        for grant in gone:
            log.info("debug access %s expired and was deleted", grant.role_arn)
            self.pending.add(
                PendingDebugAccess(
                    action="expired",
                    role_arn=grant.role_arn,
                    occurred_at=self.clock.now(),
                    expires_at=grant.expires_at,
                    reason=grant.reason,
                    granted_by=grant.granted_by,
                )
            )
        if gone:
            await self.send_pending()

    async def check_template(self) -> None:
        """Read the stack's TemplateVersion again: the customer may have applied an update."""
        if not self.settings.stack_name:
            return
        try:
            version = await self.aws.template_version(self.settings.stack_name)
        except Exception as exc:
            log.warning("could not read the stack's template version (%r)", exc)
            return
        if version != self.template_version:
            log.info("stack template version %s -> %s", self.template_version, version)
            self.template_version = version
            await self.heartbeat()

    async def register(self, queue_missing: bool | None = False) -> bool:
        """``queue_missing``: True, the agent found its command queue missing (the registry
        declares it again); False, the agent looks itself, so the registry need not; None,
        the agent could not look, so the registry does."""
        assert self.account_id is not None
        state = self.state.state
        sent = await self._send(
            CellRegister(
                cell_id=self.settings.id,
                seq=self.state.next_seq(),
                sent_at=self.clock.now(),
                agent_version=AGENT_VERSION,
                aws_account_id=self.account_id,
                region=self.settings.aws_region,
                stack_name=self.settings.stack_name,
                template_version=self.template_version,
                installed_release=self.installed[0],
                incarnation=state.incarnation,
                rotation_key=self.state.public_key(),
                queue_missing=queue_missing,
            )
        )
        if sent:
            self._registered.set()
        return sent

    async def heartbeat(self) -> bool:
        sent = await self._send(
            CellHeartbeat(
                cell_id=self.settings.id,
                seq=self.state.next_seq(),
                sent_at=self.clock.now(),
                agent_version=AGENT_VERSION,
                installed_release=self.installed[0],
                applied_generation=self.installed[1],
                maintenance=self.gate.is_on(),
                template_version=self.template_version,
                flags_snapshot_version=self.flags_version,
                credential_id=self.state.credential_id(self.settings.amqp_url),
            )
        )
        if sent:
            LAST_HEARTBEAT.set(self.clock.now().timestamp())
        # For `cell-agent state`, which reads the state directory alone.
        write_link(self.settings.state_dir, connected=sent, at=self.clock.now())
        return sent

    async def sync(self, reason: SyncReason) -> bool:
        return await self._send(
            CellSync(
                cell_id=self.settings.id,
                seq=self.state.next_seq(),
                sent_at=self.clock.now(),
                reason=reason,
                applied_generation=self.installed[1],
                flags_snapshot_version=self.flags_version,
            )
        )

    # -- commands -------------------------------------------------------------------------------

    async def on_sealed_rotate_credentials(
        self, msg: SealedRotateCredentials, delivery: Delivery
    ) -> None:
        """A new password sealed to this agent's key. One that does not open (sealed to a key
        an earlier state directory held) is dropped: the operator delivers the URL by hand."""
        if self.state.credential_id(self.settings.amqp_url) == msg.credential_id:
            return
        try:
            password = self.state.unseal(msg.sealed_password, msg.sealing_context())
        except sealing.SealingError:
            log.error(
                "rotated credentials %s were sealed to another key than this agent's (%s): "
                "ask the operator for the new URL (cells rotate-credentials --rebind)",
                msg.credential_id,
                sealing.fingerprint(self.state.public_key()),
            )
            return
        await self._take_password(msg.credential_id, password)

    async def on_rotate_credentials(self, msg: RotateCredentials, delivery: Delivery) -> None:
        if self.state.credential_id(self.settings.amqp_url) == msg.credential_id:
            return
        await self._take_password(msg.credential_id, msg.password)

    async def _take_password(self, credential_id: str, password: str) -> None:
        """Take the new password on the open connection, keep it on disk, then confirm it in a
        heartbeat. Idempotent: a redelivered rotation that is already in force is a no-op."""
        env_url = self.settings.amqp_url
        assert self.bus is not None
        await self.bus.update_secret(password)
        current = self.state.broker_url(env_url)
        new_url = broker_urls.with_password(current, password)
        self.state.rotate(env_url, new_url, credential_id)
        log.info("credentials rotated to %s", credential_id)
        # Confirm after this handler returns (and the command is acked).
        confirm = asyncio.get_running_loop().create_task(self.heartbeat())
        self._background.add(confirm)
        confirm.add_done_callback(self._background.discard)

    # -- loops ----------------------------------------------------------------------------------

    async def _every(self, seconds: float, tick: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
            if stop.is_set():
                return
            if tick == "heartbeat":
                if not self._registered.is_set():
                    await self.register()
                # Kept reports before the heartbeat: they happened before what it tells.
                await self.send_pending()
                await self.heartbeat()
            elif tick == "debug":
                await self.expire_debug_access()
            else:
                await self.check_template()
                await self.sync("periodic")

    async def _after_reconnect(self) -> None:
        # The queue may have gone while the agent was away; the registry declares it again
        # only on the agent's word (and checks that word).
        await self.register(queue_missing=await self._queue_missing())
        # The last outcome again: a report the control plane missed (lost with its state, or
        # refused while it was away) is what it converges on; one it has changes nothing.
        await self.upgrader.report_again()
        await self.send_pending()
        await self.sync("reconnect")
        # Kept reports went out above; the upgrader looks again for work the outage held up.
        self.upgrader.wake()

    async def run(self, stop: asyncio.Event) -> None:
        self.account_id = await _retry("reading the AWS account (STS)", self.aws.account_id, stop)
        if self.settings.stack_name:
            stack = self.settings.stack_name
            self.template_version = await _retry(
                f"reading stack {stack}", lambda: self.aws.template_version(stack), stop
            )
        server = MetricsServer(self._health, "127.0.0.1", self.settings.metrics_port)
        server.route("/maintenance", self.gate.route_maintenance)
        server.route("/gate", self.gate.route_gate)
        answers = FlagRoutes(self.flags)
        server.route("/flags", answers.flags_route)
        server.add_routes(answers.ofrep())
        await server.start()
        url = self.state.broker_url(self.settings.amqp_url)
        connecting = asyncio.create_task(
            RabbitBus.connect(
                url,
                name=f"cell-agent:{self.settings.id}",
                publish_timeout=self.settings.publish_timeout_seconds,
                namespace="cell_agent",
                max_backoff=30,
                # A broker whose certificate does not verify is never spoken to: the connection
                # attempt fails (and is logged with the reason) like an unreachable broker.
                ssl_context=_tls(self.settings),
            )
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            connecting.cancel()
            await server.stop()
            return
        stopping.cancel()
        self.bus = bus = connecting.result()
        if broker_urls.user(url) != self.settings.id:
            log.warning(
                "broker user %s is not the cell id %s", broker_urls.user(url), self.settings.id
            )
        bus.on_reconnect(self._after_reconnect)
        # Registering first, then looking for the command queue: where it is missing (deleted
        # by someone), the agent registers again saying so and the registry declares it.
        await self.register()
        await self._wait_for_queue(bus, stop)
        await bus.consume(
            command_queue(self.settings.id),
            [
                route(SealedRotateCredentials, self.on_sealed_rotate_credentials),
                route(RotateCredentials, self.on_rotate_credentials),
                route(DesiredState, self.upgrader.on_desired_state),
                route(FlagsSnapshot, self.on_flags_snapshot),
                route(FlagsBroadcast, self.on_flags_broadcast),
                route(InfraRequired, self.requirement.on_required),
                route(DeferralDecided, DeferralFile(self.settings.state_dir).on_decided),
            ],
            # A cell may not publish to the dead-letter exchange: a command it cannot take is
            # rejected into the queue's own (cell.commands.dead). Its queue is classic, which
            # does not count deliveries: the bus counts this consumer's failures itself.
            reject_to_dead=True,
        )
        await self.upgrader.report_again()
        await self.send_pending()
        await self.sync("start")
        await self.heartbeat()
        await self.expire_debug_access()
        loops = [
            asyncio.create_task(self._every(self.settings.heartbeat_seconds, "heartbeat", stop)),
            asyncio.create_task(self._every(self.settings.sync_seconds, "sync", stop)),
            asyncio.create_task(self._every(self.settings.debug_check_seconds, "debug", stop)),
            asyncio.create_task(self.upgrader.run(stop)),
            asyncio.create_task(self.upgrader.judge(stop)),
        ]
        log.info("cell agent %s running", self.settings.id)
        await stop.wait()
        await asyncio.gather(*loops, return_exceptions=True)
        await bus.close(drain_timeout=30)
        await server.stop()
        log.info("cell agent %s stopped", self.settings.id)

    async def _wait_for_queue(self, bus: RabbitBus, stop: asyncio.Event) -> None:
        queue, delay = command_queue(self.settings.id), 0.5
        while not stop.is_set():
            try:
                await bus.queue_state(queue)
                return
            except QueueMissing:
                log.warning(
                    "command queue %s is missing; registering again for the registry to "
                    "declare it (retry in %.1fs)",
                    queue,
                    delay,
                )
                await self.register(queue_missing=True)
            except BusError as exc:
                log.warning("cannot check command queue %s (%s); retry in %.0fs", queue, exc, delay)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 30)

    async def _queue_missing(self) -> bool | None:
        """Whether the broker says the command queue is missing; None where it cannot say."""
        assert self.bus is not None
        try:
            return not await self.bus.queue_exists(command_queue(self.settings.id))
        except BusError as exc:
            log.warning("cannot check the command queue (%s)", exc)
            return None

    def _health(self) -> dict[str, object]:
        connected = self.bus is not None and self.bus.is_connected
        return {"ok": connected, "cell_id": self.settings.id, "connected": connected}


def _applier(settings: AgentSettings) -> Applier:
    if settings.applier == "command":
        assert settings.apply_command is not None
        return CommandApplier(settings.apply_command)
    return LocalApplier(settings.state_dir)


async def _retry(what: str, call: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T:
    delay = 1.0
    while True:
        try:
            return await call()
        except Exception as exc:
            if stop.is_set():
                raise
            log.warning("%s failed (%r); retrying in %.0fs", what, exc, delay)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 30)
