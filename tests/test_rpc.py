"""The gRPC API end to end: a real daemon, real grpc.aio channels, real dig."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from resolverd.api.v1 import resolver_pb2 as pb
from resolverd.api.v1 import resolver_pb2_grpc as pb_grpc
from resolverd.model import Health, Instance
from tests.conftest import EXAMPLES, DaemonThread, for_tests, load_example, need
from tests.test_dns import inst, services

Start = Callable[[dict[str, Any]], DaemonThread]
D = "resolverd.internal."


def stub(d: DaemonThread, channel: grpc.aio.Channel | None = None) -> Any:
    return pb_grpc.ResolverStub(channel or grpc.aio.insecure_channel(d.daemon.rpc.address))


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


def dig_a(d: DaemonThread, name: str) -> list[str]:
    out = subprocess.run(
        [need("dig"), "@127.0.0.1", "-p", str(d.udp[1]), "A", name, "+short"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    return out.split()


# -- Resolve ----------------------------------------------------------------------


async def test_resolve_orders_the_seed_example(static_daemon: DaemonThread) -> None:
    async with grpc.aio.insecure_channel(static_daemon.daemon.rpc.address) as channel:
        reply = await stub(static_daemon, channel).Resolve(
            pb.ResolveRequest(service="user-service")
        )
    assert [e.id for e in reply.endpoints] == ["user-service-1", "user-service-2"]
    first = reply.endpoints[0]
    assert (first.address, first.port, first.version, first.weight) == (
        "10.0.1.10",
        8080,
        "1.2.0",
        10,
    )
    assert list(first.tags) == ["production", "primary"]
    assert first.metadata["region"] == "us-east-1"
    assert first.health == pb.HEALTH_HEALTHY and first.provider == "static"
    assert first.target == f"user-service-1.user-service.instance.{D}"
    assert reply.revision == static_daemon.daemon.table.view.revision and reply.ttl_seconds == 5


async def test_resolve_same_order_as_dns(start_daemon: Start) -> None:
    # Without a location of its own the caller is where the node is, as DNS clients are.
    d = start_daemon(
        services(
            inst(1, metadata={"latitude": "35.68", "longitude": "139.69"}),
            inst(2, metadata={"latitude": "38.9", "longitude": "-77.0"}),
            inst(3, metadata={"latitude": "51.5", "longitude": "-0.12"}),
            policy={"algorithm": "geo_location"},
            dns_cfg={"client_location": {"latitude": 40.7, "longitude": -74.0}},
        )
    )
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        s = stub(d, channel)
        reply = await s.Resolve(pb.ResolveRequest(service="web"))
        assert [e.address for e in reply.endpoints] == dig_a(d, f"web.{D}")
        tokyo = await s.Resolve(
            pb.ResolveRequest(service="web", client=pb.ClientInfo(latitude=35.0, longitude=135.0))
        )
        assert tokyo.endpoints[0].id == "web-1"


@pytest.mark.parametrize(
    ("request_", "code", "detail"),
    [
        (pb.ResolveRequest(service="nope"), grpc.StatusCode.NOT_FOUND, "'nope' is not known"),
        (pb.ResolveRequest(), grpc.StatusCode.INVALID_ARGUMENT, "service: required"),
        (
            pb.ResolveRequest(service="Bad Name"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "service: 'Bad Name' is not a DNS label",
        ),
        (
            pb.ResolveRequest(service="user-service", client=pb.ClientInfo(address="nope")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "client.address: 'nope' is not an IP address",
        ),
        (
            pb.ResolveRequest(service="user-service", client=pb.ClientInfo(latitude=1.0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "client.longitude: required with client.latitude",
        ),
        (
            pb.ResolveRequest(
                service="user-service", client=pb.ClientInfo(latitude=91.0, longitude=0.0)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "client.latitude: 91 is not a latitude",
        ),
        (
            pb.ResolveRequest(service="user-service", tags=[""]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tags[0]: must not be empty",
        ),
        (
            pb.ResolveRequest(service="user-service", version="9.9.9"),
            grpc.StatusCode.NOT_FOUND,
            "matches version '9.9.9'",
        ),
        (
            pb.ResolveRequest(service="user-service", tags=["canary"]),
            grpc.StatusCode.NOT_FOUND,
            "tags ['canary']",
        ),
    ],
)
async def test_resolve_errors(
    static_daemon: DaemonThread, request_: pb.ResolveRequest, code: grpc.StatusCode, detail: str
) -> None:
    async with grpc.aio.insecure_channel(static_daemon.daemon.rpc.address) as channel:
        got, details = await code_of(stub(static_daemon, channel).Resolve(request_))
    assert got == code and detail in details


async def test_resolve_filters_and_limit(static_daemon: DaemonThread) -> None:
    async with grpc.aio.insecure_channel(static_daemon.daemon.rpc.address) as channel:
        s = stub(static_daemon, channel)
        tagged = await s.Resolve(pb.ResolveRequest(service="user-service", tags=["secondary"]))
        assert [e.id for e in tagged.endpoints] == ["user-service-2"]
        limited = await s.Resolve(
            pb.ResolveRequest(service="user-service", version="1.2.0", limit=1)
        )
        assert len(limited.endpoints) == 1


async def test_unavailable_names_the_reason(start_daemon: Start) -> None:
    d = start_daemon(services(inst(1, health="critical"), inst(2, health="unhealthy")))
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        code, details = await code_of(stub(d, channel).Resolve(pb.ResolveRequest(service="web")))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == "no healthy instance of 'web' (2 known: 1 unhealthy, 1 critical)"


async def test_sticky_holds_then_moves_when_instance_leaves(start_daemon: Start) -> None:
    d = start_daemon(
        services(
            *(inst(i) for i in (1, 2, 3)),
            policy={"algorithm": "round_robin", "sticky_session": True},
        )
    )
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        s = stub(d, channel)

        async def first(session: str) -> str:
            reply = await s.Resolve(
                pb.ResolveRequest(service="web", client=pb.ClientInfo(session_key=session))
            )
            return str(reply.endpoints[0].id)

        pinned = {await first("alice") for _ in range(5)}
        assert len(pinned) == 1
        others = {await first(f"user-{n}") for n in range(6)}
        assert len(others) == 3  # new sessions still spread
        gone = pinned.pop()
        keep = [i for i in d.daemon.table.view.instances("web") if i.id != gone]
        d.call(lambda: d.daemon.table.replace("static", keep))
        moved = {await first("alice") for _ in range(5)}
        assert len(moved) == 1 and gone not in moved


# -- Report -----------------------------------------------------------------------


async def test_report_reorders_dns_and_releases_on_cancel(start_daemon: Start) -> None:
    d = start_daemon(
        services(*(inst(i) for i in (1, 2, 3)), policy={"algorithm": "least_connections"})
    )
    tracker = d.daemon.tracker
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        s = stub(d, channel)
        queue: asyncio.Queue[pb.ReportRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.ReportRequest]:
            while (item := await queue.get()) is not None:
                yield item

        call = s.Report(requests())
        await queue.put(
            pb.ReportRequest(
                connections=[
                    pb.ConnectionEvent(instance_id="web-1", opened=5),
                    pb.ConnectionEvent(instance_id="web-2", opened=1),
                    pb.ConnectionEvent(instance_id="web-3", opened=4, closed=1),
                ]
            )
        )
        await wait_for(lambda: d.call(lambda: tracker.count("web-1")) == 5)
        assert dig_a(d, f"web.{D}") == ["127.0.1.2", "127.0.1.3", "127.0.1.1"]
        resolved = await s.Resolve(pb.ResolveRequest(service="web"))
        assert [e.id for e in resolved.endpoints] == ["web-2", "web-3", "web-1"]
        assert [e.stats.open_connections for e in resolved.endpoints] == [1, 3, 5]
        call.cancel()  # the client dies: its connections are released
        await wait_for(lambda: d.call(lambda: tracker.counts()) == {})
        assert sorted(dig_a(d, f"web.{D}")) == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
        for _ in range(3):  # ties rotate again
            assert len({dig_a(d, f"web.{D}")[0] for _ in range(3)}) == 3


async def test_report_ends_cleanly_with_counts(start_daemon: Start) -> None:
    d = start_daemon(services(inst(1), inst(2), policy={"algorithm": "least_connections"}))
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        reqs = [
            pb.ReportRequest(
                connections=[pb.ConnectionEvent(instance_id="web-1", opened=3)],
                outcomes=[
                    pb.CallOutcome(instance_id="web-1", success=True, latency_ms=10, count=4)
                ],
            ),
            pb.ReportRequest(
                connections=[
                    pb.ConnectionEvent(instance_id="web-1", closed=1),
                    pb.ConnectionEvent(instance_id="web-2", closed=7),
                ],
                outcomes=[pb.CallOutcome(instance_id="web-2", success=False, latency_ms=30)],
            ),
        ]
        reply = await stub(d, channel).Report(iter(reqs))
        assert (reply.connection_events, reply.outcomes, reply.released) == (11, 5, 2)
        assert d.call(lambda: d.daemon.tracker.counts()) == {}
        listed = await stub(d, channel).ListServices(pb.ListServicesRequest())
        stats = {e.id: e.stats for e in listed.services[0].endpoints}
        assert (stats["web-1"].successes, stats["web-1"].average_latency_ms) == (4, 10)
        assert stats["web-2"].failures == 1


async def test_streams_keep_their_counts_when_an_instance_leaves_and_returns(
    start_daemon: Start,
) -> None:
    d = start_daemon(services(inst(1), inst(2), policy={"algorithm": "least_connections"}))
    table, tracker = d.daemon.table, d.daemon.tracker
    web1 = table.view.instances("web")[0]
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        s = stub(d, channel)
        a: asyncio.Queue[pb.ReportRequest | None] = asyncio.Queue()
        b: asyncio.Queue[pb.ReportRequest | None] = asyncio.Queue()

        async def drain(q: asyncio.Queue[pb.ReportRequest | None]) -> AsyncIterator[Any]:
            while (item := await q.get()) is not None:
                yield item

        call_a, call_b = s.Report(drain(a)), s.Report(drain(b))
        await a.put(
            pb.ReportRequest(connections=[pb.ConnectionEvent(instance_id="web-1", opened=3)])
        )
        await wait_for(lambda: d.call(lambda: tracker.count("web-1")) == 3)
        d.call(lambda: table.replace("static", table.view.instances("web")[1:]))
        d.call(lambda: table.replace("static", [web1, *table.view.instances("web")]))
        await b.put(
            pb.ReportRequest(connections=[pb.ConnectionEvent(instance_id="web-1", opened=2)])
        )
        await wait_for(lambda: d.call(lambda: tracker.count("web-1")) == 5)
        await a.put(
            pb.ReportRequest(connections=[pb.ConnectionEvent(instance_id="web-1", closed=3)])
        )
        await wait_for(lambda: d.call(lambda: tracker.count("web-1")) == 2)
        await a.put(None)
        assert (await call_a).released == 0
        await b.put(None)
        assert (await call_b).released == 2
        assert d.call(lambda: tracker.counts()) == {}


async def test_report_invalid_releases(start_daemon: Start) -> None:
    d = start_daemon(services(inst(1)))
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        reqs = [
            pb.ReportRequest(connections=[pb.ConnectionEvent(instance_id="web-1", opened=2)]),
            pb.ReportRequest(connections=[pb.ConnectionEvent(instance_id="", opened=1)]),
        ]
        code, details = await code_of(stub(d, channel).Report(iter(reqs)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "connections[0].instance_id: must not be empty"
    await wait_for(lambda: d.call(lambda: d.daemon.tracker.counts()) == {})


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition set by another process/thread (bounded; not a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# -- Watch --------------------------------------------------------------------------


async def test_watch_streams_changes(start_daemon: Start) -> None:
    d = start_daemon(services(inst(1), inst(2)))
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        stream = stub(d, channel).Watch(pb.WatchRequest(service="web"))
        first = await stream.read()
        assert [e.id for e in first.endpoints] == ["web-1", "web-2"]
        assert list(first.registered) == ["web-1", "web-2"]
        table = d.daemon.table
        d.call(
            lambda: table.replace(
                "runtime", [Instance(id="web-9", name="web", address="127.0.1.9", port=9)]
            )
        )
        change = await asyncio.wait_for(stream.read(), 5)
        assert list(change.registered) == ["web-9"] and change.revision == table.view.revision
        unrelated = Instance(id="api-1", name="api", address="127.0.2.1", port=1)
        d.call(lambda: table.replace("runtime", [unrelated]))  # web-9 leaves, api joins
        change = await asyncio.wait_for(stream.read(), 5)
        assert list(change.deregistered) == ["web-9"] and not change.registered
        crit = Instance(
            id="web-1", name="web", address="127.0.1.1", port=8001, health=Health.CRITICAL
        )
        d.call(lambda: table.replace("static", [crit, *table.view.instances("web")[1:]]))
        change = await asyncio.wait_for(stream.read(), 5)
        assert list(change.updated) == ["web-1"]
        assert change.endpoints[0].health == pb.HEALTH_CRITICAL
        stream.cancel()


async def test_watch_wakes_within_one_loop_turn(start_daemon: Start) -> None:
    """The table change sets the watcher's event synchronously, so the stream
    is resumed on the very next turn of the daemon's loop."""
    d = start_daemon(services(inst(1)))
    hub = d.daemon.hub
    event = asyncio.Event()
    d.call(lambda: hub.add("web", event))
    added = Instance(id="web-2", name="web", address="127.0.1.2", port=2)
    state = d.call(lambda: (d.daemon.table.replace("runtime", [added]), event.is_set())[1])
    assert state is True


# -- Register / Deregister -----------------------------------------------------------


def new(**kw: Any) -> pb.Instance:
    base: dict[str, Any] = {
        "id": "pay-1",
        "name": "payment-service",
        "address": "127.0.3.1",
        "port": 9000,
        "tags": ["beta"],
        "metadata": {"weight": "3"},
    }
    base.update(kw)
    return pb.Instance(**base)


async def test_register_and_deregister(static_daemon: DaemonThread) -> None:
    d = static_daemon
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        s = stub(d, channel)
        reply = await s.Register(pb.RegisterRequest(instance=new(version="2.0.0")))
        assert reply.created and reply.revision == d.daemon.table.view.revision
        assert dig_a(d, f"payment-service.{D}") == ["127.0.3.1"]
        resolved = await s.Resolve(pb.ResolveRequest(service="payment-service"))
        assert resolved.endpoints[0].provider == "registrations"
        again = await s.Register(pb.RegisterRequest(instance=new(address="127.0.3.2")))
        assert not again.created
        assert dig_a(d, f"payment-service.{D}") == ["127.0.3.2"]
        health = await s.GetHealthStatus(pb.GetHealthStatusRequest())
        assert health.services["payment-service"].total == 1
        assert health.services["user-service"].healthy == 2
        listed = await s.ListServices(pb.ListServicesRequest())
        assert [x.name for x in listed.services] == ["payment-service", "user-service"]
        await s.Deregister(pb.DeregisterRequest(id="pay-1"))
        assert dig_a(d, f"payment-service.{D}") == []
        state = json.loads(Path(d.daemon.registrations.state_file).read_text())
        assert state["instances"] == []


@pytest.mark.parametrize(
    ("instance", "code", "detail"),
    [
        (new(address="not an address"), grpc.StatusCode.INVALID_ARGUMENT, "instance.address"),
        (
            new(port=70000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "instance.port: 70000 is not a port (1-65535)",
        ),
        (new(port=0), grpc.StatusCode.INVALID_ARGUMENT, "instance.port: 0 is not a port"),
        (
            new(name="Payment Service"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "instance.name: 'Payment Service' is not a DNS label",
        ),
        (new(id=""), grpc.StatusCode.INVALID_ARGUMENT, "instance.id: must not be empty"),
        (
            new(id="user-service-1"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "'user-service-1' is owned by provider 'static'",
        ),
    ],
)
async def test_register_rejects_and_writes_nothing(
    static_daemon: DaemonThread, instance: pb.Instance, code: grpc.StatusCode, detail: str
) -> None:
    d = static_daemon
    revision = d.daemon.table.view.revision
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        got, details = await code_of(
            stub(d, channel).Register(pb.RegisterRequest(instance=instance))
        )
    assert got == code and detail in details
    assert not os.path.exists(d.daemon.registrations.state_file)
    assert d.daemon.table.view.revision == revision


async def test_deregister_errors(static_daemon: DaemonThread) -> None:
    async with grpc.aio.insecure_channel(static_daemon.daemon.rpc.address) as channel:
        s = stub(static_daemon, channel)
        assert (await code_of(s.Deregister(pb.DeregisterRequest(id="ghost"))))[
            0
        ] == grpc.StatusCode.NOT_FOUND
        code, details = await code_of(s.Deregister(pb.DeregisterRequest(id="user-service-1")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "static" in details
        assert (await code_of(s.Deregister(pb.DeregisterRequest())))[
            0
        ] == grpc.StatusCode.INVALID_ARGUMENT


async def test_registrations_survive_restart(start_daemon: Start, tmp_path: Path) -> None:
    config = load_example("static.yaml")
    config["registrations"] = {"state_file": str(tmp_path / "reg.json")}
    d = start_daemon(config)
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        await stub(d, channel).Register(pb.RegisterRequest(instance=new()))
    d.close()
    again = start_daemon(config)
    assert dig_a(again, f"payment-service.{D}") == ["127.0.3.1"]


def test_registrations_survive_kill_9(tmp_path: Path) -> None:
    data = yaml.safe_load((EXAMPLES / "static.yaml").read_text())
    data = for_tests(data)
    data["registrations"] = {"state_file": str(tmp_path / "state" / "reg.json")}
    path = tmp_path / "static.yaml"
    path.write_text(yaml.safe_dump(data))

    def start() -> tuple[subprocess.Popen[str], str, int]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "resolverd", "run", "-c", str(path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        rpc, udp = "", 0
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "rpc.listening":
                rpc = event["address"]
            if event["event"] == "dns.listening" and event["proto"] == "udp":
                udp = event["port"]
            if event["event"] == "daemon.started":
                break
        return proc, rpc, udp

    proc, rpc, _ = start()
    try:

        async def register() -> None:
            async with grpc.aio.insecure_channel(rpc) as channel:
                await pb_grpc.ResolverStub(channel).Register(pb.RegisterRequest(instance=new()))

        asyncio.run(register())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc, _, udp = start()
        q = dns.message.make_query(f"payment-service.{D}", "A")
        reply = dns.query.udp(q, "127.0.0.1", port=udp, timeout=5)
        assert [rr.address for rr in reply.answer[0]] == ["127.0.3.1"]
    finally:
        proc.kill()
        proc.wait(timeout=10)


# -- health, reflection, access -----------------------------------------------------


async def test_health_serving_then_not_serving_on_shutdown(start_daemon: Start) -> None:
    d = start_daemon(services(inst(1)))
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "resolverd.api.v1.Resolver"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        services_watch = stub(d, channel).Watch(pb.WatchRequest(service="web"))
        await services_watch.read()
        loop = asyncio.get_running_loop()
        started = loop.time()
        stopping = loop.run_in_executor(None, d.close)
        assert (
            await asyncio.wait_for(watch.read(), 10)
        ).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # a load balancer that heard NOT_SERVING goes away
        # Watch streams end at shutdown instead of holding the 5 s grace period.
        assert await services_watch.read() == grpc.aio.EOF
        await stopping
        assert loop.time() - started < 4


async def test_reflection_lists_services(static_daemon: DaemonThread) -> None:
    async with grpc.aio.insecure_channel(static_daemon.daemon.rpc.address) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in replies for s in r.list_services_response.service]
    assert "resolverd.api.v1.Resolver" in names and "grpc.health.v1.Health" in names


async def test_token_guards_changes_over_tcp_not_unix(start_daemon: Start, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    config = services(inst(1))
    config["api"] = {"listen": "127.0.0.1:0", "token": "s3cret", "unix_socket": str(sock)}
    d = start_daemon(config)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    instance = new()
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        s = stub(d, channel)
        code, _ = await code_of(s.Register(pb.RegisterRequest(instance=instance)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = await code_of(
            s.Register(
                pb.RegisterRequest(instance=instance), metadata=(("authorization", "Bearer wrong"),)
            )
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = await code_of(s.Report(iter([pb.ReportRequest()])))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        await s.Resolve(pb.ResolveRequest(service="web"))  # reads stay open
        await s.Register(
            pb.RegisterRequest(instance=instance), metadata=(("authorization", "Bearer s3cret"),)
        )
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        await stub(d, channel).Deregister(pb.DeregisterRequest(id="pay-1"))


def _openssl(*args: str) -> None:
    subprocess.run([need("openssl"), *args], check=True, capture_output=True, timeout=60)


async def test_tls_requires_client_certificate(start_daemon: Start, tmp_path: Path) -> None:
    def cert(name: str, cn: str, ca: str | None) -> None:
        key, crt = str(tmp_path / f"{name}.key"), str(tmp_path / f"{name}.crt")
        if ca is None:
            _openssl(
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                key,
                "-out",
                crt,
                "-days",
                "1",
                "-subj",
                f"/CN={cn}",
            )
            return
        csr = str(tmp_path / f"{name}.csr")
        ext = tmp_path / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key,
            "-out",
            csr,
            "-subj",
            f"/CN={cn}",
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            str(tmp_path / f"{ca}.crt"),
            "-CAkey",
            str(tmp_path / f"{ca}.key"),
            "-CAcreateserial",
            "-out",
            crt,
            "-days",
            "1",
            "-extfile",
            str(ext),
        )

    cert("ca", "test-ca", None)
    cert("server", "localhost", "ca")
    cert("client", "app", "ca")
    config = services(inst(1))
    config["api"] = {
        "listen": "127.0.0.1:0",
        "tls": {
            "cert_file": str(tmp_path / "server.crt"),
            "key_file": str(tmp_path / "server.key"),
            "client_ca_file": str(tmp_path / "ca.crt"),
        },
    }
    d = start_daemon(config)
    ca = (tmp_path / "ca.crt").read_bytes()
    good = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=(tmp_path / "client.key").read_bytes(),
        certificate_chain=(tmp_path / "client.crt").read_bytes(),
    )
    async with grpc.aio.secure_channel(d.daemon.rpc.address, good) as channel:
        reply = await stub(d, channel).Resolve(pb.ResolveRequest(service="web"))
        assert reply.endpoints[0].id == "web-1"
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(d.daemon.rpc.address, anonymous) as channel:
        code, _ = await code_of(
            stub(d, channel).Resolve(pb.ResolveRequest(service="web"), timeout=5)
        )
        assert code == grpc.StatusCode.UNAVAILABLE


# -- generated code ------------------------------------------------------------------


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    """`make protos` would not change the committed generated code."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{root / 'protos'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(root / "protos/resolverd/api/v1/resolver.proto"),
        ],
        check=True,
        timeout=60,
    )
    for name in ("resolver_pb2.py", "resolver_pb2.pyi", "resolver_pb2_grpc.py"):
        fresh = (tmp_path / "resolverd/api/v1" / name).read_text()
        committed = (root / "resolverd/api/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make protos`"
