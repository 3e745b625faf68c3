"""The Consul provider against a faithful fake of Consul's HTTP API, driven
by the real py-consul client: a real daemon, real DNS queries, blocking
queries with their spurious wake-ups, index resets, 5xx and outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import dns.rcode
import pytest
from structlog.testing import capture_logs

from resolverd.config import ProviderConfig, load_config, parse_config
from resolverd.model import Health, Instance
from resolverd.providers.consul import (
    ConsulProvider,
    RateLimit,
    go_duration,
    health_from_checks,
    instance_from_entry,
    next_index,
    unique_ids,
    version_from_tags,
)
from resolverd.table import ProviderState, ServiceTable, health_status
from tests.conftest import EXAMPLES, DaemonThread
from tests.fake_consul import FakeConsul, FakeConsulThread, parse_go_duration
from tests.test_dns import addresses, ask, srv_targets

T = TypeVar("T")
# py-consul 1.8 builds its aiohttp connector with the deprecated ssl_context
# and verify_ssl arguments; that is its business, not a failure of ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(ssl_context|verify_ssl) is deprecated:DeprecationWarning"
)
Start = Callable[[dict[str, Any]], DaemonThread]
D = "resolverd.internal."


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def agent() -> Iterator[FakeConsulThread]:
    runner = FakeConsulThread(FakeConsul())
    runner.start()
    yield runner
    runner.close()


def consul_config(port: int, **options: Any) -> dict[str, Any]:
    consul = {"host": "127.0.0.1", "port": port, "wait": "2s", "reconnect_max": "300ms"}
    return {"service_discovery": {"provider": "consul", "consul": {**consul, **options}}}


def eventually(check: Callable[[], T], *, timeout: float = 5.0) -> T:
    """Poll `check` until it stops raising AssertionError (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def state(d: DaemonThread) -> ProviderState:
    return d.call(lambda: d.daemon.table.states()["consul"])


def snapshot(d: DaemonThread) -> dict[str, Instance]:
    return d.call(lambda: {i.id: i for i in d.daemon.table.snapshots().get("consul", ())})


def srv(d: DaemonThread, service: str) -> list[tuple[int, str]]:
    return sorted(
        (port, target) for _, port, target in srv_targets(ask(d, f"{service}.{D}", "SRV"))
    )


def a(d: DaemonThread, service: str) -> list[str]:
    return sorted(addresses(ask(d, f"{service}.{D}", "A")))


def target(instance_id: str, service: str) -> str:
    return f"{instance_id}.{service}.instance.{D}"


def synced(d: DaemonThread) -> ProviderState:
    s = state(d)
    assert s.synced and not s.stale, s
    return s


def stale(d: DaemonThread) -> ProviderState:
    s = state(d)
    assert s.stale, s
    return s


# -- pure policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "returned", "following"),
    [
        (0, 42, 42),  # a full read: block from what it returned
        (42, 42, 42),  # woken without a change
        (42, 50, 50),
        (42, 7, 0),  # went backwards: reset, a full read next
        (0, 0, 1),  # index 0 would never block: wait on 1
        (1, 0, 1),  # still 0: keep waiting on 1, no reset loop
        (5, -3, 1),
        (0, -3, 1),
    ],
)
def test_next_index_follows_consuls_client_rules(
    previous: int, returned: int, following: int
) -> None:
    assert next_index(previous, returned) == following


@pytest.mark.parametrize(
    ("seconds", "text"), [(300.0, "300s"), (2.0, "2s"), (0.5, "500ms"), (1.25, "1250ms")]
)
def test_wait_is_a_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
    assert parse_go_duration(text) == seconds


def test_fake_parses_go_durations() -> None:
    assert parse_go_duration("1m30s") == 90.0
    assert parse_go_duration("100ms") == pytest.approx(0.1)
    with pytest.raises(ValueError):
        parse_go_duration("300")


@pytest.mark.parametrize(
    ("statuses", "health"),
    [
        ([], Health.HEALTHY),
        (["passing", "passing"], Health.HEALTHY),
        (["passing", "warning"], Health.UNHEALTHY),
        (["warning", "critical"], Health.CRITICAL),
        (["passing", "maintenance"], Health.CRITICAL),
    ],
)
def test_health_from_checks(statuses: list[str], health: Health) -> None:
    assert health_from_checks([{"Status": s} for s in statuses]) is health


def test_version_from_tags() -> None:
    assert version_from_tags(["prod", "version=2.1.0"]) == "2.1.0"
    assert version_from_tags(["version=a=b"]) == "a=b"
    assert version_from_tags(["version="]) == "1.0.0"
    assert version_from_tags([]) == "1.0.0"


def entry(**service: Any) -> dict[str, Any]:
    svc = {"ID": "web-1", "Service": "web", "Tags": [], "Address": "", "Port": 80, "Meta": None}
    return {
        "Node": {"Node": "n1", "Address": "127.0.0.9"},
        "Service": {**svc, **service},
        "Checks": [{"Status": "passing", "ServiceID": ""}],
    }


def test_instance_from_entry() -> None:
    node, inst = instance_from_entry(
        entry(Service="Web", Tags=["version=3.0.0", ""], Meta={"zone": "a"}), provider="c", now=1.0
    )
    assert node == "n1"
    assert (inst.id, inst.name, inst.address, inst.port) == ("web-1", "web", "127.0.0.9", 80)
    assert (inst.version, inst.tags, dict(inst.metadata)) == (
        "3.0.0",
        ("version=3.0.0",),
        {"zone": "a"},
    )
    assert (inst.provider, inst.last_heartbeat, inst.health) == ("c", 1.0, Health.HEALTHY)
    assert instance_from_entry(entry(Address="127.0.0.3"), provider="c", now=1.0)[1].address == (
        "127.0.0.3"
    )
    bad_entries: list[object] = [
        entry(Port=0),
        entry(Service="my_service"),
        entry(ID=None),
        {"Node": {}},
        [],
    ]
    for bad in bad_entries:
        with pytest.raises(ValueError):
            instance_from_entry(bad, provider="c", now=1.0)


def test_unique_ids_qualifies_ids_shared_by_nodes() -> None:
    def inst(i: str) -> Instance:
        return Instance(id=i, name="web", address="127.0.0.1", port=80)

    ids = [i.id for i in unique_ids([("n1", inst("web")), ("n2", inst("web")), ("n1", inst("x"))])]
    assert ids == ["web@n1", "web@n2", "x"]


def test_rate_limit_is_a_token_bucket_with_a_burst() -> None:
    now = [0.0]
    limit = RateLimit(interval=0.1, burst=2, clock=lambda: now[0])
    assert [limit.delay(), limit.delay()] == [0.0, 0.0]  # the burst goes at once
    assert limit.delay() == pytest.approx(0.1)  # then one per interval
    assert limit.delay() == pytest.approx(0.2)
    now[0] = 10.0  # quiet for a while: the burst is back, not more
    assert [limit.delay(), limit.delay()] == [0.0, 0.0]
    assert limit.delay() == pytest.approx(0.1)


# -- the provider on its own loop ----------------------------------------------------------------


def provider_config(port: int, **options: Any) -> ProviderConfig:
    return parse_config(consul_config(port, **options), file="test.yaml").providers[0]


async def test_cancel_ends_a_blocking_query_at_once() -> None:
    fake = FakeConsul()
    await fake.start()
    try:
        fake.register("web", port=8080)
        table = ServiceTable(order=["consul"])
        task = asyncio.create_task(ConsulProvider(provider_config(fake.port, wait="5m")).run(table))
        async with asyncio.timeout(5):
            # Synced, and both watchers are parked in a blocking query.
            while not (table.states()["consul"].synced and fake.request_count() >= 4):
                await asyncio.sleep(0.01)
        task.cancel()
        async with asyncio.timeout(2):
            await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
    finally:
        await fake.stop()


# -- end to end: daemon, fake Consul, DNS --------------------------------------------------------


def test_initial_sync_publishes_only_a_complete_table(
    agent: FakeConsulThread, start_daemon: Start
) -> None:
    fake = agent.fake
    fake.register("web", id="web-1", port=8001, address="127.0.1.1")
    fake.register("web", id="web-2", port=8002, address="127.0.1.2")
    fake.register("db", id="db-1", port=5432, address="127.0.1.3")
    fake.delays["health:db"] = 0.4  # one service answers late
    d = start_daemon(consul_config(agent.port))

    def first_sync() -> set[str]:
        s, services = d.call(
            lambda: (d.daemon.table.states()["consul"], set(d.daemon.table.view.services))
        )
        assert s.synced
        return services

    # At the first moment the provider counts as synced, every service is there.
    assert eventually(first_sync) == {"web", "db"}
    assert srv(d, "web") == [(8001, target("web-1", "web")), (8002, target("web-2", "web"))]
    assert a(d, "db") == ["127.0.1.3"]
    assert not state(d).stale


def test_add_change_remove_reach_dns(agent: FakeConsulThread, start_daemon: Start) -> None:
    fake = agent.fake
    fake.register("web", id="web-1", port=8001, address="127.0.1.1")
    d = start_daemon(consul_config(agent.port))
    eventually(lambda: synced(d))
    assert srv(d, "web") == [(8001, target("web-1", "web"))]

    fake.register("web", id="web-2", port=8002, address="127.0.1.2")
    eventually(lambda: assert_eq(a(d, "web"), ["127.0.1.1", "127.0.1.2"]))

    fake.update("web-1", port=9001)
    fake.update("web-2", address="127.0.1.22")
    eventually(
        lambda: assert_eq(
            srv(d, "web"), [(8002, target("web-2", "web")), (9001, target("web-1", "web"))]
        )
    )
    assert a(d, "web") == ["127.0.1.1", "127.0.1.22"]

    fake.register("api", id="api-1", port=7000, address="127.0.1.5")  # a new service
    eventually(lambda: assert_eq(a(d, "api"), ["127.0.1.5"]))

    fake.deregister("web-1")
    eventually(lambda: assert_eq(a(d, "web"), ["127.0.1.22"]))
    fake.deregister("web-2")  # the last instance: the service leaves the catalog
    eventually(lambda: assert_eq(ask(d, f"web.{D}", "A").rcode(), dns.rcode.NXDOMAIN))
    assert set(snapshot(d)) == {"api-1"}
    assert not state(d).stale


def assert_eq(got: object, want: object) -> None:
    assert got == want


def test_health_from_checks_is_kept_and_only_healthy_is_served(
    agent: FakeConsulThread, start_daemon: Start
) -> None:
    fake = agent.fake
    fake.register("web", id="web-1", port=8001, address="127.0.1.1")
    fake.register("web", id="web-2", port=8002, address="127.0.1.2", status="warning")
    fake.register("web", id="web-3", port=8003, address="127.0.1.3", status="critical")
    fake.register("web", id="web-4", port=8004, address="127.0.1.4", node="node2")
    d = start_daemon(consul_config(agent.port))

    def status() -> dict[str, object]:
        counts = d.call(lambda: health_status(d.daemon.table.view)).get("web")
        assert counts is not None
        return dict(counts)

    eventually(lambda: assert_eq(status()["total"], 4))
    assert status() == {"total": 4, "healthy": 2, "unhealthy": 1, "critical": 1}
    assert a(d, "web") == ["127.0.1.1", "127.0.1.4"]

    # A second check that is critical wins over a passing one; the node's
    # serfHealth counts for every instance on the node.
    fake.set_check("web-1", "critical", check_id="disk")
    fake.set_node_check("node2", "critical")
    fake.set_check("web-2", "passing")
    eventually(
        lambda: assert_eq(status(), {"total": 4, "healthy": 1, "unhealthy": 0, "critical": 3})
    )
    assert a(d, "web") == ["127.0.1.2"]
    assert snapshot(d)["web-4"].health is Health.CRITICAL

    fake.set_node_check("node2", "passing")
    eventually(lambda: assert_eq(a(d, "web"), ["127.0.1.2", "127.0.1.4"]))


def test_address_version_tags_and_meta(agent: FakeConsulThread, start_daemon: Start) -> None:
    fake = agent.fake
    fake.register(
        "web",
        id="web-1",
        port=8001,
        node="node7",
        node_address="127.0.7.7",  # no service address: the node's is used
        tags=["prod", "version=2.1.0"],
        meta={"zone": "eu-1", "weight": "10"},
    )
    fake.register("web", id="web-2", port=8002, address="127.0.1.2")
    d = start_daemon(consul_config(agent.port))
    eventually(lambda: synced(d))
    web1, web2 = snapshot(d)["web-1"], snapshot(d)["web-2"]
    assert (web1.address, web1.version, web1.tags) == (
        "127.0.7.7",
        "2.1.0",
        ("prod", "version=2.1.0"),
    )
    assert dict(web1.metadata) == {"zone": "eu-1", "weight": "10"}
    assert (web2.address, web2.version, web2.tags, dict(web2.metadata)) == (
        "127.0.1.2",
        "1.0.0",
        (),
        {},
    )
    assert a(d, "web") == ["127.0.1.2", "127.0.7.7"]


def test_spurious_wakeups_change_nothing_and_cannot_spin(
    agent: FakeConsulThread, start_daemon: Start
) -> None:
    fake = agent.fake
    fake.register("web", id="web-1", port=8001, address="127.0.1.1")
    d = start_daemon(consul_config(agent.port))
    before = eventually(lambda: synced(d))
    revision = d.call(lambda: d.daemon.table.view.revision)
    eventually(lambda: assert_eq(fake.request_count() >= 4, True))  # both watchers blocking

    for _ in range(5):
        fake.spurious_wakeup()
    # A server that answers every blocking query at once (same index, same data).
    fake.spurious_always = True
    fake.spurious_wakeup()
    start = fake.request_count()
    time.sleep(1.0)  # the measuring window, not a synchronisation
    served = fake.request_count() - start
    fake.spurious_always = False
    # Two watchers, each a token bucket of 2 + one per 100 ms: ~24 a second,
    # where an unlimited loop makes thousands.
    assert 2 < served <= 30
    assert d.call(lambda: d.daemon.table.view.revision) == revision
    assert state(d).last_sync == before.last_sync  # not even a republish
    assert srv(d, "web") == [(8001, target("web-1", "web"))]


def test_index_zero_is_waited_on_as_one(agent: FakeConsulThread, start_daemon: Start) -> None:
    fake = agent.fake
    fake.zero_index_when_empty = True  # an empty catalog answers X-Consul-Index: 0
    d = start_daemon(consul_config(agent.port))
    s = eventually(lambda: synced(d))
    assert s.instances == 0  # empty and synced: not the same as unreachable
    eventually(lambda: assert_eq(fake.request_count("catalog") >= 2, True))
    start = fake.request_count("catalog")
    time.sleep(1.0)  # the measuring window
    assert fake.request_count("catalog") - start <= 1  # blocked, not polling
    assert fake.requests_to("catalog")[-1].query["index"] == "1"

    fake.register("web", id="web-1", port=8001, address="127.0.1.1")
    eventually(lambda: assert_eq(a(d, "web"), ["127.0.1.1"]))


def test_index_going_backwards_restarts_with_a_full_read(
    agent: FakeConsulThread, start_daemon: Start
) -> None:
    fake = agent.fake
    fake.register("web", id="web-1", port=8001, address="127.0.1.1")
    # A long wait: a client that kept blocking on its old (too high) index
    # would not see the next change for 30 s.
    d = start_daemon(consul_config(agent.port, wait="30s"))
    eventually(lambda: synced(d))
    eventually(lambda: assert_eq(fake.request_count() >= 4, True))
    seen = len(fake.requests_to("health:web"))

    fake.restore()  # index goes back, blocking queries are abandoned
    fake.register("web", id="web-2", port=8002, address="127.0.1.2")
    eventually(lambda: assert_eq(a(d, "web"), ["127.0.1.1", "127.0.1.2"]))
    fake.update("web-2", port=8003)
    eventually(
        lambda: assert_eq(
            srv(d, "web"), [(8001, target("web-1", "web")), (8003, target("web-2", "web"))]
        )
    )
    after = fake.requests_to("health:web")[seen:]
    assert any("index" not in r.query for r in after)  # the reset's full read
    assert not state(d).stale


def test_5xx_marks_stale_then_recovers(agent: FakeConsulThread, start_daemon: Start) -> None:
    fake = agent.fake
    fake.register("web", id="web-1", port=8001, address="127.0.1.1")
    d = start_daemon(consul_config(agent.port))
    eventually(lambda: synced(d))

    fake.fail(None)  # no leader: every request (and every waiting one) answers 500
    s = eventually(lambda: stale(d))
    assert s.error is not None and "No cluster leader" in s.error
    assert a(d, "web") == ["127.0.1.1"]  # the last snapshot keeps being served

    fake.register("web", id="web-2", port=8002, address="127.0.1.2")  # during the outage
    fake.update("web-1", port=9001)
    fake.heal()
    eventually(lambda: synced(d))
    assert srv(d, "web") == [(8002, target("web-2", "web")), (9001, target("web-1", "web"))]

    fake.fail(3)  # a short blip
    fake.deregister("web-2")
    eventually(lambda: assert_eq(srv(d, "web"), [(9001, target("web-1", "web"))]))
    eventually(lambda: synced(d))


def test_backend_killed_keeps_serving_then_converges(
    agent: FakeConsulThread, start_daemon: Start
) -> None:
    fake = agent.fake
    fake.register("web", id="web-1", port=8001, address="127.0.1.1")
    fake.register("web", id="web-2", port=8002, address="127.0.1.2")
    fake.register("db", id="db-1", port=5432, address="127.0.1.3")
    d = start_daemon(consul_config(agent.port))
    eventually(lambda: synced(d))

    agent.stop()
    eventually(lambda: stale(d))
    for _ in range(3):
        assert a(d, "web") == ["127.0.1.1", "127.0.1.2"]
        assert a(d, "db") == ["127.0.1.3"]

    # The world moves on while resolverd cannot see it.
    fake.deregister("web-1")
    fake.update("web-2", port=9002)
    fake.register("web", id="web-3", port=8003, address="127.0.1.4", status="warning")
    fake.deregister("db-1")
    fake.register("api", id="api-1", port=7000, address="127.0.1.5")
    agent.start()

    expected = {
        "web-2": ("web", "127.0.1.2", 9002, Health.HEALTHY),
        "web-3": ("web", "127.0.1.4", 8003, Health.UNHEALTHY),
        "api-1": ("api", "127.0.1.5", 7000, Health.HEALTHY),
    }

    def converged() -> None:
        synced(d)
        got = {i.id: (i.name, i.address, i.port, i.health) for i in snapshot(d).values()}
        assert got == expected

    eventually(converged)
    assert ask(d, f"db.{D}", "A").rcode() == dns.rcode.NXDOMAIN
    assert srv(d, "web") == [(9002, target("web-2", "web"))]
    assert a(d, "api") == ["127.0.1.5"]


def test_unreachable_at_start_then_up(start_daemon: Start) -> None:
    runner = FakeConsulThread(FakeConsul())
    try:
        runner.start()
        runner.stop()  # the port is known, nothing listens on it
        runner.fake.register("web", id="web-1", port=8001, address="127.0.1.1")
        d = start_daemon(consul_config(runner.port))
        s = eventually(lambda: stale(d))
        assert not s.synced and s.error is not None and "Cannot connect" in s.error
        assert ask(d, f"web.{D}", "A").rcode() == dns.rcode.NXDOMAIN
        runner.start()
        eventually(lambda: synced(d))
        assert a(d, "web") == ["127.0.1.1"]
    finally:
        runner.close()


def test_malformed_instances_are_skipped_with_a_log_line(
    agent: FakeConsulThread, start_daemon: Start
) -> None:
    fake = agent.fake
    fake.register("web", id="web-1", port=8001, address="127.0.1.1")
    fake.register("web", id="web-0", port=0, address="127.0.1.2")  # Consul allows port 0
    fake.register("my_service", id="my-1", port=8003, address="127.0.1.3")  # not a DNS label
    fake.register("Billing", id="billing-1", port=8004, address="127.0.1.4")  # case folds
    with capture_logs() as logs:
        d = start_daemon(consul_config(agent.port))
        eventually(lambda: synced(d))
    assert set(snapshot(d)) == {"web-1", "billing-1"}
    assert a(d, "web") == ["127.0.1.1"]
    assert a(d, "billing") == ["127.0.1.4"]
    skipped = [e for e in logs if e["event"] == "consul.instance_skipped"]
    assert sorted(e["service"] for e in skipped) == ["my_service", "web"]
    assert any("web-0" in e["reason"] and "port" in e["reason"] for e in skipped)


def test_service_ids_shared_by_nodes_stay_distinct(
    agent: FakeConsulThread, start_daemon: Start
) -> None:
    fake = agent.fake
    # Agents default a service's ID to its name, so two nodes both say "web".
    fake.register("web", port=8001, node="node1", address="127.0.1.1")
    fake.register("web", port=8002, node="node2", address="127.0.1.2")
    d = start_daemon(consul_config(agent.port))
    eventually(lambda: synced(d))
    assert set(snapshot(d)) == {"web@node1", "web@node2"}
    assert a(d, "web") == ["127.0.1.1", "127.0.1.2"]


def test_token_and_datacenter_are_sent(
    start_daemon: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = FakeConsulThread(FakeConsul(token="s3cret", datacenter="dc2"))
    try:
        runner.start()
        fake = runner.fake
        fake.register("web", id="web-1", port=8001, address="127.0.1.1")
        # py-consul prefers $CONSUL_HTTP_TOKEN over the token it is given; the config must win.
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-the-environment")
        good = start_daemon(consul_config(runner.port, token="s3cret", datacenter="dc2"))
        bad_token = start_daemon(consul_config(runner.port, token="wrong", datacenter="dc2"))
        bad_dc = start_daemon(consul_config(runner.port, token="s3cret", datacenter="dc9"))

        eventually(lambda: synced(good))
        assert a(good, "web") == ["127.0.1.1"]
        s = eventually(lambda: stale(bad_token))
        assert not s.synced and s.error is not None and "ACL not found" in s.error
        s = eventually(lambda: stale(bad_dc))
        assert not s.synced and s.error is not None and "No path to datacenter" in s.error

        ok = [r for r in fake.log if r.status == 200]
        assert ok and all(r.token == "s3cret" and r.query.get("dc") == "dc2" for r in ok)
        assert {r.token for r in fake.log} == {"s3cret", "wrong"}
    finally:
        runner.close()


def test_local_example_is_valid_and_loopback_only() -> None:
    config = load_config(str(EXAMPLES / "consul-local.yaml"))
    (provider,) = config.providers
    assert provider.type == "consul"
    assert (provider.options["host"], provider.options["port"]) == ("127.0.0.1", 8500)
    assert config.dns.listen_udp == (("127.0.0.1", 5354),)
