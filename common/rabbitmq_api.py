"""A small client for the RabbitMQ management HTTP API: vhosts, users, permissions, limits and
connections. The registry uses it to give each cell its own broker user; tests use it to get a
vhost of their own and to force-close connections.

Plain urllib run in a thread: a handful of calls per cell lifecycle does not justify another
HTTP dependency.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit


class ManagementApiError(Exception):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"management API {method} {path}: HTTP {status} {body[:200]}")
        self.status = status


def _q(value: str) -> str:
    return quote(value, safe="")


class RabbitApi:
    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        user = unquote(parts.username or "guest")
        password = unquote(parts.password or "guest")
        host = parts.hostname or "127.0.0.1"
        netloc = f"{host}:{parts.port}" if parts.port else host
        self._base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"
        self._timeout = timeout

    def _call_sync(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self._base}/api{path}",
            data=data,
            method=method,
            headers={
                "Authorization": self._auth,
                "Content-Type": "application/json",
                **(headers or {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            raise ManagementApiError(method, path, exc.code, body) from None
        return json.loads(raw) if raw else None

    async def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        return await asyncio.to_thread(self._call_sync, method, path, body, headers)

    # -- vhosts ---------------------------------------------------------------------------------

    async def create_vhost(self, vhost: str) -> None:
        await self.call("PUT", f"/vhosts/{_q(vhost)}", {})

    async def delete_vhost(self, vhost: str) -> None:
        await self.call("DELETE", f"/vhosts/{_q(vhost)}")

    # -- users ----------------------------------------------------------------------------------

    async def put_user(self, user: str, password: str, tags: str = "") -> None:
        await self.call("PUT", f"/users/{_q(user)}", {"password": password, "tags": tags})

    async def user_exists(self, user: str) -> bool:
        try:
            await self.call("GET", f"/users/{_q(user)}")
        except ManagementApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def delete_user(self, user: str) -> None:
        """Delete a user; the broker closes its open connections. Absent is fine."""
        try:
            await self.call("DELETE", f"/users/{_q(user)}")
        except ManagementApiError as exc:
            if exc.status != 404:
                raise

    async def set_permissions(
        self, vhost: str, user: str, *, configure: str, write: str, read: str
    ) -> None:
        await self.call(
            "PUT",
            f"/permissions/{_q(vhost)}/{_q(user)}",
            {"configure": configure, "write": write, "read": read},
        )

    async def set_topic_permissions(
        self, vhost: str, user: str, *, exchange: str, write: str, read: str
    ) -> None:
        await self.call(
            "PUT",
            f"/topic-permissions/{_q(vhost)}/{_q(user)}",
            {"exchange": exchange, "write": write, "read": read},
        )

    async def put_policy(
        self, vhost: str, name: str, pattern: str, definition: dict[str, str | int]
    ) -> None:
        body = {"pattern": pattern, "definition": definition, "apply-to": "queues", "priority": 0}
        await self.call("PUT", f"/policies/{_q(vhost)}/{_q(name)}", body)

    async def set_user_limit(self, user: str, name: str, value: int) -> None:
        await self.call("PUT", f"/user-limits/{_q(user)}/{_q(name)}", {"value": value})

    # -- connections ----------------------------------------------------------------------------

    async def connections(self, *, user: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self.call("GET", "/connections")
        if user is not None:
            found = [c for c in found if c.get("user") == user]
        return found

    async def close_user_connections(self, user: str, reason: str) -> int:
        """Force-close every connection of ``user``; how many there were. From the broker's
        connection tracking, so a connection opened a moment ago is closed too (``connections``
        lists only what the statistics, emitted every few seconds, have seen)."""
        path = f"/connections/username/{_q(user)}"
        found: list[dict[str, Any]] = await self.call("GET", path)
        if found:
            await self.call("DELETE", path, headers={"X-Reason": reason})
        return len(found)

    async def close_connection(self, name: str, reason: str = "closed by substrate") -> None:
        """Force-close a connection; the client sees ``reason``. Already gone is fine."""
        try:
            await self.call("DELETE", f"/connections/{_q(name)}", headers={"X-Reason": reason})
        except ManagementApiError as exc:
            if exc.status != 404:
                raise
