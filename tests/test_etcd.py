"""The etcd provider against a real etcd (tests/etcd_server.py) and a real
daemon answering DNS; its pure parts (value parsing, event application)
table-driven. Waits are bounded polls, never sleeps used as synchronisation."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from aetcd import rpc  # type: ignore[import-untyped]

from resolverd.config import ProviderConfig, parse_config
from resolverd.model import Health, Instance
from resolverd.providers import etcd as etcd_provider
from resolverd.providers.etcd import (
    EtcdProvider,
    Session,
    Skipped,
    Snapshot,
    apply_events,
    key_defaults,
    parse_heartbeat,
    parse_value,
    range_end,
)
from resolverd.table import ServiceTable
from tests.conftest import DaemonThread, load_example, need
from tests.etcd_server import EtcdMissingError, EtcdServer, TcpProxy, TlsFiles, free_port
from tests.test_dns import addresses, ask

Start = Callable[[dict[str, Any]], DaemonThread]
T = TypeVar("T")
D = "resolverd.internal."
_prefixes = itertools.count(1)


# --------------------------------------------------------------------------- fixtures, helpers


def _server() -> EtcdServer:
    try:
        return EtcdServer()
    except EtcdMissingError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    """Shared by the tests that leave it running; each uses its own prefix."""
    server = _server()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """For tests that kill their etcd."""
    server = _server()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def prefix() -> str:
    return f"/t{next(_prefixes)}/"


def etcd_options(endpoints: str | list[str], prefix: str | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "endpoints": [endpoints] if isinstance(endpoints, str) else endpoints,
        "reconnect_max": "500ms",
    }
    if prefix is not None:
        options["prefix"] = prefix
    return options


def daemon_config(endpoints: str | list[str], prefix: str | None = None) -> dict[str, Any]:
    return {
        "service_discovery": {
            "provider": "etcd",
            "etcd": etcd_options(endpoints, prefix),
            "load_balancer": {"algorithm": "round_robin"},
        }
    }


def provider_config(endpoints: str | list[str], prefix: str | None = None) -> ProviderConfig:
    config = parse_config(daemon_config(endpoints, prefix), file="test.yaml")
    return config.providers[0]


def seed_instance(i: int, name: str = "web", **extra: Any) -> dict[str, Any]:
    """The seed's ServiceInstance JSON."""
    return {
        "id": f"{name}-{i}",
        "name": name,
        "version": "1.2.0",
        "address": f"127.0.1.{i}",
        "port": 8000 + i,
        "tags": ["production"],
        "metadata": {"weight": "10", "region": "us-east-1"},
        "health": "healthy",
        "lastHeartbeat": "2024-01-15T10:30:00.000Z",
        **extra,
    }


def eventually(check: Callable[[], T], *, timeout: float = 5.0, what: str = "") -> T:
    """Poll `check` until it returns a truthy value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what} (last: {result!r})")
        time.sleep(0.02)


async def eventually_async(check: Callable[[], T], *, timeout: float = 5.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what} (last: {result!r})")
        await asyncio.sleep(0.02)


def a_records(d: DaemonThread, service: str) -> list[str]:
    return sorted(addresses(ask(d, f"{service}.{D}", "A")))


def served(d: DaemonThread) -> dict[str, tuple[str, str, int]]:
    """The etcd provider's snapshot in the daemon's table: id -> (name, address, port)."""
    snapshot = d.call(lambda: d.daemon.table.snapshots().get("etcd", ()))
    return {i.id: (i.name, i.address, i.port) for i in snapshot}


def in_etcd(etcd: EtcdServer, prefix: str) -> dict[str, tuple[str, str, int]]:
    """What the backend holds (the tests' values always carry id and name)."""
    out = {}
    for value in etcd.get_prefix(prefix).values():
        try:
            data = json.loads(value)
        except ValueError:
            continue
        if isinstance(data, dict) and 0 < data.get("port", 0) < 65536:
            out[data["id"]] = (data["name"], data["address"], data["port"])
    return out


def state(d: DaemonThread) -> Any:
    return d.call(lambda: d.daemon.table.states()["etcd"])


def ids(table: ServiceTable, provider: str = "etcd") -> set[str]:
    return {i.id for i in table.snapshots().get(provider, ())}


async def stop(task: asyncio.Task[None], *, within: float = 2.0) -> None:
    """Cancel a provider; it must end promptly and cleanly."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=within)
    assert done, f"provider did not stop within {within}s of being cancelled"
    assert task.cancelled()


def event(kind: int, key: str, value: bytes = b"", revision: int = 1) -> Any:
    kv = rpc.KeyValue(key=key.encode(), value=value, mod_revision=revision)
    return rpc.Event(type=kind, kv=kv)


PUT, DELETE = rpc.Event.PUT, rpc.Event.DELETE


# --------------------------------------------------------------------------- pure parts

NOW = 1_700_000_000.0


def test_parse_value_takes_the_seeds_json() -> None:
    inst = parse_value(
        "/services/web/web-1",
        json.dumps(seed_instance(1, health="unhealthy")).encode(),
        prefix="/services/",
        provider="etcd",
        now=NOW,
    )
    assert inst == Instance(
        id="web-1",
        name="web",
        address="127.0.1.1",
        port=8001,
        version="1.2.0",
        tags=("production",),
        metadata={"weight": "10", "region": "us-east-1"},
        health=Health.UNHEALTHY,
        provider="etcd",
    )
    assert inst.last_heartbeat == 1705314600.0


@pytest.mark.parametrize(
    ("key", "data", "expected"),
    [
        # id and name default to the key's last two segments
        ("/services/api/api-7", {"address": "127.0.0.1", "port": 80}, ("api-7", "api")),
        # what the value says wins over the key
        ("/services/api/x", {"id": "y", "name": "web", "address": "::1", "port": 1}, ("y", "web")),
        # off the layout: deeper, or a value that names itself
        ("/services/prod/web/w1", {"address": "127.0.0.1", "port": 1}, ("w1", "web")),
        ("/services/w1", {"name": "web", "address": "127.0.0.1", "port": 1}, ("w1", "web")),
        # keys this version does not know are ignored
        ("/services/a/a1", {"address": "h.example", "port": 2, "zone": "b"}, ("a1", "a")),
    ],
)
def test_parse_value_ids_and_names(
    key: str, data: dict[str, Any], expected: tuple[str, str]
) -> None:
    inst = parse_value(key, json.dumps(data).encode(), prefix="/services/", provider="e", now=NOW)
    assert (inst.id, inst.name) == expected
    assert inst.last_heartbeat == NOW  # no lastHeartbeat: when it was read


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("/services/web/a", b"{nope", "not JSON"),
        ("/services/web/a", b"", "not JSON"),
        ("/services/web/a", b"[1, 2]", "expected a JSON object, got list"),
        ("/services/web/a", b"null", "expected a JSON object, got null"),
        ("/services/web/a", b"\xff\xfe", "the value is not UTF-8"),
        ("/services/web/a", b'{"address": "127.0.0.1", "port": 70000}', "70000 is not a port"),
        ("/services/web/a", b'{"address": "127.0.0.1", "port": "80"}', "port: expected an integer"),
        ("/services/web/a", b'{"port": 80}', "address: missing required key"),
        ("/services/web_x/a", b'{"address": "127.0.0.1", "port": 80}', "name: 'web_x' is not"),
        ("/services/x", b'{"address": "127.0.0.1", "port": 80}', "name: missing required key"),
        ("/services/web/a", b'{"address": "127.0.0.1", "port": 1, "health": "ok"}', "health"),
        ("/services/web/a", b'{"address": "1.2.3.4", "port": 1, "id": "\\ud800"}', "Unicode"),
    ],
)
def test_parse_value_rejects(key: str, value: bytes, reason: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_value(key, value, prefix="/services/", provider="etcd", now=NOW)
    assert reason in str(err.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-01-15T10:30:00.000Z", 1705314600.0),
        ("2024-01-15T10:30:00+01:00", 1705311000.0),
        ("2024-01-15T10:30:00", 1705314600.0),  # no zone: UTC
        (1705314600, 1705314600.0),
        (1705314600123, 1705314600.123),  # JavaScript milliseconds
        ("yesterday", None),
        (True, None),
        (None, None),
        (-5, None),
        ({"t": 1}, None),
    ],
)
def test_parse_heartbeat(value: object, expected: float | None) -> None:
    assert parse_heartbeat(value) == (pytest.approx(expected) if expected else None)


def test_key_defaults_and_ranges() -> None:
    assert key_defaults("/services/web/web-1", "/services/") == ("web", "web-1")
    assert key_defaults("/services/web-1", "/services/") == (None, "web-1")
    assert key_defaults("/services/", "/services/") == (None, None)
    assert range_end(b"/services/") == (b"/services/", b"/services0")
    assert range_end(b"a\xff") == (b"a\xff", b"b")
    assert range_end(b"") == (b"\x00", b"\x00")  # everything
    assert range_end(b"\xff") == (b"\xff", b"\x00")


def _value(i: int, name: str = "web", **extra: Any) -> bytes:
    return json.dumps(seed_instance(i, name, **extra)).encode()


def test_events_put_change_delete_and_invalid() -> None:
    snap = Snapshot(prefix="/services/", provider="etcd")
    skipped = apply_events(
        snap,
        [
            event(PUT, "/services/web/web-1", _value(1), 2),
            event(PUT, "/services/web/web-2", _value(2), 3),
            event(PUT, "/services/web/web-1", _value(1, address="127.0.9.9"), 4),
            event(DELETE, "/services/web/web-2", revision=5),
            event(DELETE, "/services/web/never-there", revision=6),
            event(PUT, "/services/web/web-3", _value(3), 7),
            # An invalid value replaces a valid one: the key serves nothing now.
            event(PUT, "/services/web/web-3", b'{"address": "127.0.0.1", "port": 0}', 8),
        ],
        now=NOW,
    )
    assert {i.id: i.address for i in snap.instances()} == {"web-1": "127.0.9.9"}
    assert skipped == [Skipped("/services/web/web-3", 8, "port: 0 is not a port (1-65535)")]
    # and a later valid value at that key is served again
    assert apply_events(snap, [event(PUT, "/services/web/web-3", _value(3), 9)], now=NOW) == []
    assert sorted(i.id for i in snap.instances()) == ["web-1", "web-3"]


def test_only_visible_changes_mark_the_snapshot_changed() -> None:
    """A re-put that only renews lastHeartbeat (the seed's heartbeat writes)
    needs no table rebuild: the table's equality ignores the heartbeat."""
    snap = Snapshot(prefix="/services/", provider="etcd")
    key = "/services/web/web-1"

    def changed(*events: Any) -> bool:
        snap.changed = False
        apply_events(snap, events, now=NOW)
        return snap.changed

    assert changed(event(PUT, key, _value(1)))
    assert not changed(event(PUT, key, _value(1, lastHeartbeat="2030-01-01T00:00:00Z")))
    assert snap.instances()[0].last_heartbeat == 1893456000.0  # the new one is kept
    assert changed(event(PUT, key, _value(1, tags=["canary"])))
    assert not changed(event(DELETE, "/services/web/other"))
    assert not changed(event(PUT, "/services/web/other", b"nope"))
    assert changed(event(PUT, key, b"nope"))  # web-1 leaves
    assert not changed(event(DELETE, key))


def test_duplicate_ids_serve_the_smallest_key_whatever_the_order() -> None:
    dup = _value(1, address="127.0.5.5")  # id web-1 again
    orders = [
        [("/services/web/web-1", _value(1)), ("/services/web/zz", dup)],
        [("/services/web/zz", dup), ("/services/web/web-1", _value(1))],
    ]
    for order in orders:
        snap = Snapshot(prefix="/services/", provider="etcd")
        skipped = [snap.put(k, v, revision=r, now=NOW) for r, (k, v) in enumerate(order)]
        assert [i.address for i in snap.instances()] == ["127.0.1.1"]
        assert [s.key for s in skipped if s] == ["/services/web/zz"]
        assert all(s.duplicate for s in skipped if s)
    # The served key goes: the other one takes over.
    snap.delete("/services/web/web-1")
    assert [i.address for i in snap.instances()] == ["127.0.5.5"]
    snap.delete("/services/web/zz")
    assert snap.instances() == ()


# --------------------------------------------------------------------------- over DNS


def test_initial_sync_answers_dns(etcd: EtcdServer, start_daemon: Start) -> None:
    """Instances put before the daemon starts, in the seed's layout under the
    default prefix, are answered (dig and dnspython)."""
    etcd.put("/services/user-service/user-service-1", seed_instance(1, "user-service"))
    etcd.put("/services/user-service/user-service-2", seed_instance(2, "user-service"))
    d = start_daemon(daemon_config(etcd.endpoint))
    assert eventually(lambda: a_records(d, "user-service")) == ["127.0.1.1", "127.0.1.2"]
    out = subprocess.run(
        [need("dig"), "@127.0.0.1", "-p", str(d.udp[1]), "SRV", "user-service", "+short"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert sorted(line.split()[2] for line in out.splitlines()) == ["8001", "8002"]
    st = state(d)
    assert st.synced and not st.stale and st.instances == 2


def test_the_example_config_serves_what_its_comment_registers(
    etcd: EtcdServer, prefix: str, start_daemon: Start
) -> None:
    data = load_example("etcd.yaml")
    assert data["service_discovery"]["etcd"]["endpoints"] == ["127.0.0.1:2379"]
    data["service_discovery"]["etcd"].update(endpoints=[etcd.endpoint], prefix=prefix)
    d = start_daemon(data)
    etcd.put(
        f"{prefix}user-service/user-service-1",
        '{"id": "user-service-1", "name": "user-service", "version": "1.2.0",'
        ' "address": "10.0.1.10", "port": 8080, "tags": ["production", "primary"],'
        ' "metadata": {"weight": "10", "region": "us-east-1"}, "health": "healthy"}',
    )
    assert eventually(lambda: a_records(d, "user-service")) == ["10.0.1.10"]


def test_put_change_delete_propagate(etcd: EtcdServer, prefix: str, start_daemon: Start) -> None:
    etcd.put(f"{prefix}web/web-1", seed_instance(1))
    d = start_daemon(daemon_config(etcd.endpoint, prefix))
    eventually(lambda: a_records(d, "web") == ["127.0.1.1"], what="initial sync")

    etcd.put(f"{prefix}web/web-2", seed_instance(2))
    eventually(lambda: a_records(d, "web") == ["127.0.1.1", "127.0.1.2"], what="new instance")

    etcd.put(f"{prefix}web/web-2", seed_instance(2, address="127.0.2.2"))
    eventually(lambda: a_records(d, "web") == ["127.0.1.1", "127.0.2.2"], what="address change")

    etcd.put(f"{prefix}api/api-1", seed_instance(1, "api"))
    eventually(lambda: a_records(d, "api") == ["127.0.1.1"], what="new service")

    etcd.delete(f"{prefix}web/web-1")
    eventually(lambda: a_records(d, "web") == ["127.0.2.2"], what="delete")

    etcd.delete(f"{prefix}web/", prefix=True)
    eventually(lambda: a_records(d, "web") == [], what="delete of a whole service")
    assert a_records(d, "api") == ["127.0.1.1"]
    assert served(d) == in_etcd(etcd, prefix)


def test_lease_expiry_removes_the_instance(
    etcd: EtcdServer, prefix: str, start_daemon: Start
) -> None:
    """Self-registration: a key attached to a lease nobody keeps alive
    vanishes when the lease expires, and so does the instance."""
    etcd.put(f"{prefix}web/web-1", seed_instance(1))
    d = start_daemon(daemon_config(etcd.endpoint, prefix))
    lease = etcd.grant(2)
    etcd.put(f"{prefix}web/web-2", seed_instance(2), lease=lease)
    eventually(lambda: a_records(d, "web") == ["127.0.1.1", "127.0.1.2"], what="leased key")
    eventually(lambda: a_records(d, "web") == ["127.0.1.1"], timeout=8, what="gone with its lease")
    assert f"{prefix}web/web-2" not in etcd.get_prefix(prefix)


def test_malformed_values_are_skipped_and_the_watch_goes_on(
    etcd: EtcdServer, prefix: str, start_daemon: Start
) -> None:
    etcd.put(f"{prefix}web/web-1", seed_instance(1))
    etcd.put(f"{prefix}web/broken", "{not json")
    etcd.put(f"{prefix}web/web-9", seed_instance(9, port=70000))
    with structlog.testing.capture_logs() as logs:
        d = start_daemon(daemon_config(etcd.endpoint, prefix))
        eventually(lambda: a_records(d, "web") == ["127.0.1.1"], what="valid one served")
        # Through the watch too: a bad value, then good ones after it.
        etcd.put(f"{prefix}web/web-1", "[]")  # the instance that was there leaves
        etcd.put(f"{prefix}web/web-2", seed_instance(2))
        eventually(lambda: a_records(d, "web") == ["127.0.1.2"], what="watch still applied")
        etcd.put(f"{prefix}web/web-9", seed_instance(9))  # fixed
        eventually(lambda: a_records(d, "web") == ["127.0.1.2", "127.0.1.9"], what="fixed")
    invalid = {e["key"]: e["reason"] for e in logs if e["event"] == "etcd.invalid_instance"}
    assert invalid.keys() == {f"{prefix}web/broken", f"{prefix}web/web-9", f"{prefix}web/web-1"}
    assert "port: 70000 is not a port" in invalid[f"{prefix}web/web-9"]
    assert "not JSON" in invalid[f"{prefix}web/broken"]
    assert not state(d).stale


def test_empty_is_synced_unreachable_is_stale(etcd: EtcdServer, start_daemon: Start) -> None:
    """A reachable etcd with nothing under the prefix is an empty, fresh
    snapshot; an unreachable one is stale and never synced."""
    empty = start_daemon(daemon_config(etcd.endpoint, "/nothing-here/"))
    st = eventually(lambda: (s := state(empty)).synced and s, what="empty sync")
    assert not st.stale and st.instances == 0

    dead = start_daemon(daemon_config(f"127.0.0.1:{free_port()}"))
    st = eventually(lambda: (s := state(dead)).stale and s, what="unreachable is stale")
    assert not st.synced and "UNAVAILABLE" in (st.error or "")


def test_second_endpoint_is_used_when_the_first_is_down(
    etcd: EtcdServer, prefix: str, start_daemon: Start
) -> None:
    etcd.put(f"{prefix}web/web-1", seed_instance(1))
    d = start_daemon(daemon_config([f"127.0.0.1:{free_port()}", etcd.endpoint], prefix))
    eventually(lambda: a_records(d, "web") == ["127.0.1.1"], what="served via the second")


def test_etcd_killed_serves_stale_then_converges(own_etcd: EtcdServer, start_daemon: Start) -> None:
    etcd = own_etcd
    for i in (1, 2, 3):
        etcd.put(f"/services/web/web-{i}", seed_instance(i))
    d = start_daemon(daemon_config(etcd.endpoint))
    eventually(lambda: len(a_records(d, "web")) == 3, what="initial sync")

    etcd.stop()  # SIGKILL
    st = eventually(lambda: (s := state(d)).stale and s, what="stale once etcd is gone")
    assert st.error and st.age(time.time()) is not None
    for _ in range(5):  # the last snapshot keeps being answered
        assert a_records(d, "web") == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]

    etcd.start()
    # Changes right after it is back, racing the provider's reconnection.
    etcd.delete("/services/web/web-1")
    etcd.put("/services/web/web-2", seed_instance(2, address="127.0.2.2"))
    etcd.put("/services/web/web-4", seed_instance(4))
    etcd.put("/services/api/api-1", seed_instance(1, "api"))
    want = in_etcd(etcd, "/services/")
    assert len(want) == 4
    eventually(lambda: served(d) == want, what="exactly the backend's state")
    assert a_records(d, "web") == ["127.0.1.3", "127.0.1.4", "127.0.2.2"]
    assert a_records(d, "api") == ["127.0.1.1"]
    assert not state(d).stale


@pytest.fixture
def proxy(etcd: EtcdServer) -> Iterator[TcpProxy]:
    """A cuttable path to the shared etcd (ask for it before start_daemon, so
    the daemon stops before the proxy goes)."""
    relay = TcpProxy(("127.0.0.1", etcd.client_port))
    yield relay
    relay.close()


def test_changes_during_a_partition_converge(
    etcd: EtcdServer, prefix: str, proxy: TcpProxy, start_daemon: Start
) -> None:
    """The provider is cut off while etcd stays up and keeps changing: stale
    answers meanwhile, then exactly the backend's state once healed."""
    for i in (1, 2, 3):
        etcd.put(f"{prefix}web/web-{i}", seed_instance(i))
    d = start_daemon(daemon_config(proxy.endpoint, prefix))
    eventually(lambda: len(a_records(d, "web")) == 3, what="initial sync")

    proxy.cut()
    eventually(lambda: state(d).stale, what="stale once cut off")
    etcd.delete(f"{prefix}web/web-1")
    etcd.put(f"{prefix}web/web-2", seed_instance(2, address="127.0.2.2"))
    etcd.put(f"{prefix}web/web-4", seed_instance(4))
    etcd.put(f"{prefix}web/web-5", "garbage")
    etcd.put(f"{prefix}db/db-1", seed_instance(1, "db"))
    assert a_records(d, "web") == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    assert a_records(d, "db") == []

    proxy.heal()
    want = in_etcd(etcd, prefix)
    eventually(lambda: served(d) == want, what="exactly the backend's state")
    assert a_records(d, "web") == ["127.0.1.3", "127.0.1.4", "127.0.2.2"]
    assert a_records(d, "db") == ["127.0.1.1"]
    assert not state(d).stale


async def test_a_frozen_etcd_is_found_by_keepalive(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that stops answering without closing anything (SIGSTOP, or
    a partition dropping packets) is found by gRPC keepalive pings, not left
    as a silent watch forever. Timings shortened on both sides."""
    monkeypatch.setattr(etcd_provider, "KEEPALIVE_INTERVAL", 0.5)
    monkeypatch.setattr(etcd_provider, "KEEPALIVE_TIMEOUT", 0.5)
    try:
        server = EtcdServer(extra_args=("--grpc-keepalive-min-time=200ms",))
    except EtcdMissingError as exc:
        pytest.fail(str(exc))
    try:
        server.start()
        server.put(f"{prefix}web/web-1", seed_instance(1))
        task, table = await _run_until_settled(provider_config(server.endpoint, prefix))
        try:
            assert ids(table) == {"web-1"}
            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)
            try:
                st = await eventually_async(
                    lambda: table.states()["etcd"].stale, what="stale while etcd is frozen"
                )
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert st and ids(table) == {"web-1"}
            await eventually_async(lambda: not table.states()["etcd"].stale, what="recovered")
        finally:
            await stop(task)
    finally:
        server.close()


# --------------------------------------------------------------------------- the read/watch seam


def _patch_read(provider: EtcdProvider, after_first: Callable[[int], Awaitable[None]]) -> list[int]:
    """Run `after_first(revision)` once, between the first read and its watch."""
    reads: list[int] = []
    original = provider.read

    async def read(session: Session) -> Snapshot:
        snapshot = await original(session)
        reads.append(snapshot.revision)
        if len(reads) == 1:
            await after_first(snapshot.revision)
        return snapshot

    provider.read = read  # type: ignore[method-assign]
    return reads


async def test_a_change_between_the_read_and_the_watch_is_not_lost(
    etcd: EtcdServer, prefix: str
) -> None:
    etcd.put(f"{prefix}web/web-1", seed_instance(1))
    provider = EtcdProvider(provider_config(etcd.endpoint, prefix))
    table = ServiceTable(order=[provider.name])

    async def change(revision: int) -> None:
        await asyncio.to_thread(etcd.put, f"{prefix}web/web-2", seed_instance(2))
        await asyncio.to_thread(etcd.delete, f"{prefix}web/web-1")

    reads = _patch_read(provider, change)
    task = asyncio.create_task(provider.run(table))
    try:
        await eventually_async(lambda: ids(table) == {"web-2"}, what="both changes applied")
        assert len(reads) == 1  # by the watch from the read's revision + 1, not a re-read
    finally:
        await stop(task)


async def test_a_compacted_watch_revision_reads_everything_again(
    etcd: EtcdServer, prefix: str
) -> None:
    etcd.put(f"{prefix}web/web-1", seed_instance(1))
    provider = EtcdProvider(provider_config(etcd.endpoint, prefix))
    table = ServiceTable(order=[provider.name])

    async def change_and_compact(revision: int) -> None:
        for i in (2, 3, 4):
            await asyncio.to_thread(etcd.put, f"{prefix}web/web-{i}", seed_instance(i))
        # History before the latest revision is gone, the watch's start with it.
        await asyncio.to_thread(etcd.compact, await asyncio.to_thread(etcd.revision))

    reads = _patch_read(provider, change_and_compact)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(provider.run(table))
        try:
            await eventually_async(
                lambda: ids(table) == {"web-1", "web-2", "web-3", "web-4"}, what="re-read"
            )
        finally:
            await stop(task)
    assert len(reads) == 2 and reads[1] > reads[0]
    compacted = [e for e in logs if e["event"] == "etcd.compacted"]
    assert len(compacted) == 1 and compacted[0]["revision"] == reads[0]
    assert not table.states()[provider.name].stale  # reachable all along


async def test_a_read_whose_revision_is_compacted_between_pages_says_so(
    etcd: EtcdServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every page of the read is pinned to the first page's revision; if that
    revision is compacted mid-read, the read must not mix revisions: it
    raises WatchCompactedError and the provider reads again."""
    for i in (1, 2, 3):
        etcd.put(f"{prefix}web/web-{i}", seed_instance(i))
    monkeypatch.setattr(etcd_provider, "PAGE_SIZE", 1)
    provider = EtcdProvider(provider_config(etcd.endpoint, prefix))
    async with provider.session(etcd.endpoint) as session:
        real_kv = session.kv

        class CompactingKV:
            pages = 0

            async def Range(self, request: Any, **kw: Any) -> Any:
                reply = await real_kv.Range(request, **kw)
                self.pages += 1
                if self.pages == 1:
                    await asyncio.to_thread(etcd.put, f"{prefix}web/web-4", seed_instance(4))
                    await asyncio.to_thread(etcd.compact, await asyncio.to_thread(etcd.revision))
                return reply

        session.kv = CompactingKV()
        with pytest.raises(etcd_provider.WatchCompactedError):
            await provider.read(session)
        session.kv = real_kv  # a second read sees one consistent, newer revision
        snapshot = await provider.read(session)
    assert {i.id for i in snapshot.instances()} == {"web-1", "web-2", "web-3", "web-4"}


async def _run_until_settled(config: ProviderConfig) -> tuple[asyncio.Task[None], ServiceTable]:
    """Start a provider in this loop; wait until it synced or went stale."""
    provider = EtcdProvider(config)
    table = ServiceTable(order=[provider.name])
    task = asyncio.create_task(provider.run(table))

    def settled() -> bool:
        st = table.states()[provider.name]
        return st.synced or st.stale

    try:
        await eventually_async(settled, what=f"{provider.name} synced or stale")
    except BaseException:
        await stop(task)
        raise
    return task, table


@pytest.mark.parametrize("reachable", [True, False])
async def test_cancel_stops_promptly_watching_or_retrying(
    etcd: EtcdServer, prefix: str, reachable: bool
) -> None:
    endpoint = etcd.endpoint if reachable else f"127.0.0.1:{free_port()}"
    task, table = await _run_until_settled(provider_config(endpoint, prefix))
    assert table.states()["etcd"].synced is reachable
    await stop(task)


async def test_authentication(own_etcd: EtcdServer, prefix: str) -> None:
    etcd = own_etcd
    etcd.put(f"{prefix}web/web-1", seed_instance(1))
    etcd.ctl("user", "add", "root", "--new-user-password=s3cret")
    etcd.ctl("auth", "enable")

    def config(password: str) -> ProviderConfig:
        options = {**etcd_options(etcd.endpoint, prefix), "username": "root", "password": password}
        data = {"service_discovery": {"provider": "etcd", "etcd": options}}
        return parse_config(data, file="test.yaml").providers[0]

    task, table = await _run_until_settled(config("s3cret"))
    try:
        assert table.states()["etcd"].synced and ids(table) == {"web-1"}
    finally:
        await stop(task)

    task, table = await _run_until_settled(config("wrong"))
    try:
        st = table.states()["etcd"]
        assert st.stale and not st.synced and "authentication failed" in (st.error or "")
    finally:
        await stop(task)


async def test_tls_with_client_certificates(prefix: str, tmp_path: Path) -> None:
    tls = TlsFiles.generate(tmp_path / "pki")
    try:
        server = EtcdServer(tls=tls)
    except EtcdMissingError as exc:
        pytest.fail(str(exc))
    try:
        server.start()
        server.put(f"{prefix}web/web-1", seed_instance(1))

        def config(**files: Path) -> ProviderConfig:
            options = {
                **etcd_options(server.endpoint, prefix),
                **{k: str(v) for k, v in files.items()},
            }
            data = {"service_discovery": {"provider": "etcd", "etcd": options}}
            return parse_config(data, file="test.yaml").providers[0]

        task, table = await _run_until_settled(
            config(ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key)
        )
        try:
            assert table.states()["etcd"].synced and ids(table) == {"web-1"}
        finally:
            await stop(task)
        # No client certificate: etcd (--client-cert-auth) refuses it.
        task, table = await _run_until_settled(config(ca_file=tls.ca))
        try:
            st = table.states()["etcd"]
            assert st.stale and not st.synced
        finally:
            await stop(task)
    finally:
        server.close()
