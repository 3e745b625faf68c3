"""Benchmark resolverd's gRPC API against empty handlers on the same server.

What it measures, in one run on 127.0.0.1:

1. ``Resolve`` calls per second next to an empty unary handler
   (``bench.Empty/Unary``) served by the same grpc.aio server. The empty
   handler takes the same request (ResolveRequest bytes, deserialized) and
   returns an empty ResolveResponse, so its rate is the framework's ceiling on
   this machine: what grpc.aio, protobuf and the event loop cost per call with
   no application work. Target: Resolve >= 0.8x the empty handler's calls/s.
2. ``Report`` connection events per second through client streaming with
   batching: every ReportRequest carries ``--events`` ConnectionEvents (100)
   over ``--report-instances`` instances (10), and the messages of a stream
   alternate between a batch that opens one connection per event and a batch
   that closes them, so the server's connection tracker changes on every
   message. Target: >= 100,000 connection events/s. Report messages/s is shown
   next to an empty client-streaming handler (``bench.Empty/Stream``, which
   deserializes the same ReportRequests and returns an empty ReportResponse).

How: the server is this script with ``--serve``: resolverd's Daemon on uvloop,
the API on 127.0.0.1:0 (the bound port is printed on stdout), DNS on
127.0.0.1:0 (unused), a static provider with 100 services x 3 instances
(addresses 127.1.<i>.<j>: answer data only, never contacted), round robin, and
the two empty handlers passed as ``extra_rpc_handlers``. Each test runs in a
fresh load generator process (this script with ``--load TEST``): grpc.aio on
uvloop, ``--concurrency`` calls in flight (64) spread over ``--channels``
HTTP/2 connections (2; separate subchannel pools so they really are separate
connections), a warm-up, then a timed run. To keep the client cheap, requests
are serialized once up front and sent as bytes, and responses arrive as bytes.
Every Resolve response of the timed run is still parsed and checked: 3
endpoints, the requested service's instances. Requests cycle over the 100
services. Before the Resolve load every service is resolved three times and
checked in full (addresses, port, TTL, round-robin rotation of the first
endpoint); after the Report load the reported instances must show no open
connections (a stream's connections are released when it ends). A Report
stream's ReportResponse must count every event sent on it and release what
the stream left open.

With ``taskset`` and at least two CPUs the server is pinned to CPU 0 and the
load generators to CPU 1. CPU use is measured over each timed run: the server's
from /proc/<pid>/stat (all threads), the client's with getrusage in the load
generator. A server near 100% is saturated; a client near 100% means the load
generator is at its limit and the server might go faster with a faster client.
The "per server CPU-second" rates (calls or messages divided by the server's CPU
seconds) are shown too: when the client is the bottleneck the Resolve/empty
target is judged on those instead of the measured rates. They are not fully
independent of the client either: a slower client means less batching, and
the server spends more CPU per call.

Other processes on the same CPUs distort all of this, so the tests run
``--rounds`` times (3), interleaved (empty, Resolve, empty stream, Report,
empty, ...), and the fastest round of each test that no other process
disturbed is the one shown and judged. "Disturbed" means that, going by
/proc/stat, other processes (or the hypervisor: steal) took >= 10% of the
server's or the client's CPU (5% steal) during the timed run; when every round
of a test was disturbed the fastest is shown with a WARNING.

Latency (unary tests) is per call, from the load generator, nearest-rank
percentiles over every call completed in the timed run; at saturation it is
mostly queueing (about concurrency / qps). Stream rates count messages from
the start of the timed run until the last stream's response arrived (the
response comes after the server consumed the whole stream).

``--profile`` also runs cProfile in the server during each timed run (it slows
the server down, so the rates of such a run are not comparable: one round, and
the JSON goes to bench/out/grpc-results-profile.json) and prints the heaviest
functions; the stats go to bench/out/grpc-profile-<test>.pstats.

Output: a table on stdout and bench/out/grpc-results.json. A missed target,
failed calls or wrong answers print WARNING lines; the exit status is 0 unless
the benchmark could not run at all (the server failing to start).

Usage: ``python bench/grpcbench.py [--seconds N] [--quick] [--profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import pstats
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from common import (
    cpu_model,
    fmt,
    pinning,
    proc_cpu_seconds,
    sigterm_as_exit,
)

HOST = "127.0.0.1"  # the only address anything binds to or connects to
DOMAIN = "bench.internal"
TTL = 30
SRV_PORT = 8080
INSTANCES_PER_SERVICE = 3
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out" / "grpc-results.json"

RESOLVE_TARGET_RATIO = 0.8  # Resolve calls/s >= 0.8 x the empty unary handler's
REPORT_TARGET_EVENTS = 100_000  # connection events/s through Report
SATURATED_CPU = 90.0  # % of one core: at or above, a process is taken as saturated
INTERFERENCE_PERCENT = 10.0  # others' share of a pinned CPU that makes a run suspect

READY = "grpcbench-server: listening"
READY_RE = re.compile(r"^grpcbench-server: listening (\S+) pid=(\d+)$")


@dataclass(frozen=True, slots=True)
class Test:
    name: str
    kind: str  # "unary" | "stream"
    method: str  # full gRPC method path
    label: str


TESTS = (
    Test("empty-unary", "unary", "/bench.Empty/Unary", "bench.Empty/Unary (empty)"),
    Test("resolve", "unary", "/resolverd.api.v1.Resolver/Resolve", "Resolver/Resolve"),
    Test("empty-stream", "stream", "/bench.Empty/Stream", "bench.Empty/Stream (empty)"),
    Test("report", "stream", "/resolverd.api.v1.Resolver/Report", "Resolver/Report"),
)
TEST_BY_NAME = {t.name: t for t in TESTS}


# --------------------------------------------------------------------------- data


def service_name(i: int) -> str:
    return f"svc-{i:03d}"


def instance_id(i: int, j: int) -> str:
    return f"svc-{i:03d}-{j}"


def config_data(services: int, state_file: str) -> dict[str, Any]:
    """svc-000 .. svc-NNN, instance j (1..3) of service i at 127.1.i.j (never contacted)."""
    return {
        "service_discovery": {
            "provider": "static",
            "static_services": [
                {
                    "id": instance_id(i, j),
                    "name": service_name(i),
                    "version": "1.0.0",
                    "address": f"127.1.{i}.{j}",
                    "port": SRV_PORT,
                }
                for i in range(services)
                for j in range(1, INSTANCES_PER_SERVICE + 1)
            ],
            "load_balancer": {"algorithm": "round_robin", "health_check_enabled": True},
        },
        "dns": {"listen": f"{HOST}:0", "domains": [DOMAIN], "ttl": TTL},
        "api": {"listen": f"{HOST}:0"},
        "registrations": {"state_file": state_file},
        "log": {"level": "info", "format": "json"},
    }


def report_instances(services: int, count: int) -> list[str]:
    """The first ``count`` instance ids, service by service."""
    ids = [instance_id(i, j) for i in range(services) for j in range(1, INSTANCES_PER_SERVICE + 1)]
    return ids[:count]


# --------------------------------------------------------------------------- server (--serve)


def serve_main(args: argparse.Namespace) -> int:
    import structlog
    import uvloop

    from resolverd import log

    log.configure(level="info", fmt="json")
    # stdout carries the "listening" line; the daemon's log goes to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    uvloop.run(_serve(args))
    return 0


def empty_handlers() -> Any:
    """bench.Empty: Unary (ResolveRequest -> empty ResolveResponse) and Stream
    (ReportRequests -> empty ReportResponse), with the same (de)serializers."""
    import grpc

    from resolverd.api.v1 import resolver_pb2 as pb

    empty_resolve = pb.ResolveResponse()
    empty_report = pb.ReportResponse()

    async def unary(request: Any, context: Any) -> Any:
        return empty_resolve

    async def stream(request_iterator: Any, context: Any) -> Any:
        async for _ in request_iterator:
            pass
        return empty_report

    return grpc.method_handlers_generic_handler(
        "bench.Empty",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=pb.ResolveRequest.FromString,
                response_serializer=pb.ResolveResponse.SerializeToString,
            ),
            "Stream": grpc.stream_unary_rpc_method_handler(
                stream,
                request_deserializer=pb.ReportRequest.FromString,
                response_serializer=pb.ReportResponse.SerializeToString,
            ),
        },
    )


async def _serve(args: argparse.Namespace) -> None:
    import cProfile

    from resolverd.config import parse_config
    from resolverd.daemon import Daemon

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def parent_gone() -> None:  # stdin is a pipe from the parent: EOF when it exits
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=parent_gone, name="stdin-eof", daemon=True).start()

    if args.profile_dir:
        profile_dir = Path(args.profile_dir)
        profiler: list[cProfile.Profile] = []

        def start_profile() -> None:
            prof = cProfile.Profile()
            profiler[:] = [prof]
            prof.enable()

        def stop_profile() -> None:
            if profiler:
                prof = profiler.pop()
                prof.disable()
                tmp = profile_dir / "profile.pstats.tmp"
                prof.dump_stats(str(tmp))
                tmp.rename(profile_dir / "profile.pstats")

        loop.add_signal_handler(signal.SIGUSR1, start_profile)
        loop.add_signal_handler(signal.SIGUSR2, stop_profile)

    with tempfile.TemporaryDirectory(prefix="grpcbench-server-") as tmp:
        config = parse_config(
            config_data(args.services, str(Path(tmp) / "reg.json")),
            file=str(Path(tmp) / "grpcbench.yaml"),
        )
        daemon = Daemon(config, extra_rpc_handlers=[empty_handlers()])
        await daemon.start()
        try:
            print(f"{READY} {daemon.rpc.address} pid={os.getpid()}", flush=True)
            await stop.wait()
        finally:
            await daemon.stop(grace=1.0)


# --------------------------------------------------------------------------- load (--load TEST)


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_times(cpus: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """Per CPU from /proc/stat, in clock ticks: (busy, idle, steal)."""
    wanted = {f"cpu{c}": c for c in cpus}
    times: dict[int, tuple[int, int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name in wanted:
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, values[:8])
                times[wanted[name]] = (user + nice + system + irq + softirq, idle + iowait, steal)
    return times


def only_cpu(pid: int) -> int | None:
    """The CPU a process is pinned to, or None when it may run on several."""
    cpus = os.sched_getaffinity(pid)
    return next(iter(cpus)) if len(cpus) == 1 else None


class Window:
    """The timed run: wall time, the client's and the server's CPU, and how much
    of the two pinned CPUs other processes (or the hypervisor) took meanwhile."""

    def __init__(self, server_pid: int, profile: bool) -> None:
        self.server_pid = server_pid
        self.profile = profile
        self.server_core = only_cpu(server_pid)
        self.client_core = only_cpu(0)
        self.cores = sorted({c for c in (self.server_core, self.client_core) if c is not None})

    def begin(self) -> None:
        if self.profile:
            os.kill(self.server_pid, signal.SIGUSR1)
        self.t0 = time.perf_counter()
        self.client0 = self_cpu_seconds()
        self.server0 = proc_cpu_seconds(self.server_pid)
        self.cpu0 = cpu_times(self.cores)

    def end(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        client = self_cpu_seconds() - self.client0
        server = proc_cpu_seconds(self.server_pid) - self.server0
        cpu1 = cpu_times(self.cores)
        if self.profile:
            os.kill(self.server_pid, signal.SIGUSR2)
        hz = os.sysconf("SC_CLK_TCK")
        others: dict[str, dict[str, float]] = {}
        for role, core, ours in (
            ("server", self.server_core, server),
            ("client", self.client_core, client),
        ):
            if core is None or core not in self.cpu0 or core not in cpu1:
                continue
            busy, _, steal = (b - a for a, b in zip(self.cpu0[core], cpu1[core], strict=True))
            both = self.server_core == self.client_core
            mine = server + client if both else ours
            others[role] = {
                "cpu": core,
                # busy includes steal on some kernels' accounting; report it apart
                "others_percent": max(0.0, 100 * (busy / hz - mine) / wall),
                "steal_percent": 100 * steal / hz / wall,
            }
        return {
            "seconds": wall,
            "client_cpu_seconds": client,
            "server_cpu_seconds": server,
            "interference": others,
        }


def load_main(args: argparse.Namespace) -> int:
    import uvloop

    result = uvloop.run(_load(args))
    print(json.dumps(result), flush=True)
    return 0


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    test = TEST_BY_NAME[args.load]
    # A local subchannel pool per channel: otherwise channels to the same target
    # share one subchannel, i.e. one TCP connection.
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.channels)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 10)
        window = Window(args.server_pid, args.profile)
        if test.kind == "unary":
            return await _unary(args, test, channels, window)
        return await _stream(args, test, channels, window)
    finally:
        for ch in channels:
            await ch.close()


def nearest_rank(sorted_values: Sequence[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * round(fraction * 1000) // 1000))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _expected_endpoints(services: int) -> list[dict[str, tuple[str, int]]]:
    """Per service: instance id -> (address, port)."""
    return [
        {instance_id(i, j): (f"127.1.{i}.{j}", SRV_PORT) for j in range(1, 4)}
        for i in range(services)
    ]


async def _verify_resolve(call: Any, requests: Sequence[bytes], services: int) -> list[str]:
    """Every service, three times in a row: its 3 instances in full, TTL, and the
    round-robin rotation of the first endpoint."""
    from resolverd.api.v1 import resolver_pb2 as pb

    problems: list[str] = []
    for i, expected in enumerate(_expected_endpoints(services)):
        firsts = []
        for _ in range(INSTANCES_PER_SERVICE):
            resp = pb.ResolveResponse.FromString(await call(requests[i]))
            got = {e.id: (e.address, e.port) for e in resp.endpoints}
            if len(resp.endpoints) != INSTANCES_PER_SERVICE or got != expected:
                problems.append(f"{service_name(i)}: got {got}, expected {expected}")
            if resp.ttl_seconds != TTL:
                problems.append(f"{service_name(i)}: ttl {resp.ttl_seconds}, expected {TTL}")
            if resp.endpoints:
                firsts.append(resp.endpoints[0].id)
        if len(set(firsts)) != INSTANCES_PER_SERVICE:
            problems.append(f"{service_name(i)}: first endpoints {firsts} do not rotate")
    return problems


async def _unary(
    args: argparse.Namespace, test: Test, channels: Sequence[Any], window: Window
) -> dict[str, Any]:
    import grpc

    from resolverd.api.v1 import resolver_pb2 as pb

    services = args.services
    requests = [
        pb.ResolveRequest(service=service_name(i)).SerializeToString() for i in range(services)
    ]
    expected_ids = [frozenset(e) for e in _expected_endpoints(services)]
    # request_serializer=None sends bytes as they are; response_deserializer=None
    # hands back the response bytes.
    calls = [
        ch.unary_unary(test.method, request_serializer=None, response_deserializer=None)
        for ch in channels
    ]
    check = test.name == "resolve"
    problems = await _verify_resolve(calls[0], requests, services) if check else []

    from_string = pb.ResolveResponse.FromString
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    wrong: list[str] = []
    counter = itertools.count()
    state = {"stop": False, "recording": False}
    perf_counter = time.perf_counter

    async def worker(call: Any) -> None:
        record = latencies.append
        while not state["stop"]:
            i = next(counter) % services
            t0 = perf_counter()
            try:
                resp = await call(requests[i])
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            t1 = perf_counter()
            if state["recording"]:
                record(t1 - t0)
                if check:
                    endpoints = from_string(resp).endpoints
                    if len(endpoints) != INSTANCES_PER_SERVICE or (
                        frozenset(e.id for e in endpoints) != expected_ids[i]
                    ):
                        wrong.append(f"{service_name(i)}: {[e.id for e in endpoints]}")
                elif resp:
                    wrong.append(f"non-empty response: {resp!r}")

    tasks = [asyncio.create_task(worker(calls[k % len(calls)])) for k in range(args.concurrency)]
    try:
        await asyncio.sleep(args.warmup)
        state["recording"] = True
        window.begin()
        await asyncio.sleep(args.seconds)
        done = len(latencies)
        measured = window.end()
        state["recording"] = False
        state["stop"] = True
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    ordered = sorted(latencies[:done])
    return {
        "test": test.name,
        "calls": done,
        "messages": done,
        "events": None,
        "avg_latency_ms": 1000 * sum(ordered) / done if done else None,
        "p50_latency_ms": _ms(nearest_rank(ordered, 0.5)),
        "p99_latency_ms": _ms(nearest_rank(ordered, 0.99)),
        "max_latency_ms": _ms(ordered[-1] if ordered else None),
        "errors": dict(errors),
        "wrong_answers": len(wrong),
        "wrong_examples": wrong[:5],
        "problems": problems,
        **measured,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def report_batches(ids: Sequence[str], events: int) -> tuple[bytes, bytes]:
    """Two ReportRequests of ``events`` ConnectionEvents over ``ids``: one opening a
    connection per event, one closing them again."""
    from resolverd.api.v1 import resolver_pb2 as pb

    def batch(opened: int, closed: int) -> bytes:
        return pb.ReportRequest(
            connections=[
                pb.ConnectionEvent(instance_id=ids[k % len(ids)], opened=opened, closed=closed)
                for k in range(events)
            ]
        ).SerializeToString()

    return batch(1, 0), batch(0, 1)


async def _stream(
    args: argparse.Namespace, test: Test, channels: Sequence[Any], window: Window
) -> dict[str, Any]:
    import grpc

    from resolverd.api.v1 import resolver_pb2 as pb

    ids = report_instances(args.services, args.report_instances)
    batches = report_batches(ids, args.events)
    streams = [
        ch.stream_unary(test.method, request_serializer=None, response_deserializer=None)
        for ch in channels
    ]
    check = test.name == "report"
    errors: Counter[str] = Counter()
    wrong: list[str] = []

    async def one_stream(open_stream: Any, state: dict[str, bool]) -> int:
        """Writes until told to stop; returns the messages the server confirmed."""
        call = open_stream()
        sent = 0
        try:
            while not state["stop"]:
                await call.write(batches[sent & 1])
                sent += 1
            await call.done_writing()
            raw = await call
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] += 1
            return 0
        if check:
            resp = pb.ReportResponse.FromString(raw)
            opened_batches = (sent + 1) // 2
            expect_released = (opened_batches - sent // 2) * args.events
            if resp.connection_events != sent * args.events or resp.released != expect_released:
                wrong.append(
                    f"{sent} messages: connection_events={resp.connection_events} "
                    f"(expected {sent * args.events}), released={resp.released} "
                    f"(expected {expect_released})"
                )
        elif raw:
            wrong.append(f"non-empty response: {raw!r}")
        return sent

    async def run(seconds: float) -> int:
        state = {"stop": False}
        tasks = [
            asyncio.create_task(one_stream(streams[k % len(streams)], state))
            for k in range(args.streams)
        ]
        try:
            await asyncio.sleep(seconds)
            state["stop"] = True
            return sum(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    await run(args.warmup)  # on streams of its own, so the timed run counts only its messages
    errors.clear()
    wrong.clear()
    window.begin()
    messages = await run(args.seconds)
    measured = window.end()

    problems: list[str] = []
    if check:  # every stream ended, so every connection it reported must be released
        resolve = channels[0].unary_unary(
            "/resolverd.api.v1.Resolver/Resolve",
            request_serializer=pb.ResolveRequest.SerializeToString,
            response_deserializer=pb.ResolveResponse.FromString,
        )
        for service in sorted({i.rsplit("-", 1)[0] for i in ids}):
            resp = await resolve(pb.ResolveRequest(service=service))
            for ep in resp.endpoints:
                if ep.stats.open_connections:
                    problems.append(
                        f"{ep.id}: {ep.stats.open_connections} open connections after the streams"
                    )
    return {
        "test": test.name,
        "calls": args.streams,
        "messages": messages,
        "events": messages * args.events if check else None,
        "avg_latency_ms": None,
        "p50_latency_ms": None,
        "p99_latency_ms": None,
        "max_latency_ms": None,
        "errors": dict(errors),
        "wrong_answers": len(wrong),
        "wrong_examples": wrong[:5],
        "problems": problems,
        **measured,
    }


# --------------------------------------------------------------------------- orchestration


class Server:
    """The --serve subprocess; its output is drained into memory by a thread."""

    def __init__(self, argv: list[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,  # closed by stop(); EOF tells the server to exit
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(
            target=self._drain, args=(self.proc.stdout,), name="server-output", daemon=True
        )
        self._reader.start()

    def _drain(self, stream: TextIO) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_ready(self, timeout: float = 30) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = READY_RE.match(line)
                    if match:
                        return match.group(1), int(match.group(2))
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"server did not start in {timeout:g} s:\n{self.log}")
                self._cond.wait(min(remaining, 0.2))

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-40:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self._reader.join(timeout=2)


@dataclass(slots=True)
class RunResult:
    test: str
    method: str
    round: int
    seconds: float
    calls: int  # unary: calls completed; stream: streams
    messages: int  # request messages the server consumed (unary: = calls)
    events: int | None  # Report: connection events confirmed by the server
    qps: float  # unary: calls/s; stream: messages/s
    events_per_second: float | None
    avg_latency_ms: float | None
    p50_latency_ms: float | None
    p99_latency_ms: float | None
    max_latency_ms: float | None
    server_cpu_percent: float
    client_cpu_percent: float
    server_us_per_message: float | None
    per_server_cpu_second: float | None  # messages per server CPU-second
    errors: dict[str, int]
    wrong_answers: int
    wrong_examples: list[str]
    problems: list[str]
    interference: dict[str, dict[str, float]]  # other processes' share of the pinned CPUs
    disturbed: bool  # other processes took a noticeable share of a pinned CPU
    warnings: list[str] = field(default_factory=list)  # failures, wrong answers
    load_warnings: list[str] = field(default_factory=list)  # saturated client, disturbance


def run_load(
    test: Test,
    round_: int,
    target: str,
    server_pid: int,
    pin: list[str],
    args: argparse.Namespace,
) -> RunResult:
    argv = [
        *pin,
        sys.executable,
        str(Path(__file__).resolve()),
        "--load",
        test.name,
        "--target",
        target,
        "--server-pid",
        str(server_pid),
        "--seconds",
        f"{args.seconds:g}",
        "--warmup",
        f"{args.warmup:g}",
        "--services",
        str(args.services),
        "--concurrency",
        str(args.concurrency),
        "--channels",
        str(args.channels),
        "--streams",
        str(args.streams),
        "--events",
        str(args.events),
        "--report-instances",
        str(args.report_instances),
    ]
    if args.profile:
        argv.append("--profile")
    timeout = args.seconds + args.warmup + 120
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"load generator for {test.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    raw = json.loads(lines[-1])
    seconds = raw["seconds"]
    server_cpu = raw["server_cpu_seconds"]
    messages = raw["messages"]
    result = RunResult(
        test=test.name,
        method=test.method,
        round=round_,
        seconds=seconds,
        calls=raw["calls"],
        messages=messages,
        events=raw["events"],
        qps=messages / seconds,
        events_per_second=None if raw["events"] is None else raw["events"] / seconds,
        avg_latency_ms=raw["avg_latency_ms"],
        p50_latency_ms=raw["p50_latency_ms"],
        p99_latency_ms=raw["p99_latency_ms"],
        max_latency_ms=raw["max_latency_ms"],
        server_cpu_percent=100 * server_cpu / seconds,
        client_cpu_percent=100 * raw["client_cpu_seconds"] / seconds,
        server_us_per_message=1e6 * server_cpu / messages if messages else None,
        per_server_cpu_second=messages / server_cpu if server_cpu > 0 else None,
        errors=raw["errors"],
        wrong_answers=raw["wrong_answers"],
        wrong_examples=raw["wrong_examples"],
        problems=raw["problems"],
        interference=raw["interference"],
        disturbed=any(
            share["others_percent"] >= INTERFERENCE_PERCENT or share["steal_percent"] >= 5
            for share in raw["interference"].values()
        ),
    )
    if result.errors:
        result.warnings.append(f"failed calls: {result.errors}")
    if result.wrong_answers:
        result.warnings.append(
            f"{result.wrong_answers} wrong responses, e.g. {result.wrong_examples[:2]}"
        )
    for problem in result.problems[:10]:
        result.warnings.append(problem)
    if result.client_cpu_percent >= SATURATED_CPU:
        if result.server_cpu_percent >= SATURATED_CPU:
            why = "the server is saturated too, so the rate is still the server's limit"
        else:
            why = "the client is the bottleneck; compare rates per server CPU-second"
        result.load_warnings.append(
            f"the load generator's core is saturated ({result.client_cpu_percent:.0f}% CPU, "
            f"server {result.server_cpu_percent:.0f}%): {why}"
        )
    for role, share in result.interference.items():
        if share["others_percent"] >= INTERFERENCE_PERCENT or share["steal_percent"] >= 5:
            if role == "client" and result.server_cpu_percent >= SATURATED_CPU:
                effect = "the server stayed saturated, so the rate should be close"
            else:
                effect = "the rate is low"
            result.load_warnings.append(
                f"other processes used {share['others_percent']:.0f}% of CPU {share['cpu']:.0f} "
                f"({role}) during round {round_} (steal {share['steal_percent']:.0f}%), and no "
                f"round was undisturbed: {effect}; re-run on an idle machine to be sure"
            )
    return result


def top_functions(path: Path, limit: int = 15) -> list[str]:
    """The heaviest functions of a cProfile dump: by own time, then resolverd's by
    cumulative time; shares of all profiled (Python-visible) time."""
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in raw.values()) or 1.0

    def rows(items: list[tuple[Any, Any]]) -> list[str]:
        lines = [f"    {'own %':>6}  {'cum %':>6}  {'calls':>9}  function"]
        for (file, line, name), (_, ncalls, tt, ct, _) in items:
            where = name if file == "~" else f"{name} ({_short(file)}:{line})"
            lines.append(
                f"    {100 * tt / total:>5.1f}%  {100 * ct / total:>5.1f}%  {ncalls:>9}  {where}"
            )
        return lines

    by_own = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:limit]
    ours = [kv for kv in raw.items() if _short(kv[0][0]).startswith("resolverd/")]
    by_cum = sorted(ours, key=lambda kv: kv[1][3], reverse=True)[:limit]
    lines = ["  by own time:", *rows(by_own)]
    if by_cum:
        lines += ["  resolverd's functions by cumulative time:", *rows(by_cum)]
    return lines


def _short(file: str) -> str:
    """A source path from its package root (resolverd/..., grpc/..., asyncio/...)."""
    root = f"{BENCH_DIR.parent}/"
    if file.startswith(root):
        return file[len(root) :]
    if "/site-packages/" in file:
        return file.split("/site-packages/", 1)[1]
    match = re.search(r"/lib/python3\.\d+/(.*)$", file)
    return match.group(1) if match else file


def collect_profile(profile_dir: Path, out_dir: Path, test: str) -> Path | None:
    src = profile_dir / "profile.pstats"
    deadline = time.monotonic() + 10
    while not src.exists():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    dest = out_dir / f"grpc-profile-{test}.pstats"
    shutil.move(str(src), dest)
    return dest


# --------------------------------------------------------------------------- reporting


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def protobuf_backend() -> str:
    try:
        from google.protobuf.internal import api_implementation

        return str(api_implementation.Type())
    except ImportError:
        return "unknown"


def render_table(results: Sequence[RunResult]) -> list[str]:
    header = (
        f"{'test':<12}  {'method':<30}  {'qps':>9}  {'events/s':>10}  {'avg ms':>7}  "
        f"{'p99 ms':>7}  {'srv CPU':>7}  {'cli CPU':>7}  {'srv us/msg':>10}  {'others':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        test = TEST_BY_NAME[r.test]
        events = "n/a" if r.events_per_second is None else f"{r.events_per_second:.0f}"
        lines.append(
            f"{r.test:<12}  {test.label:<30}  {r.qps:>9.0f}  {events:>10}  "
            f"{fmt(r.avg_latency_ms):>7}  {fmt(r.p99_latency_ms):>7}  "
            f"{r.server_cpu_percent:>6.0f}%  {r.client_cpu_percent:>6.0f}%  "
            f"{fmt(r.server_us_per_message, 1):>10}  {others(r):>6}"
        )
    return lines


def choose(runs: Sequence[RunResult]) -> RunResult:
    """The fastest undisturbed round (others only ever slow a run down), else the fastest."""
    clean = [r for r in runs if not r.disturbed]
    return max(clean or runs, key=lambda r: r.qps)


def others(r: RunResult) -> str:
    """Other processes' (and steal) largest share of the two pinned CPUs."""
    shares = [s["others_percent"] + s["steal_percent"] for s in r.interference.values()]
    return f"{max(shares):.0f}%" if shares else "n/a"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="resolverd gRPC API benchmark: Resolve and Report vs empty handlers "
        "on the same server (127.0.0.1 only)."
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="length of each timed run (default 10)"
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs, for smoke testing")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="warm-up before each timed run (default 2)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of every test, interleaved; the fastest undisturbed one counts (default 3)",
    )
    parser.add_argument("--services", type=int, default=100, help="services (default 100)")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="unary calls in flight (default 64)"
    )
    parser.add_argument(
        "--channels", type=int, default=2, help="client channels (connections) (default 2)"
    )
    parser.add_argument(
        "--streams", type=int, default=8, help="client streams in flight (default 8)"
    )
    parser.add_argument(
        "--events", type=int, default=100, help="ConnectionEvents per ReportRequest (default 100)"
    )
    parser.add_argument(
        "--report-instances",
        type=int,
        default=10,
        help="instances the connection events cycle over (default 10)",
    )
    parser.add_argument(
        "--tests",
        default=",".join(t.name for t in TESTS),
        help="comma-separated subset of: " + ", ".join(t.name for t in TESTS),
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs with taskset")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the server during each timed run (slows it down)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    # Internal: the server and load generator processes.
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-dir", help=argparse.SUPPRESS)
    parser.add_argument("--load", choices=list(TEST_BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile and args.out == DEFAULT_OUT:  # keep the comparable results apart
        args.out = DEFAULT_OUT.with_name("grpc-results-profile.json")
    if args.quick:
        args.seconds = 2.0
        args.warmup = min(args.warmup, 1.0)
    args.warmup = min(args.warmup, args.seconds)
    if not 1 <= args.services <= 256:
        parser.error("--services must be 1..256 (addresses are 127.1.<service>.<n>)")
    if args.profile:
        args.rounds = 1  # a profiled run is for the profile, not for its rates
    counts = (args.rounds, args.concurrency, args.channels, args.streams, args.events)
    if min(counts) < 1:
        parser.error("--rounds, --concurrency, --channels, --streams and --events must be >= 1")
    if not 1 <= args.report_instances <= args.services * INSTANCES_PER_SERVICE:
        parser.error("--report-instances must be 1..services x 3")
    names = [n.strip() for n in args.tests.split(",") if n.strip()]
    unknown = [n for n in names if n not in TEST_BY_NAME]
    if unknown or not names:
        parser.error(f"--tests: unknown {unknown}; choose from {list(TEST_BY_NAME)}")
    args.tests = [TEST_BY_NAME[n] for n in names]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_main(args)
    if args.load:
        return load_main(args)

    server_pin, load_pin, pin_note = pinning(
        args.no_pin,
        "server and load generator share the CPUs",
        "server pinned to CPU {server}, load generator to CPU {load} (taskset)",
    )
    versions = {
        "resolverd": package_version("resolverd"),
        "grpcio": package_version("grpcio"),
        "protobuf": f"{package_version('protobuf')} ({protobuf_backend()})",
        "uvloop": package_version("uvloop"),
        "python": platform.python_version(),
    }
    machine = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
    }
    print(
        f"grpcbench: resolverd gRPC API, {args.services} services x {INSTANCES_PER_SERVICE} "
        f"instances (static, round_robin), TCP on {HOST}",
        flush=True,
    )
    print(f"machine: nproc={machine['nproc']} ({machine['cpu_model']}), {pin_note}")
    print("versions: " + "; ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"load: grpc.aio + uvloop, one process per test; unary: {args.concurrency} calls in "
        f"flight over {args.channels} channel(s); streams: {args.streams} client streams, "
        f"{args.events} connection events per ReportRequest over {args.report_instances} "
        f"instances; {args.warmup:g} s warm-up + {args.seconds:g} s timed run per test"
        + ("; PROFILING the server (cProfile): rates are not comparable" if args.profile else ""),
        flush=True,
    )

    rounds: dict[str, list[RunResult]] = {t.name: [] for t in args.tests}
    profiles: dict[str, Path] = {}
    notable: list[str] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="grpcbench-") as tmp:
        profile_dir = Path(tmp)
        argv = [*server_pin, sys.executable, str(Path(__file__).resolve()), "--serve"]
        argv += ["--services", str(args.services)]
        if args.profile:
            argv += ["--profile-dir", str(profile_dir)]
        server = Server(argv)
        try:
            try:
                target, server_pid = server.wait_ready()
            except RuntimeError as exc:
                print(f"grpcbench: {exc}", file=sys.stderr)
                return 1
            print(f"server: resolverd Daemon on uvloop, gRPC on {target} (pid {server_pid})")
            for n in range(1, args.rounds + 1):
                for test in args.tests:
                    server.check_alive()
                    result = run_load(test, n, target, server_pid, load_pin, args)
                    rounds[test.name].append(result)
                    extra = (
                        f", {result.events_per_second:.0f} events/s"
                        if result.events_per_second is not None
                        else ""
                    )
                    print(
                        f"  round {n}/{args.rounds}  {test.name:<12} {result.qps:>9.0f} "
                        f"{'calls' if test.kind == 'unary' else 'msgs'}/s{extra} "
                        f"(server CPU {result.server_cpu_percent:.0f}%, "
                        f"client CPU {result.client_cpu_percent:.0f}%, others {others(result)})",
                        flush=True,
                    )
                    if args.profile:
                        path = collect_profile(profile_dir, args.out.parent, test.name)
                        if path is not None:
                            profiles[test.name] = path
            server.check_alive()
        finally:
            server.stop()
        notable = [
            line
            for line in server.lines
            if '"level": "warning"' in line or '"level": "error"' in line
        ]

    results = [choose(runs) for runs in rounds.values() if runs]
    by_name = {r.test: r for r in results}
    empty_u, resolve = by_name.get("empty-unary"), by_name.get("resolve")
    empty_s, report = by_name.get("empty-stream"), by_name.get("report")
    print()
    for line in render_table(results):
        print(line)
    print(
        "rounds (qps; * the round shown, ! disturbed by other processes): "
        + "; ".join(
            f"{name} "
            + " ".join(
                f"{r.qps:.0f}{'*' if r is by_name[name] else ''}{'!' if r.disturbed else ''}"
                for r in runs
            )
            for name, runs in rounds.items()
            if runs
        )
    )
    print()

    summary: dict[str, Any] = {}
    target_lines: list[str] = []
    warnings: list[str] = []
    if empty_u and resolve:
        measured = ratio(resolve.qps, empty_u.qps)
        per_cpu = ratio(resolve.per_server_cpu_second, empty_u.per_server_cpu_second)
        server_bound = min(resolve.server_cpu_percent, empty_u.server_cpu_percent) >= SATURATED_CPU
        judged = measured if server_bound or per_cpu is None else per_cpu
        basis = "measured calls/s" if judged is measured else "calls per server CPU-second"
        met = judged is not None and judged >= RESOLVE_TARGET_RATIO
        summary["resolve_over_empty_unary"] = {
            "measured_qps_ratio": measured,
            "per_server_cpu_second_ratio": per_cpu,
            "judged_ratio": judged,
            "basis": basis,
            "target": RESOLVE_TARGET_RATIO,
            "met": met,
        }
        target_lines.append(
            f"Resolve / empty unary: {fmt(measured, 2)}x calls/s "
            f"({resolve.qps:.0f} / {empty_u.qps:.0f}); "
            f"{fmt(per_cpu, 2)}x per server CPU-second "
            f"({fmt(resolve.server_us_per_message, 1)} vs "
            f"{fmt(empty_u.server_us_per_message, 1)} us/call); "
            f"target >= {RESOLVE_TARGET_RATIO}x on {basis}: {'met' if met else 'MISSED'}"
        )
        if not met:
            warnings.append(
                f"Resolve reaches {fmt(judged, 2)}x the empty unary handler ({basis}), "
                f"target {RESOLVE_TARGET_RATIO}x"
            )
    if report:
        eps = report.events_per_second or 0.0
        met = eps >= REPORT_TARGET_EVENTS
        summary["report_events_per_second"] = {
            "value": eps,
            "target": REPORT_TARGET_EVENTS,
            "met": met,
        }
        target_lines.append(
            f"Report: {eps:.0f} connection events/s ({report.qps:.0f} msgs/s x {args.events}); "
            f"target >= {REPORT_TARGET_EVENTS}: {'met' if met else 'MISSED'}"
        )
        if not met:
            warnings.append(
                f"Report reaches {eps:.0f} connection events/s, target {REPORT_TARGET_EVENTS}"
            )
    if report and empty_s:
        measured = ratio(report.qps, empty_s.qps)
        per_cpu = ratio(report.per_server_cpu_second, empty_s.per_server_cpu_second)
        summary["report_over_empty_stream"] = {
            "measured_msgs_ratio": measured,
            "per_server_cpu_second_ratio": per_cpu,
        }
        target_lines.append(
            f"Report / empty stream: {fmt(measured, 2)}x msgs/s "
            f"({report.qps:.0f} / {empty_s.qps:.0f}); {fmt(per_cpu, 2)}x per server "
            f"CPU-second ({fmt(report.server_us_per_message, 1)} vs "
            f"{fmt(empty_s.server_us_per_message, 1)} us/msg); no target"
        )
    for line in target_lines:
        print(line)
    print(
        "qps: unary calls/s, or stream request messages/s; events/s: connection events the "
        "server confirmed. Latency: per call at the client, p99 nearest-rank over the timed run."
    )
    print(
        "CPU: share of one core over the timed run (server: /proc, all threads; client: "
        f"getrusage). >= {SATURATED_CPU:.0f}% counts as saturated. srv us/msg: server CPU per "
        "call or stream message. others: the largest share of the server's or the client's "
        "CPU used by other processes (or stolen) meanwhile."
    )
    for runs in rounds.values():
        for r in runs:
            for warning in r.warnings:
                print(f"WARNING: {r.test} round {r.round}: {warning}")
    for r in results:
        for warning in r.load_warnings:
            print(f"WARNING: {r.test}: {warning}")
    for line in notable:
        print(f"WARNING: resolverd logged: {line}")
    for warning in warnings:
        print(f"WARNING: {warning}")
    for test, path in profiles.items():
        print()
        print(f"server profile, {test} (cProfile over the timed run; {path}):")
        for line in top_functions(path):
            print(line)

    report_json = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "versions": versions,
        "settings": {
            "services": args.services,
            "instances_per_service": INSTANCES_PER_SERVICE,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "channels": args.channels,
            "streams": args.streams,
            "events_per_message": args.events,
            "report_instances": args.report_instances,
            "pinning": pin_note,
            "address": HOST,
            "profiled": args.profile,
        },
        "results": [asdict(r) for r in results],
        "rounds": {name: [asdict(r) for r in runs] for name, runs in rounds.items()},
        "summary": summary,
        "warnings": warnings,
        "resolverd_warnings": notable,
    }
    args.out.write_text(json.dumps(report_json, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
