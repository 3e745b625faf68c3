"""resolverd.client and the API commands of the CLI, against a real daemon over
real gRPC channels (and, for the Report stream's wire behaviour, a recording
fake server)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any, TypeVar

import dns.message
import dns.query
import grpc
import grpc.aio
import pytest

from resolverd.api.v1 import resolver_pb2 as pb
from resolverd.api.v1 import resolver_pb2_grpc as pb_grpc
from resolverd.client import Client, Endpoint, Resolution, ResolverError
from resolverd.model import Health
from tests.conftest import ROOT, DaemonThread, load_example
from tests.test_dns import inst, services

Start = Callable[[dict[str, Any]], DaemonThread]
T = TypeVar("T")
D = "resolverd.internal."
RESOLVERD = [sys.executable, "-m", "resolverd"]


def api(d: DaemonThread) -> str:
    return d.daemon.rpc.address


async def eventually(probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool]) -> T:
    """Poll `probe` (short awaits, at most 2 s) until `ok` holds; returns the last value.

    Reports are written before the server has applied them, so a read right
    after `flush()` may still see the previous state.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    while True:
        value = await probe()
        if ok(value) or loop.time() > deadline:
            return value
        await asyncio.sleep(0.02)


def by_id(res: Resolution) -> dict[str, Endpoint]:
    return {e.id: e for e in res.endpoints}


def dns_order(d: DaemonThread, name: str) -> list[str]:
    msg = dns.query.udp(dns.message.make_query(name, "A"), d.udp[0], port=d.udp[1], timeout=5)
    return [rr.address for rrset in msg.answer for rr in rrset]


# -- resolve ------------------------------------------------------------------------


async def test_resolve_static_example(static_daemon: DaemonThread) -> None:
    async with Client(api(static_daemon)) as client:
        res = await client.resolve("user-service")
        assert [e.id for e in res.endpoints] == ["user-service-1", "user-service-2"]
        assert res.first == res.endpoints[0]
        assert res.ttl == 5 and res.revision >= 1
        first = res.first
        assert (first.address, first.port, first.version) == ("10.0.1.10", 8080, "1.2.0")
        assert first.tags == ("production", "primary")
        assert dict(first.metadata) == {"weight": "10", "region": "us-east-1"}
        assert first.health is Health.HEALTHY and first.weight == 10
        assert first.provider == "static"
        assert first.target == f"user-service-1.user-service.instance.{D}"
        assert (first.open_connections, first.successes, first.failures) == (0, 0, 0)
        assert hash(first)  # frozen and hashable despite the metadata mapping

        tagged = await client.resolve("user-service", tags=["secondary"], limit=1)
        assert [e.id for e in tagged.endpoints] == ["user-service-2"]
        sticky = {(await client.resolve("user-service", session_key="s1")).first.id for _ in "abc"}
        assert len(sticky) == 1

        with pytest.raises(ResolverError) as err:
            await client.resolve("no-such-service")
        assert err.value.code is grpc.StatusCode.NOT_FOUND
        assert "no-such-service" in err.value.details
        assert str(err.value).startswith("NOT_FOUND: ")
        with pytest.raises(ResolverError) as err:
            await client.resolve("user-service", version="9.9.9")
        assert err.value.code is grpc.StatusCode.NOT_FOUND
        with pytest.raises(ResolverError) as err:
            await client.resolve("user-service", latitude=10.0)
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_first_of_nothing() -> None:
    with pytest.raises(LookupError):
        _ = Resolution(endpoints=(), revision=1, ttl=5).first


async def test_unix_socket_target(start_daemon: Start, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    data = load_example("static.yaml")
    data["api"] = {"unix_socket": str(sock)}
    d = start_daemon(data)
    async with Client(f"unix:{sock}") as client:
        assert (await client.resolve("user-service")).first.id == "user-service-1"
    assert f"unix:{sock}" in d.daemon.rpc.addresses


async def test_unavailable_daemon_raises() -> None:
    async with Client("127.0.0.1:1", timeout=2) as client:
        with pytest.raises(ResolverError) as err:
            await client.resolve("user-service")
    assert err.value.code is grpc.StatusCode.UNAVAILABLE


# -- connections and outcomes -------------------------------------------------------


async def test_connections_drive_least_connections(start_daemon: Start) -> None:
    d = start_daemon(
        services(*(inst(i) for i in (1, 2, 3)), policy={"algorithm": "least_connections"})
    )
    async with Client(api(d)) as client, AsyncExitStack() as others:
        await others.enter_async_context(client.connection("web-2"))
        await others.enter_async_context(client.connection("web-3"))
        async with AsyncExitStack() as to_web1:
            for _ in range(3):
                await to_web1.enter_async_context(client.connection("web-1"))
            await client.flush()
            res = await eventually(
                lambda: client.resolve("web"), lambda r: by_id(r)["web-1"].open_connections == 3
            )
            counts = {e.id: e.open_connections for e in res.endpoints}
            assert counts == {"web-1": 3, "web-2": 1, "web-3": 1}
            assert res.endpoints[-1].id == "web-1"
            assert dns_order(d, f"web.{D}")[-1] == "127.0.1.1"

        await client.flush()
        res = await eventually(
            lambda: client.resolve("web"), lambda r: by_id(r)["web-1"].open_connections == 0
        )
        assert res.first.id == "web-1"
        assert dns_order(d, f"web.{D}")[0] == "127.0.1.1"
    # Closing the client released web-2 and web-3 as well.
    async with Client(api(d)) as fresh:
        res = await eventually(
            lambda: fresh.resolve("web"),
            lambda r: all(e.open_connections == 0 for e in r.endpoints),
        )
        assert all(e.open_connections == 0 for e in res.endpoints)


async def test_close_releases_connections_still_open(start_daemon: Start) -> None:
    d = start_daemon(services(inst(1), inst(2), policy={"algorithm": "least_connections"}))
    observer = Client(api(d))
    app = Client(api(d))
    held = AsyncExitStack()
    for _ in range(2):
        await held.enter_async_context(app.connection("web-1"))
    await app.flush()
    res = await eventually(
        lambda: observer.resolve("web"), lambda r: by_id(r)["web-1"].open_connections == 2
    )
    assert by_id(res)["web-1"].open_connections == 2

    await app.close()  # the context managers are still open
    res = await eventually(
        lambda: observer.resolve("web"), lambda r: by_id(r)["web-1"].open_connections == 0
    )
    assert by_id(res)["web-1"].open_connections == 0
    await held.aclose()  # exiting after close() is harmless
    with pytest.raises(RuntimeError):
        await app.connection("web-1").__aenter__()
    await observer.close()


async def test_killed_app_releases_connections(start_daemon: Start) -> None:
    d = start_daemon(services(inst(1), inst(2), policy={"algorithm": "least_connections"}))
    script = textwrap.dedent(
        f"""
        import asyncio
        from resolverd.client import Client

        async def main():
            client = Client({api(d)!r})
            held = [client.connection("web-2") for _ in range(4)]
            for cm in held:
                await cm.__aenter__()
            await client.flush()
            print("ready", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    app = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "ready"
        async with Client(api(d)) as observer:
            res = await eventually(
                lambda: observer.resolve("web"), lambda r: by_id(r)["web-2"].open_connections == 4
            )
            assert by_id(res)["web-2"].open_connections == 4
            app.send_signal(signal.SIGKILL)
            app.wait(timeout=10)
            res = await eventually(
                lambda: observer.resolve("web"), lambda r: by_id(r)["web-2"].open_connections == 0
            )
            assert by_id(res)["web-2"].open_connections == 0
    finally:
        app.kill()
        app.wait(timeout=10)
        assert app.stdout is not None
        app.stdout.close()


async def test_outcomes(static_daemon: DaemonThread) -> None:
    async with Client(api(static_daemon)) as client:
        await client.report_outcome("user-service-2", success=True, latency_ms=10.0)
        await client.report_outcome("user-service-2", success=True, latency_ms=20.0)
        await client.report_outcome("user-service-2", success=False, latency_ms=30.0)
        await client.flush()
        res = await eventually(
            lambda: client.resolve("user-service"),
            lambda r: (
                by_id(r)["user-service-2"].successes + by_id(r)["user-service-2"].failures == 3
            ),
        )
        ep = by_id(res)["user-service-2"]
        assert (ep.successes, ep.failures) == (2, 1)
        assert 10.0 <= ep.average_latency_ms <= 30.0


async def test_bad_reports_are_refused_locally() -> None:
    # The server would end the whole stream, releasing every connection on it.
    async with Client("127.0.0.1:1") as client:
        with pytest.raises(ValueError):
            await client.connection("").__aenter__()
        with pytest.raises(ValueError):
            await client.report_outcome("web-1", success=True, latency_ms=-1.0)
        await client.flush()  # nothing was queued


# -- the Report stream on the wire --------------------------------------------------


class Recorder(pb_grpc.ResolverServicer):
    """Records each Report stream's messages; ends a stream after `end_after` messages."""

    def __init__(self) -> None:
        self.streams: list[list[pb.ReportRequest]] = []
        self.ended: list[bool] = []
        self.clean: list[bool] = []  # the client half-closed it (rather than cancelled)
        self.authorization: list[str] = []
        self.end_after: int | None = None
        self.changed = asyncio.Event()

    async def Report(
        self, request_iterator: AsyncIterator[pb.ReportRequest], context: Any
    ) -> pb.ReportResponse:
        messages: list[pb.ReportRequest] = []
        self.streams.append(messages)
        self.ended.append(False)
        index = len(self.streams) - 1
        metadata = dict(context.invocation_metadata() or ())
        self.authorization.append(metadata.get("authorization", ""))
        try:
            async for request in request_iterator:
                messages.append(request)
                self.changed.set()
                if self.end_after is not None and len(messages) >= self.end_after:
                    break
            else:
                self.clean.append(True)
        finally:
            self.ended[index] = True
            self.changed.set()
        return pb.ReportResponse()

    def messages(self, stream: int) -> list[pb.ReportRequest]:
        return self.streams[stream] if stream < len(self.streams) else []

    def has_ended(self, stream: int) -> bool:
        return stream < len(self.ended) and self.ended[stream]

    async def wait(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(2):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    server = grpc.aio.server()
    servicer = Recorder()
    pb_grpc.add_ResolverServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


def connections(msg: pb.ReportRequest) -> dict[str, tuple[int, int]]:
    return {c.instance_id: (c.opened, c.closed) for c in msg.connections}


async def test_report_batches_and_coalesces(recorder: tuple[Recorder, str]) -> None:
    fake, target = recorder
    async with Client(target, token="s3cret") as client:
        async with AsyncExitStack() as stack:
            for _ in range(20):
                await stack.enter_async_context(client.connection("a"))
            await stack.enter_async_context(client.connection("b"))
            await client.report_outcome("a", success=True, latency_ms=1.5)
            await client.flush()
            await fake.wait(lambda: len(fake.messages(0)) == 1)
        async with client.connection("a"):
            pass
        await client.flush()
        await fake.wait(lambda: len(fake.messages(0)) == 2)
    await fake.wait(lambda: fake.has_ended(0))

    assert len(fake.streams) == 1  # one stream for the whole client
    assert fake.clean == [True]  # close() half-closed it and awaited the response
    assert fake.authorization == ["Bearer s3cret"]
    first, second = fake.streams[0]
    assert connections(first) == {"a": (20, 0), "b": (1, 0)}
    assert [(o.instance_id, o.success, o.latency_ms) for o in first.outcomes] == [("a", True, 1.5)]
    # All 21 closes, and a whole open/close, in one message.
    assert connections(second) == {"a": (1, 21), "b": (0, 1)}


async def test_report_new_stream_re_reports_open_connections(
    recorder: tuple[Recorder, str],
) -> None:
    fake, target = recorder
    fake.end_after = 1  # the server ends each stream after its first message
    async with Client(target) as client, AsyncExitStack() as stack:
        for _ in range(2):
            await stack.enter_async_context(client.connection("a"))
        await client.flush()
        await fake.wait(lambda: fake.has_ended(0))
        # Whatever reaches the client first, the broken stream is replaced as
        # soon as there is something to report, and the replacement starts from
        # the connections open now.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2
        while len(fake.streams) < 2 and loop.time() < deadline:
            await client.report_outcome("a", success=True, latency_ms=1.0)
            with suppress(ResolverError):
                await client.flush()
            await asyncio.sleep(0.02)
        await fake.wait(lambda: bool(fake.messages(1)))
        assert connections(fake.streams[1][0]) == {"a": (2, 0)}


# -- watch ----------------------------------------------------------------------------


async def test_watch_sees_registrations(static_daemon: DaemonThread) -> None:
    async with Client(api(static_daemon)) as client:
        events = client.watch("user-service")
        async with asyncio.timeout(2):
            first = await anext(events)
        assert first.service == "user-service"
        assert [e.id for e in first.endpoints] == ["user-service-1", "user-service-2"]
        assert first.registered == ("user-service-1", "user-service-2")

        revision = await client.register(
            id="user-service-3", name="user-service", address="10.0.1.12", port=8080
        )
        async with asyncio.timeout(2):
            event = await anext(events)
        assert event.registered == ("user-service-3",)
        assert event.deregistered == () and event.updated == ()
        assert event.revision == revision
        assert "user-service-3" in [e.id for e in event.endpoints]

        await client.deregister("user-service-3")
        async with asyncio.timeout(2):
            event = await anext(events)
        assert event.deregistered == ("user-service-3",)
        await events.aclose()


# -- registrations and status ---------------------------------------------------------


async def test_register_deregister_list_and_health(static_daemon: DaemonThread) -> None:
    async with Client(api(static_daemon)) as client:
        r1 = await client.register(
            id="orders-1",
            name="orders",
            address="10.0.2.1",
            port=9000,
            version="2.0.0",
            tags=["blue"],
            metadata={"weight": "3"},
        )
        r2 = await client.register(
            id="orders-2", name="orders", address="10.0.2.2", port=9000, health=Health.CRITICAL
        )
        assert r2 > r1

        res = await client.resolve("orders")
        assert [e.id for e in res.endpoints] == ["orders-1"]  # critical is not servable
        ep = res.first
        assert (ep.address, ep.port, ep.version, ep.tags) == ("10.0.2.1", 9000, "2.0.0", ("blue",))
        assert dict(ep.metadata) == {"weight": "3"} and ep.provider == "registrations"

        listed = await client.list_services()
        assert set(listed) == {"user-service", "orders"}
        assert {e.id: e.health for e in listed["orders"]} == {
            "orders-1": Health.HEALTHY,
            "orders-2": Health.CRITICAL,
        }
        assert await client.health_status() == {
            "orders": {"total": 2, "healthy": 1, "unhealthy": 0, "critical": 1},
            "user-service": {"total": 2, "healthy": 2, "unhealthy": 0, "critical": 0},
        }

        r3 = await client.deregister("orders-1")
        r4 = await client.deregister("orders-2")
        assert r4 > r3 > r2
        with pytest.raises(ResolverError) as err:
            await client.resolve("orders")
        assert err.value.code is grpc.StatusCode.NOT_FOUND
        with pytest.raises(ResolverError) as err:
            await client.deregister("orders-1")
        assert err.value.code is grpc.StatusCode.NOT_FOUND
        assert "orders" not in await client.list_services()


async def test_token(start_daemon: Start) -> None:
    data = load_example("static.yaml")
    data["api"] = {"token": "s3cret"}
    d = start_daemon(data)
    async with Client(api(d)) as anonymous, Client(api(d), token="s3cret") as trusted:
        assert (await anonymous.resolve("user-service")).endpoints  # reads need no token
        with pytest.raises(ResolverError) as err:
            await anonymous.register(id="x-1", name="x", address="10.0.0.1", port=80)
        assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
        assert await trusted.register(id="x-1", name="x", address="10.0.0.1", port=80) > 0
        assert await trusted.deregister("x-1") > 0


# -- the CLI --------------------------------------------------------------------------


def cli(d: DaemonThread, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RESOLVERD, *args, "--api", api(d)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **env},
    )


def test_cli_resolve(static_daemon: DaemonThread) -> None:
    out = cli(static_daemon, "resolve", "user-service")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "1  user-service-1  10.0.1.10:8080  v1.2.0  healthy  weight=10  [production,primary]",
        "2  user-service-2  10.0.1.11:8080  v1.2.0  healthy  weight=5   [production,secondary]",
    ]
    out = cli(static_daemon, "resolve", "user-service", "--tag", "secondary", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [e["id"] for e in data["endpoints"]] == ["user-service-2"]
    assert data["endpoints"][0]["metadata"]["region"] == "us-east-1"
    assert data["ttl"] == 5

    out = cli(static_daemon, "resolve", "nope")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("resolverd: NOT_FOUND: ") and "nope" in out.stderr


def test_cli_status(static_daemon: DaemonThread) -> None:
    out = cli(static_daemon, "status")
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert lines[:3] == [
        ["SERVICE", "TOTAL", "HEALTHY", "UNHEALTHY", "CRITICAL"],
        ["user-service", "2", "2", "0", "0"],
        [],
    ]
    assert lines[3] == ["PROVIDER", "TYPE", "STATE", "INSTANCES", "AGE", "ERROR"]
    assert [row[:4] for row in lines[4:]] == [
        ["static", "static", "synced", "2"],
        ["registrations", "registrations", "synced", "0"],
    ]
    out = cli(static_daemon, "status", "--json")
    data = json.loads(out.stdout)
    assert data["services"] == {
        "user-service": {"total": 2, "healthy": 2, "unhealthy": 0, "critical": 0}
    }
    assert [(p["name"], p["synced"], p["stale"]) for p in data["providers"]] == [
        ("static", True, False),
        ("registrations", True, False),
    ]


def test_cli_register_and_deregister(start_daemon: Start) -> None:
    data = load_example("static.yaml")
    data["api"] = {"token": "s3cret"}
    d = start_daemon(data)
    args = ["register", "--id", "pay-1", "--name", "payment-service", "--address", "10.0.3.1"]
    args += ["--port", "7000", "--version", "3.1.0", "--tag", "eu", "--tag", "canary"]
    args += ["--meta", "region=eu-west-1", "--health", "unhealthy"]

    out = cli(d, *args)
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
    out = cli(d, *args, RESOLVERD_TOKEN="s3cret")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("registered pay-1 (revision ")

    status = cli(d, "status", "--json")
    assert json.loads(status.stdout)["services"]["payment-service"] == {
        "total": 1,
        "healthy": 0,
        "unhealthy": 1,
        "critical": 0,
    }
    out = cli(d, "deregister", "pay-1", "--token", "s3cret")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("deregistered pay-1 (revision ")
    out = cli(d, "deregister", "pay-1", "--token", "s3cret")
    assert out.returncode == 1 and out.stderr.startswith("resolverd: NOT_FOUND: ")

    bad = subprocess.run(
        [*RESOLVERD, *args[:-2], "--meta", "no-equals"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
