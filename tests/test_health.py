"""Active health checks: the pure state machine, the schedule on a fake clock,
the real probes against real servers on 127.0.0.x, and the daemon end to end
(what dig returns as instances fail and recover). Only loopback is probed."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
import pytest
import structlog
from aiohttp import web

from resolverd.api.v1 import resolver_pb2 as pb
from resolverd.api.v1 import resolver_pb2_grpc as pb_grpc
from resolverd.config import CheckType, Config, ConfigError, HealthCheckConfig, parse_config
from resolverd.health import (
    CheckState,
    HealthChecker,
    ProbeResult,
    classify_status,
    evaluate,
    final_status,
    http_request,
    overlay,
    probe_instance,
)
from resolverd.model import Health, Instance
from resolverd.table import Change, ServiceTable
from tests.conftest import DaemonThread, need
from tests.test_dns import D, addresses, ask, services

T = TypeVar("T")
Start = Callable[[dict[str, Any]], DaemonThread]
H, U, C = Health.HEALTHY, Health.UNHEALTHY, Health.CRITICAL

# --------------------------------------------------------------------------- pure evaluation


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, H),
        (204, H),
        (299, H),
        (301, U),  # redirects are not followed: "other status"
        (302, U),
        (304, U),
        (404, U),
        (429, U),
        (500, U),
        (503, U),
    ],
)
def test_status_mapping(status: int, expected: Health) -> None:
    assert classify_status(status) is expected


def r(health: Health) -> ProbeResult:
    return ProbeResult(health, health.value)


@pytest.mark.parametrize(
    ("start", "results", "expected"),
    [
        # Nothing is decided before a threshold: the provider is trusted.
        (None, [H], [None]),
        (None, [H, H], [None, H]),
        (None, [U, U, U], [None, None, U]),
        (None, [C, C, C], [None, None, C]),
        # The failure that reaches the threshold decides which failing state.
        (None, [U, U, C], [None, None, C]),
        (None, [C, C, U], [None, None, U]),
        # Runs must be consecutive: a success restarts the failure count.
        (H, [U, U, H, U, U], [H, H, H, H, H]),
        (H, [U, U, H, U, U, U], [H, H, H, H, H, U]),
        (U, [H, U, H, H], [U, U, U, H]),
        # Already failing: every further failure reports its own kind.
        (U, [U, U, U, C], [U, U, U, C]),
        (C, [C, C, C, U], [C, C, C, U]),
    ],
)
def test_evaluate_thresholds(
    start: Health | None, results: list[Health], expected: list[Health | None]
) -> None:
    # A state reached earlier had its run of agreeing results.
    state = CheckState(start)
    if start is H:
        state = CheckState(H, successes=2)
    elif start is not None:
        state = CheckState(start, failures=3)
    got = []
    for health in results:
        state = evaluate(state, r(health), healthy_threshold=2, unhealthy_threshold=3)
        got.append(state.health)
    assert got == expected


def test_evaluate_threshold_one_flips_every_time() -> None:
    state = CheckState()
    seen = []
    for health in (U, H, C, H):
        state = evaluate(state, r(health), healthy_threshold=1, unhealthy_threshold=1)
        seen.append(state.health)
    assert seen == [U, H, C, H]


def test_counters_stay_bounded() -> None:
    state = CheckState()
    for _ in range(1000):
        state = evaluate(state, r(H), healthy_threshold=2, unhealthy_threshold=3)
    assert state == CheckState(H, successes=2, failures=0)


@pytest.mark.parametrize(("health", "expected"), [(None, None), (H, None), (U, U), (C, C)])
def test_overlay_only_carries_failures(health: Health | None, expected: Health | None) -> None:
    assert overlay(health) is expected


@pytest.mark.parametrize(
    ("address", "host"),
    [("127.0.0.2", "127.0.0.2:8080"), ("::1", "[::1]:8080"), ("web.local", "web.local:8080")],
)
def test_host_header(address: str, host: str) -> None:
    assert f"\r\nHost: {host}\r\n".encode() in http_request(address, 8080, "/health")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"HTTP/1.1 200 OK", None),  # the line is not complete yet
        (b"HTTP/1.1 200 OK\r\n", 200),
        (b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", 503),
        (b"HTTP/1.1 204\r\n", 204),  # the reason phrase is optional
        (b"HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n", 302),
        # Interim responses are skipped; the final one counts.
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n", 200),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 500 Oops\r\n", 500),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n", None),
    ],
)
def test_final_status(data: bytes, expected: int | None) -> None:
    assert final_status(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/2 200\r\n",
        b"HTTP/1.1 2000 OK\r\n",
        b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\r\n",  # an HTTP/2 SETTINGS frame
        b"x" * 5000,  # no line end within the limit
    ],
)
def test_final_status_rejects_non_http(data: bytes) -> None:
    with pytest.raises(ValueError):
        final_status(data)


def test_http_request() -> None:
    assert http_request("::1", 8080, "/health check?x=ü") == (
        b"GET /health%20check?x=%C3%BC HTTP/1.1\r\nHost: [::1]:8080\r\n"
        b"User-Agent: resolverd-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )


# --------------------------------------------------------------------------- config


def cfg(sd: dict[str, Any], **top: Any) -> Config:
    return parse_config({"service_discovery": sd, **top}, file="hc.yaml")


def test_config_defaults_and_seed_shape() -> None:
    # The seed's section still loads; everything else has the documented defaults.
    config = cfg({"provider": "static", "health_check": {"interval": "10s", "timeout": "5s"}})
    assert config.health_check == HealthCheckConfig()
    hc = config.health_check
    assert (hc.enabled, hc.type, hc.path, hc.interval, hc.timeout) == (
        False,
        CheckType.HTTP,
        "/health",
        10.0,
        5.0,
    )
    assert (hc.healthy_threshold, hc.unhealthy_threshold, hc.concurrency, hc.jitter) == (
        2,
        3,
        100,
        0.1,
    )
    assert config.health_checks_enabled is False


def test_config_most_specific_wins() -> None:
    config = cfg(
        {
            "providers": [
                {"type": "static", "name": "local", "health_check": {"enabled": True}},
                {"type": "static", "name": "remote"},
                {"type": "static", "name": "tcp", "health_check": {"type": "tcp"}},
            ],
            "health_check": {"interval": "2s", "concurrency": 7, "path": "/ready"},
        },
        load_balancing={
            "strategies": {
                "Api": {"algorithm": "weighted", "health_check": {"path": "/live"}},
                "batch": {"health_check": {"enabled": False}},
                "ping": {"health_check": {"enabled": True, "unhealthy_threshold": 1}},
            }
        },
    )
    local = config.health_check_for("local", "web")
    assert (local.enabled, local.interval, local.path, local.concurrency) == (
        True,
        2.0,
        "/ready",
        7,
    )
    assert config.health_check_for("remote", "web").enabled is False
    assert config.health_check_for("registrations", "web") == config.health_check
    # The strategy's keys go over the provider entry's, which go over the default.
    api = config.health_check_for("local", "api.")
    assert (api.enabled, api.path, api.interval) == (True, "/live", 2.0)
    assert config.health_check_for("local", "batch").enabled is False
    ping = config.health_check_for("remote", "ping")
    assert (ping.enabled, ping.unhealthy_threshold, ping.path) == (True, 1, "/ready")
    tcp = config.health_check_for("tcp", "web")
    assert (tcp.type, tcp.enabled) == (CheckType.TCP, False)
    # health_check is not a balancing key: the strategy is otherwise untouched.
    assert config.policy_for("api").algorithm.value == "weighted"
    assert config.health_checks_enabled is True


def test_only_a_service_strategy_enables() -> None:
    config = cfg(
        {"provider": "static"},
        load_balancing={"strategies": {"web": {"health_check": {"enabled": True}}}},
    )
    assert config.health_checks_enabled is True
    assert config.health_check_for("static", "web").enabled is True
    assert config.health_check_for("static", "other").enabled is False


@pytest.mark.parametrize(
    ("sd", "top", "error"),
    [
        (
            {"provider": "static", "health_check": {"type": "icmp"}},
            {},
            "service_discovery.health_check.type: 'icmp' is not one of http, tcp",
        ),
        (
            {"provider": "static", "health_check": {"healthy_threshold": 0}},
            {},
            "service_discovery.health_check.healthy_threshold: 0 is out of range (1..100)",
        ),
        (
            {"provider": "static", "health_check": {"jitter": 1.5}},
            {},
            "service_discovery.health_check.jitter: 1.5 is not a fraction (0..1)",
        ),
        (
            {"provider": "static", "health_check": {"timeout": "0s"}},
            {},
            "service_discovery.health_check.timeout: '0s' must be longer than zero",
        ),
        (
            {"provider": "static", "health_check": {"path": "health"}},
            {},
            "service_discovery.health_check.path: 'health' does not start with /",
        ),
        (
            {"providers": [{"type": "static"}, {"type": "static", "health_check": {"intrval": 1}}]},
            {},
            "service_discovery.providers[1].health_check.intrval: unknown key",
        ),
        (
            {"providers": [{"type": "static", "health_check": {"concurrency": 5}}]},
            {},
            "service_discovery.providers[0].health_check.concurrency: only valid in "
            "service_discovery.health_check (one cap for all probes)",
        ),
        (
            {"provider": "static"},
            {"load_balancing": {"strategies": {"web": {"health_check": {"enabled": "yes"}}}}},
            "load_balancing.strategies.web.health_check.enabled: expected true or false, got 'yes'",
        ),
        (
            {"provider": "static"},
            {"load_balancing": {"strategies": {"web": {"health_check": []}}}},
            "load_balancing.strategies.web.health_check: expected a mapping, got a list",
        ),
    ],
)
def test_config_errors_located(sd: dict[str, Any], top: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(sd, **top)
    assert str(info.value) == f"hc.yaml: {error}"


# --------------------------------------------------------------------------- schedule (fake clock)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeProbe:
    """Answers from `answers` by instance id; records (time, id) of every call."""

    def __init__(self, clock: Clock, answers: dict[str, Health]) -> None:
        self.clock = clock
        self.answers = answers
        self.calls: list[tuple[float, str]] = []

    async def __call__(self, inst: Instance, config: HealthCheckConfig) -> ProbeResult:
        self.calls.append((self.clock.t, inst.id))
        return r(self.answers.get(inst.id, H))


class Middle(random.Random):
    """No randomness: the first probe mid-interval, no jitter."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def table_with(*instances: Instance) -> ServiceTable:
    table = ServiceTable(order=["static"])
    table.replace("static", instances)
    return table


def web_instance(i: int, **extra: Any) -> Instance:
    fields: dict[str, Any] = {"address": f"127.0.0.{i}", "port": 8000 + i, **extra}
    return Instance(id=f"web-{i}", name="web", **fields)


def checked(interval: str = "10s", **hc: Any) -> Config:
    return cfg(
        {
            "provider": "static",
            "health_check": {
                "enabled": True,
                "interval": interval,
                "healthy_threshold": 2,
                "unhealthy_threshold": 3,
                **hc,
            },
        }
    )


async def advance(checker: HealthChecker, clock: Clock, until: float) -> None:
    """Run every probe due up to `until`, each at its due time, then stop there."""
    while True:
        due = await checker.tick()
        await checker.drain()
        if due is None or due > until:
            break
        clock.t = due
    clock.t = until
    await checker.tick()
    await checker.drain()


async def test_first_probes_spread_then_every_interval() -> None:
    clock = Clock()
    table = table_with(*(web_instance(i) for i in range(1, 201)))
    probe = FakeProbe(clock, {})
    checker = HealthChecker(
        table, checked(), clock=clock, probe=probe, rng=random.Random(7), commit_interval=0
    )
    await advance(checker, clock, 10.0)
    first: dict[str, float] = {}
    for t, i in probe.calls:
        first.setdefault(i, t)
    assert len(first) == 200  # every instance once in the first interval
    per_second = [sum(1 for t in first.values() if s <= t < s + 1) for s in range(10)]
    assert min(per_second) >= 5 and max(per_second) <= 40, per_second  # spread, not a burst
    await advance(checker, clock, 40.0)
    by_id: dict[str, list[float]] = {}
    for t, i in probe.calls:
        by_id.setdefault(i, []).append(t)
    gaps = [b - a for times in by_id.values() for a, b in itertools.pairwise(times)]
    assert gaps and all(9.0 <= g <= 11.0 for g in gaps)  # interval +- 10% jitter
    assert {round(g, 3) for g in gaps} != {10.0}  # and it does vary


async def test_thresholds_drive_the_table_one_change_per_batch() -> None:
    clock = Clock()
    table = table_with(web_instance(1), web_instance(2), web_instance(3))
    changes: list[Change] = []
    table.subscribe(lambda view, change: changes.append(change))
    probe = FakeProbe(clock, {"web-2": U, "web-3": C})
    # Every instance due at the same moments (0.5, 1.5, ...): one batch per round.
    checker = HealthChecker(
        table, checked(interval="1s"), clock=clock, probe=probe, rng=Middle(), commit_interval=0
    )

    def health() -> dict[str, Health]:
        return {i.id: i.health for i in table.view.instances("web")}

    with structlog.testing.capture_logs() as logs:
        await advance(checker, clock, 2.0)  # two failures each: below the threshold
        assert health() == {"web-1": H, "web-2": H, "web-3": H}
        assert changes == []
        await advance(checker, clock, 3.0)  # the third failure flips both
        assert health() == {"web-1": H, "web-2": U, "web-3": C}
        assert checker.state("static", "web-2") == CheckState(U, 0, 3)
        probe.answers["web-2"] = H
        await advance(checker, clock, 4.0)  # one success is not enough
        assert health()["web-2"] is U
        await advance(checker, clock, 5.0)
        assert health() == {"web-1": H, "web-2": H, "web-3": C}
        await advance(checker, clock, 8.0)  # nothing changes: no table change, no log
    assert len(changes) == 2  # one per batch of state changes
    changed = [
        (e["instance"], e["old"], e["new"])
        for e in logs
        if e["event"] == "health.changed" and e["log_level"] == "info"
    ]
    assert changed == [  # once per change; unknown -> healthy (web-1) is not news
        ("web-2", "unknown", "unhealthy"),
        ("web-3", "unknown", "critical"),
        ("web-2", "unhealthy", "healthy"),
    ]


async def turns(n: int = 5) -> None:
    """Let the loop run `n` turns (no time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_changes_batched_per_loop_turn_and_spaced_in_bursts() -> None:
    clock = Clock()
    table = table_with(web_instance(1), web_instance(2), web_instance(3))
    changes: list[Change] = []
    table.subscribe(lambda view, change: changes.append(change))
    probe = FakeProbe(clock, {f"web-{i}": C for i in range(1, 6)})
    checker = HealthChecker(
        table,
        checked(interval="1s", unhealthy_threshold=1),
        clock=clock,
        probe=probe,
        rng=Middle(),
        commit_interval=3600,
    )
    await checker.tick()  # scheduled: first probes at 0.5
    clock.t = 0.5
    await checker.tick()  # three probes start; they fail on the next turn
    await turns()
    # The first change after a quiet spell goes out at once, all three in one.
    assert len(changes) == 1
    assert {i.id for i in changes[0].updated} == {"web-1", "web-2", "web-3"}
    table.replace("static", [web_instance(i) for i in range(1, 6)])
    changes.clear()
    clock.t = 1.0
    await checker.tick()  # web-4 and web-5 join (first probes at 1.5)
    clock.t = 1.5
    await checker.tick()
    await turns()
    assert changes == []  # within the commit interval: held back ...
    checker.flush()  # ... until it has passed (here: forced)
    assert [{i.id for i in c.updated} for c in changes] == [{"web-4", "web-5"}]


async def test_instances_leaving_and_arriving() -> None:
    clock = Clock()
    table = table_with(web_instance(1), web_instance(2))
    probe = FakeProbe(clock, {"web-1": C, "web-2": C, "web-3": C})
    checker = HealthChecker(
        table,
        checked(interval="1s", unhealthy_threshold=1),
        clock=clock,
        probe=probe,
        rng=random.Random(3),
        commit_interval=0,
    )
    await advance(checker, clock, 1.0)
    assert {i.id: i.health for i in table.view.instances("web")} == {"web-1": C, "web-2": C}
    # web-2 leaves, web-3 arrives, web-1 moves to a new port (a new target: start over).
    table.replace("static", [web_instance(1, port=9999), web_instance(3)])
    await advance(checker, clock, 1.0)
    assert {i.id: i.health for i in table.view.instances("web")} == {"web-1": H, "web-3": H}
    assert checker.instances == 2
    assert checker.state("static", "web-2") is None
    await advance(checker, clock, 2.0)
    assert {i.id: i.health for i in table.view.instances("web")} == {"web-1": C, "web-3": C}
    # Back with the same id: its old failures are forgotten too.
    table.replace("static", [web_instance(1, port=9999), web_instance(2), web_instance(3)])
    assert table.view.by_id["web-2"].health is H


async def test_concurrency_cap() -> None:
    clock = Clock()
    table = table_with(*(web_instance(i) for i in range(1, 11)))
    release = asyncio.Event()
    running = 0
    peak = 0

    async def probe(inst: Instance, config: HealthCheckConfig) -> ProbeResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return r(H)

    checker = HealthChecker(
        table, checked(interval="1s", concurrency=3), clock=clock, probe=probe, commit_interval=0
    )
    await checker.tick()
    clock.t = 1.0
    tick = asyncio.create_task(checker.tick())
    for _ in range(20):  # let the loop run: the scheduler is parked on the cap
        await asyncio.sleep(0)
    assert (running, peak, tick.done()) == (3, 3, False)
    release.set()
    await tick
    await checker.drain()
    assert peak == 3
    assert all(checker.state("static", f"web-{i}") == CheckState(None, 1, 0) for i in range(1, 11))


async def test_disabled_provider_is_not_probed() -> None:
    clock = Clock()
    config = cfg(
        {
            "providers": [
                {"type": "static", "name": "local", "health_check": {"enabled": True}},
                {"type": "static", "name": "remote"},
            ]
        }
    )
    table = ServiceTable(order=["local", "remote"])
    table.replace("local", [web_instance(1)])
    table.replace("remote", [Instance(id="far", name="web", address="10.0.1.10", port=8080)])
    probe = FakeProbe(clock, {})
    checker = HealthChecker(table, config, clock=clock, probe=probe, commit_interval=0)
    await advance(checker, clock, 30.0)
    assert {i for _, i in probe.calls} == {"web-1"}


async def test_prober_exception_is_critical_not_fatal() -> None:
    clock = Clock()
    table = table_with(web_instance(1))

    async def probe(inst: Instance, config: HealthCheckConfig) -> ProbeResult:
        raise RuntimeError("boom")

    checker = HealthChecker(
        table,
        checked(interval="1s", unhealthy_threshold=1),
        clock=clock,
        probe=probe,
        commit_interval=0,
    )
    await advance(checker, clock, 1.0)
    assert table.view.by_id["web-1"].health is C


# --------------------------------------------------------------------------- real probes


class Backend:
    """An aiohttp server on a 127.0.0.x address answering GET /health with `status`."""

    def __init__(self, host: str, status: int = 200) -> None:
        self.host = host
        self.status = status
        self.port = 0
        self.hits = 0
        self._runner: web.AppRunner | None = None

    async def _health(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.status in (301, 302):
            raise web.HTTPFound("/elsewhere")
        return web.Response(status=self.status, text="ok")

    async def start(self) -> Backend:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/elsewhere", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def closed_port(host: str) -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def target(host: str, port: int) -> Instance:
    return Instance(id=f"{host}:{port}", name="web", address=host, port=port)


async def raw_server(host: str, reply: bytes | None) -> tuple[asyncio.Server, int]:
    """Reads a request head, then writes `reply` (None: never answers) and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if reply is None:
            await reader.read()  # until the prober gives up
        else:
            writer.write(reply)
        writer.close()

    server = await asyncio.start_server(handle, host, 0)
    return server, int(server.sockets[0].getsockname()[1])


async def test_http_and_tcp_probes_against_real_servers() -> None:
    ok = await Backend("127.0.0.2", 200).start()
    bad = await Backend("127.0.0.3", 500).start()
    moved = await Backend("127.0.0.5", 302).start()
    mute, mute_port = await raw_server("127.0.0.6", None)
    hints, hints_port = await raw_server(
        "127.0.0.7", b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    )
    ssh, ssh_port = await raw_server("127.0.0.8", b"SSH-2.0-OpenSSH_9.6\r\n")
    hangup, hangup_port = await raw_server("127.0.0.9", b"")
    refused = closed_port("127.0.0.4")
    http = HealthCheckConfig(enabled=True, timeout=0.3)
    tcp = HealthCheckConfig(enabled=True, timeout=0.3, type=CheckType.TCP)
    try:
        results = await asyncio.gather(
            probe_instance(target("127.0.0.2", ok.port), http),
            probe_instance(target("127.0.0.3", bad.port), http),
            probe_instance(target("127.0.0.5", moved.port), http),
            probe_instance(target("127.0.0.7", hints_port), http),
            probe_instance(target("127.0.0.4", refused), http),
            probe_instance(target("127.0.0.6", mute_port), http),
            probe_instance(target("127.0.0.8", ssh_port), http),
            probe_instance(target("127.0.0.9", hangup_port), http),
            # TCP only connects: a server answering 500 passes.
            probe_instance(target("127.0.0.3", bad.port), tcp),
            probe_instance(target("127.0.0.4", refused), tcp),
        )
    finally:
        for server in (mute, hints, ssh, hangup):
            server.close()
        for b in (ok, bad, moved):
            await b.stop()
    assert [(x.health, x.reason) for x in results] == [
        (H, "HTTP 200"),
        (U, "HTTP 500"),
        (U, "HTTP 302"),  # redirects are not followed
        (H, "HTTP 204"),
        (C, "connection refused"),
        (C, "timed out after 0.3s"),
        (C, "not an HTTP/1.x response"),
        (C, "closed before a response"),
        (H, "connected"),
        (C, "connection refused"),
    ]
    assert (ok.hits, bad.hits, moved.hits) == (1, 1, 1)  # the TCP check sent nothing


# --------------------------------------------------------------------------- the daemon end to end


class Backends:
    """Backend servers on their own loop thread, apart from the daemon's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.started: list[Backend] = []
        self._servers: list[asyncio.Server] = []

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        future: Future[T] = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)
        return future.result(timeout=10)

    def http(self, host: str, status: int = 200) -> Backend:
        backend = self.run(Backend(host, status).start())
        self.started.append(backend)
        return backend

    def tcp(self, host: str) -> int:
        async def listen() -> int:
            async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.close()

            server = await asyncio.start_server(close, host, 0)
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        return self.run(listen())

    def close(self) -> None:
        for backend in self.started:
            self.run(backend.stop())
        for server in self._servers:
            server.close()
        self._servers.clear()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def backends() -> Iterator[Backends]:
    b = Backends()
    yield b
    b.close()


# A 1 s timeout, not 200 ms: on a loaded 2-core CI box three threads share the
# GIL (daemon, backends, test) and a healthy backend can miss 200 ms. Timeouts
# themselves are covered by test_http_and_tcp_probes_against_real_servers.
FAST = {
    "enabled": True,
    "interval": "100ms",
    "timeout": "1s",
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
}


def with_checks(data: dict[str, Any], **hc: Any) -> dict[str, Any]:
    data["service_discovery"]["health_check"] = {**FAST, **hc}
    return data


def member(i: int, host: str, port: int, name: str = "web", **extra: Any) -> dict[str, Any]:
    return {"id": f"{name}-{i}", "name": name, "address": host, "port": port, **extra}


def eventually(fn: Callable[[], T], expected: T, *, timeout: float = 5.0) -> None:
    """Poll (bounded) until fn() == expected; DNS answers follow a table change at once."""
    deadline = time.monotonic() + timeout
    got = fn()
    while got != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"still {got!r}, expected {expected!r}")
        time.sleep(0.02)
        got = fn()


def served(d: DaemonThread, name: str = "web") -> list[str]:
    return sorted(addresses(ask(d, f"{name}.{D}")))


def dig_short(d: DaemonThread, name: str = "web") -> list[str]:
    out = subprocess.run(
        [need("dig"), "@127.0.0.1", "-p", str(d.udp[1]), "A", f"{name}.{D}", "+short"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return sorted(out.split())


def checked_health(d: DaemonThread, provider: str, instance: str) -> Health | None:
    assert d.daemon.health is not None
    health = d.daemon.health
    state = d.call(lambda: health.state(provider, instance))
    return None if state is None else state.health


def test_dig_follows_probes(start_daemon: Start, backends: Backends) -> None:
    ok = backends.http("127.0.0.2", 200)
    flaky = backends.http("127.0.0.3", 500)
    down = closed_port("127.0.0.4")
    d = start_daemon(
        with_checks(
            services(
                member(1, "127.0.0.2", ok.port),
                member(2, "127.0.0.3", flaky.port),
                member(3, "127.0.0.4", down),
            )
        )
    )
    # 500 -> unhealthy, not listening -> critical; both leave the answers.
    eventually(lambda: dig_short(d), ["127.0.0.2"])
    eventually(lambda: checked_health(d, "static", "web-2"), U)
    eventually(lambda: checked_health(d, "static", "web-3"), C)
    view = d.call(lambda: d.daemon.table.view)
    assert {i.id: i.health for i in view.instances("web")} == {"web-1": H, "web-2": U, "web-3": C}
    # The server recovers: back in the answers after two good probes.
    flaky.status = 200
    eventually(lambda: served(d), ["127.0.0.2", "127.0.0.3"])
    assert dig_short(d) == ["127.0.0.2", "127.0.0.3"]
    # And fails again.
    flaky.status = 503
    eventually(lambda: served(d), ["127.0.0.2"])


def test_provider_unhealthy_wins_over_a_good_probe(start_daemon: Start, backends: Backends) -> None:
    a = backends.http("127.0.0.2", 200)
    b = backends.http("127.0.0.3", 200)
    d = start_daemon(
        with_checks(
            services(
                member(1, "127.0.0.2", a.port), member(2, "127.0.0.3", b.port, health="unhealthy")
            )
        )
    )
    eventually(lambda: checked_health(d, "static", "web-2"), H)  # the probe says up ...
    assert served(d) == ["127.0.0.2"]  # ... the provider says down: not served
    assert d.call(lambda: d.daemon.table.view.by_id["web-2"].health) is U


def test_tcp_checks_per_service(start_daemon: Start, backends: Backends) -> None:
    listening = backends.tcp("127.0.0.2")
    down = closed_port("127.0.0.3")
    ok = backends.http("127.0.0.4", 500)  # HTTP would fail it; TCP only connects
    data = services(
        member(1, "127.0.0.2", listening, name="db"),
        member(2, "127.0.0.3", down, name="db"),
        member(3, "127.0.0.4", ok.port, name="db"),
        member(4, "127.0.0.4", ok.port, name="web"),
    )
    data["service_discovery"]["health_check"] = {**FAST, "enabled": False}
    data["load_balancing"] = {
        "strategies": {
            "db": {"health_check": {**FAST, "type": "tcp"}},
            "web": {"health_check": {**FAST, "path": "/health"}},
        }
    }
    d = start_daemon(data)
    # The table follows the checker's state within one batch (<= 50 ms): poll DNS.
    eventually(lambda: served(d, "db"), ["127.0.0.2", "127.0.0.4"])
    eventually(lambda: served(d, "web"), [])
    assert checked_health(d, "static", "db-2") is C
    assert checked_health(d, "static", "web-4") is U
    eventually(lambda: checked_health(d, "static", "db-1"), H)
    eventually(lambda: checked_health(d, "static", "db-3"), H)


def test_checks_off_by_default_and_for_the_seed_example(static_daemon: DaemonThread) -> None:
    # The seed's 10.0.1.x example: no checker, no task, so no probe can be sent.
    assert static_daemon.daemon.config.health_checks_enabled is False
    assert static_daemon.daemon.health is None
    names = static_daemon.call(lambda: {t.get_name() for t in asyncio.all_tasks()})
    assert "health-checker" not in names
    assert not any(n.startswith("health-probe:") for n in names)
    config = static_daemon.daemon.config
    assert config.health_check_for("static", "user-service").enabled is False


def test_checker_runs_as_a_named_task_and_stops(start_daemon: Start, backends: Backends) -> None:
    ok = backends.http("127.0.0.2", 200)
    d = start_daemon(with_checks(services(member(1, "127.0.0.2", ok.port))))
    names = d.call(lambda: {t.get_name() for t in asyncio.all_tasks()})
    assert "health-checker" in names
    eventually(lambda: ok.hits >= 2, True)
    d.close()
    hits = ok.hits
    assert d.loop.is_closed()
    assert ok.hits == hits  # nothing probes after stop


async def test_grpc_watch_sees_the_change(start_daemon: Start, backends: Backends) -> None:
    flaky = backends.http("127.0.0.3", 200)
    steady = backends.http("127.0.0.2", 200)
    d = start_daemon(
        with_checks(
            services(member(1, "127.0.0.3", flaky.port), member(2, "127.0.0.2", steady.port))
        )
    )
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        stream = pb_grpc.ResolverStub(channel).Watch(pb.WatchRequest(service="web"))
        first = await asyncio.wait_for(stream.read(), 5)
        assert [e.health for e in first.endpoints] == [pb.HEALTH_HEALTHY] * 2
        flaky.status = 500
        change = await asyncio.wait_for(stream.read(), 5)
        assert list(change.updated) == ["web-1"]
        assert [e.health for e in change.endpoints] == [pb.HEALTH_UNHEALTHY, pb.HEALTH_HEALTHY]
        flaky.status = 200
        change = await asyncio.wait_for(stream.read(), 5)
        assert list(change.updated) == ["web-1"]
        assert [e.health for e in change.endpoints] == [pb.HEALTH_HEALTHY] * 2
        stream.cancel()
