"""Connection settings: a broker setting is one URL or a cluster's node URLs separated by commas;
Redis Sentinel addresses are host:port pairs."""

from __future__ import annotations

import pytest

from common import broker_urls
from common.requests.registry import CellsCreate
from common.settings import ServiceSettings, load, sentinel_addresses
from services.registry.model import cell_amqp_url, stack_parameters
from testing.cells import new_cell_id

CLUSTER = "amqp://svc:pw@node1:5672/vh,amqp://svc:pw@node2:5673/vh, amqp://svc:pw@node3/vh"


def test_a_cluster_setting_is_split_in_order() -> None:
    assert broker_urls.split(CLUSTER) == [
        "amqp://svc:pw@node1:5672/vh", "amqp://svc:pw@node2:5673/vh", "amqp://svc:pw@node3/vh",
    ]  # fmt: skip
    assert broker_urls.user(CLUSTER) == "svc"
    assert broker_urls.vhost(CLUSTER) == "vh"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "no broker URL"),
        (" , ", "no broker URL"),
        ("http://node1/", "is not an amqp:// or amqps:// URL"),
        ("amqp://u:secret@node1/,amqps://u:secret@node2/", "mixes amqp:// and amqps://"),
        ("amqp:///vh", "is not an amqp:// or amqps:// URL with a host"),
    ],
)
def test_a_bad_setting_names_the_problem(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        broker_urls.split(value)
    assert "secret" not in str(caught.value)


def test_every_password_is_redacted() -> None:
    assert broker_urls.redact(CLUSTER).count("***") == 3
    assert "pw" not in broker_urls.redact(CLUSTER)


def test_a_cell_gets_every_node_with_its_own_credentials() -> None:
    cell = new_cell_id()
    url = cell_amqp_url(CLUSTER, cell, "p@ss/word")
    nodes = broker_urls.split(url)
    assert len(nodes) == 3
    assert all(n.startswith(f"amqp://{cell}:p%40ss%2Fword@node") for n in nodes)
    assert [n.rsplit("@", 1)[1] for n in nodes] == ["node1:5672/vh", "node2:5673/vh", "node3/vh"]
    assert broker_urls.user(url) == cell
    rotated = broker_urls.with_password(url, "new")
    assert all(f"{cell}:new@" in n for n in broker_urls.split(rotated))


def test_the_cell_stack_reaches_the_first_node() -> None:
    cell = CellsCreate(id=new_cell_id(), stage="dedicated", region="eu-west-1", org="acme")
    params = stack_parameters(cell, cell_amqp_url(CLUSTER, cell.id, "pw"), "svc")
    assert params["ControlPlaneEndpoint"] == "node1:5672"
    assert params["ControlPlaneVhost"] == "vh"
    assert params["AgentPassword"] == "pw"


def test_sentinels_are_host_port_pairs() -> None:
    assert sentinel_addresses("10.0.0.1:26379, sentinel-b:26380") == [
        ("10.0.0.1", 26379), ("sentinel-b", 26380),
    ]  # fmt: skip
    for bad in ("10.0.0.1", "host:port", ":26379"):
        with pytest.raises(ValueError, match="is not host:port"):
            sentinel_addresses(bad)


def test_with_sentinels_answers_wait_for_one_replica_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SUBSTRATE_AMQP_URL", "amqp://u:p@node1/")
    monkeypatch.setenv("SUBSTRATE_REDIS_URL", "redis://127.0.0.1:6379/3")
    assert load(ServiceSettings).wait_replicas == 0
    monkeypatch.setenv("SUBSTRATE_REDIS_SENTINELS", "127.0.0.1:26379")
    assert load(ServiceSettings).wait_replicas == 1
    monkeypatch.setenv("SUBSTRATE_REDIS_WAIT_REPLICAS", "0")
    assert load(ServiceSettings).wait_replicas == 0
