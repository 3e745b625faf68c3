"""Benchmark resolverd's forwarded-name cache-hit path against dnsmasq.

What it measures: sustained UDP throughput (queries per second) and latency
(average, and p50/p99/p99.9 from dnsperf's per-query timings) of resolverd and
dnsmasq as caching forwarders of the same local upstream, in the same run,
answering ``A`` queries for names outside resolverd's zones that are already in
both caches. For resolverd that is the path ``Answerer._slow`` ->
``Forwarder.cached`` (stored bytes, TTLs patched at most once a second); for
dnsmasq it is its answer cache. Target: resolverd/dnsmasq qps >= 0.9.

How: a small authoritative upstream (the ``Upstream`` class of
tests/upstream.py, in its own process) serves 100 names
``host-NNN.example.test.`` with 1-3 A records each and TTL 3600 on 127.0.0.2.
tests/upstream.py's own ``main()`` cannot report how many queries it saw, so
the bench runs the same class through a few lines of driver that answer a
``count`` line on stdin with the upstream's total query count. resolverd
(``python -m resolverd run``; one static service, forwarding to that upstream
only, cache 10000) and dnsmasq (``--no-resolv --no-hosts``, one ``--server``,
``--cache-size=10000``, negative caching left on, no config file) listen on
127.0.0.1. The bench queries every name once through the upstream directly and
through both forwarders (this fills both caches) and checks that all three
give the same addresses; then, per server, a dnsperf warm-up and a timed run
(no rate limit, -c 4 -q 100: the server is saturated). The upstream's query
count is read before and after each timed run: it should not move, as every
answer comes from a cache. After the load every name is asked again: same
addresses, and TTLs below 3600 (counted down in a cache, not fetched anew).

With ``taskset`` and at least two CPUs, all servers (upstream included) are
pinned to CPU 0 (only one is loaded at a time) and dnsperf to CPU 1. Latency
percentiles come from ``dnsperf -v`` (every response's latency, 1 µs
resolution), nearest-rank. Nothing is sent anywhere but 127.0.0.1 and
127.0.0.2, and /etc/resolv.conf is never read by either forwarder.

Other load on the machine skews the ratio (the two servers run one after the
other), so each run also reports how long the server was runnable but waiting
for its CPU (``runq wait``, from /proc/<pid>/task/*/schedstat), warns when that
is more than 5% of the run, and gives completed queries per CPU-second the
server used, a figure less sensitive to such load (though not to the batching
that load causes).

Output: a table on stdout and bench/out/forward-results.json. A qps ratio below
0.9, lost queries, non-NOERROR responses, upstream queries during the timed
runs or wrong answers after the load print warnings; the exit status is 0
unless the benchmark could not run (a tool missing, a server failing to start,
or wrong answers before it).

Usage: ``python bench/forwardbench.py [--seconds N] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
from common import (
    Server,
    children_cpu,
    cpu_model,
    dnsperf_argv,
    dnsperf_version,
    first_line,
    fmt,
    free_port,
    parse_dnsperf,
    percentile_ms,
    pinning,
    sigterm_as_exit,
    start_resolverd,
    udp_rcvbuf_errors,
    warm_up,
    which,
)

HOST = "127.0.0.1"  # where resolverd, dnsmasq and dnsperf talk
UPSTREAM_HOST = "127.0.0.2"  # the authoritative upstream; loopback too
ZONE = "example.test"  # outside resolverd's zones: forwarded
DOMAIN = "bench.internal"  # resolverd's own zone (one static service)
TTL = 3600  # longer than any run: every timed query is a cache hit
TARGET_RATIO = 0.9
ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
DEFAULT_OUT = BENCH_DIR / "out" / "forward-results.json"

# The upstream process: tests/upstream.py's Upstream on UPSTREAM_HOST, zone lines
# from argv, and one extra: a "count" line on stdin prints its total query count.
UPSTREAM_DRIVER = """\
import asyncio, sys
from tests.upstream import Upstream

up = Upstream(sys.argv[1])
for line in sys.argv[2:]:
    up.add(line)
print(f"listening {up.address}", flush=True)

async def total() -> int:
    return sum(up.queries.values())

for command in sys.stdin:
    if command.strip() == "count":
        n = asyncio.run_coroutine_threadsafe(total(), up._loop).result(10)
        print(f"count {n}", flush=True)
up.close()
"""


# --------------------------------------------------------------------------- data


def make_records(names: int) -> dict[str, list[str]]:
    """host-000 .. host-NNN in ZONE; name i has i % 3 + 1 addresses, <net>.<i + 1> in the
    three documentation ranges (data only, never contacted)."""
    nets = ("192.0.2", "198.51.100", "203.0.113")
    return {
        f"host-{i:03d}.{ZONE}.": [f"{nets[j]}.{i + 1}" for j in range(i % 3 + 1)]
        for i in range(names)
    }


def zone_lines(records: dict[str, list[str]]) -> list[str]:
    return [f"{name} {TTL} IN A {addr}" for name, addrs in records.items() for addr in addrs]


def resolverd_config(upstream_port: int, state_file: Path) -> str:
    """The YAML config; listen ports 0, the bound DNS port is read from the daemon's log."""
    return "\n".join(
        [
            "service_discovery:",
            "  provider: static",
            "  static_services:",
            '    - {id: web-1, name: web, version: "1.0.0", address: 127.1.0.1, port: 8080}',
            "dns:",
            f"  listen: {HOST}:0",
            f"  domains: [{DOMAIN}]",
            "  forward:",
            f'    upstreams: ["{UPSTREAM_HOST}:{upstream_port}"]',
            "    cache_size: 10000",
            "api:",
            f"  listen: {HOST}:0",
            "registrations:",
            f"  state_file: {state_file}",
            "log:",
            "  format: json",
            "",
        ]
    )


def write_query_file(path: Path, names: Sequence[str]) -> None:
    path.write_text("".join(f"{name} A\n" for name in names))


# --------------------------------------------------------------------------- servers


class UpstreamServer(Server):
    COUNT_RE = re.compile(r"^count (\d+)$")
    port = 0  # set once it says where it listens

    def count(self) -> int:
        """Queries the upstream has seen so far (UDP and TCP, every name)."""
        assert self.proc.stdin is not None
        with self._cond:
            start = len(self.lines)
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.wait_for_line(self.COUNT_RE, timeout=10, start=start).group(1))


def start_upstream(python: str, records: dict[str, list[str]], pin: list[str]) -> UpstreamServer:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [*pin, python, "-c", UPSTREAM_DRIVER, UPSTREAM_HOST, *zone_lines(records)]
    server = UpstreamServer("upstream", argv, stdin=True, env=env)
    match = server.wait_for_line(re.compile(r"^listening (\S+):(\d+)$"), timeout=15)
    if match.group(1) != UPSTREAM_HOST:
        raise RuntimeError(f"upstream listens on {match.group(1)}, not {UPSTREAM_HOST}")
    server.port = int(match.group(2))
    return server


def dnsmasq_argv(exe: str, port: int, upstream_port: int, workdir: Path) -> list[str]:
    argv = [
        exe,
        "--no-daemon",
        "--conf-file=/dev/null",  # not /etc/dnsmasq.conf
        "--no-resolv",  # no upstream from /etc/resolv.conf: only --server
        "--no-hosts",
        "--no-poll",
        f"--server={UPSTREAM_HOST}#{upstream_port}",
        "--cache-size=10000",  # negative caching stays on (no --no-negcache)
        f"--port={port}",
        f"--listen-address={HOST}",
        "--bind-interfaces",
        f"--pid-file={workdir / 'dnsmasq.pid'}",
        "--log-facility=-",
    ]
    if os.geteuid() == 0:
        argv.append("--user=root")
    return argv


def start_dnsmasq(
    exe: str, upstream_port: int, workdir: Path, pin: list[str]
) -> tuple[Server, int]:
    port = free_port()
    server = Server("dnsmasq", [*pin, *dnsmasq_argv(exe, port, upstream_port, workdir)])
    server.wait_for_line(re.compile(r"started, version"), timeout=15)
    return server, port


def wait_ready(server: Server, host: str, port: int, name: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        try:
            query(host, port, name, timeout=0.5)
            return
        except (dns.exception.Timeout, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} does not answer on {host}:{port}") from None


# --------------------------------------------------------------------------- verification


def query(host: str, port: int, name: str, timeout: float = 2.0) -> dns.message.Message:
    """One UDP A query without EDNS, as dnsperf sends them."""
    message = dns.message.make_query(name, "A")
    return dns.query.udp(message, host, port=port, timeout=timeout)


def summarize(response: dns.message.Message) -> tuple[list[str], int]:
    """Sorted addresses and the answer TTL; raises ValueError on anything unexpected."""
    rcode = dns.rcode.to_text(response.rcode())
    if rcode != "NOERROR":
        raise ValueError(f"rcode {rcode}")
    if response.flags & dns.flags.TC:
        raise ValueError("truncated (TC)")
    addresses: list[str] = []
    ttls: set[int] = set()
    for rrset in response.answer:
        if rrset.rdtype != dns.rdatatype.A:
            raise ValueError(f"unexpected {dns.rdatatype.to_text(rrset.rdtype)} in answer")
        ttls.add(rrset.ttl)
        addresses += [rr.address for rr in rrset]
    if len(ttls) != 1:
        raise ValueError(f"answer TTLs {sorted(ttls)}")
    return sorted(addresses), ttls.pop()


def verify(
    servers: dict[str, tuple[str, int]], records: dict[str, list[str]]
) -> tuple[int, dict[str, list[int]], list[str]]:
    """Ask every server for every name: queries made, TTLs seen per server, problems."""
    checked = 0
    ttls: dict[str, list[int]] = {server: [] for server in servers}
    problems: list[str] = []
    for name, addresses in records.items():
        expected = sorted(addresses)
        for server, (host, port) in servers.items():
            checked += 1
            try:
                got, ttl = summarize(query(host, port, name))
            except Exception as exc:
                problems.append(f"{server} {name}: {exc}")
                continue
            ttls[server].append(ttl)
            if got != expected:
                problems.append(f"{server} {name}: got {got}, expected {expected}")
            elif not 0 < ttl <= TTL:
                problems.append(f"{server} {name}: TTL {ttl}, expected 1..{TTL}")
    return checked, ttls, problems


def describe_problems(problems: Sequence[str], limit: int = 10) -> str:
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"  {shown}{more}"


# --------------------------------------------------------------------------- dnsperf


@dataclass(slots=True)
class RunResult:
    server: str
    seconds: float
    queries_sent: int
    queries_completed: int
    queries_lost: int
    qps: float
    avg_latency_ms: float
    min_latency_ms: float
    max_latency_ms: float
    stddev_latency_ms: float
    p50_latency_ms: float | None
    p99_latency_ms: float | None
    p999_latency_ms: float | None
    latency_samples: int
    rcodes: dict[str, int]
    response_bytes: int
    udp_rcvbuf_drops: int | None
    server_cpu_percent: float
    dnsperf_cpu_percent: float
    upstream_queries: int  # seen by the upstream during the timed run
    qps_per_server_cpu: float  # completed queries per CPU-second the server used
    runq_wait_percent: float | None  # share of the run the server waited for a CPU
    warnings: list[str] = field(default_factory=list)


def runq_wait_seconds(pid: int) -> float | None:
    """Time all threads of a process spent runnable but waiting for a CPU, so far."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return total / 1e9


def run_dnsperf(
    *,
    dnsperf: str,
    pin: list[str],
    server: Server,
    port: int,
    upstream: UpstreamServer,
    qfile: Path,
    seconds: float,
    workdir: Path,
    args: argparse.Namespace,
) -> RunResult:
    out = workdir / f"dnsperf-{server.name}.txt"
    argv = [*dnsperf_argv(dnsperf, pin, port, qfile, seconds, args), "-v"]
    upstream_before = upstream.count()
    server_before, children_before = server.cpu_seconds(), children_cpu()
    drops_before, wait_before = udp_rcvbuf_errors(), runq_wait_seconds(server.proc.pid)
    started = time.monotonic()
    with out.open("w") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.PIPE, text=True, check=False)
    wall = time.monotonic() - started
    server_cpu = server.cpu_seconds() - server_before
    dnsperf_cpu = children_cpu() - children_before
    drops_after, wait_after = udp_rcvbuf_errors(), runq_wait_seconds(server.proc.pid)
    upstream_queries = upstream.count() - upstream_before
    drops = None if drops_before is None or drops_after is None else drops_after - drops_before
    if proc.returncode != 0:
        raise RuntimeError(f"dnsperf failed ({proc.returncode}): {proc.stderr.strip()}")
    server.check_alive()
    stats, histogram, verbose_rcodes = parse_dnsperf(out)
    out.unlink()  # ~40 bytes per query; keep the temp dir small
    samples = sum(histogram.values())
    avg, low, high = (float(x) for x in stats["avg"])
    completed, lost = int(stats["completed"][0]), int(stats["lost"][0])
    runtime = float(stats["runtime"][0])
    warnings: list[str] = []
    if samples != completed:
        warnings.append(f"{samples} per-query latencies for {completed} completed queries")
    if lost:
        why = f"; kernel UDP receive-buffer drops during the run: {drops}" if drops else ""
        warnings.append(f"{lost} queries lost{why}")
    bad = {code: n for code, n in stats["rcodes"].items() if code != "NOERROR"}
    if bad:
        warnings.append(f"non-NOERROR responses: {bad}")
    for code in verbose_rcodes:
        if code not in ("NOERROR", "T"):
            warnings.append(f"per-query rcode {code} x{verbose_rcodes[code]}")
    waited = None
    if wait_before is not None and wait_after is not None:
        waited = 100 * (wait_after - wait_before) / wall
        if waited > 5:
            warnings.append(
                f"the server waited for a CPU {waited:.0f}% of the run (other processes "
                "competed for it): this run's qps is low by about that much"
            )
    if upstream_queries:
        warnings.append(
            f"the upstream saw {upstream_queries} queries during the timed run "
            "(not all answers came from the cache)"
        )
    return RunResult(
        server=server.name,
        seconds=runtime,
        queries_sent=int(stats["sent"][0]),
        queries_completed=completed,
        queries_lost=lost,
        qps=float(stats["qps"][0]),
        avg_latency_ms=avg * 1000,
        min_latency_ms=low * 1000,
        max_latency_ms=high * 1000,
        stddev_latency_ms=float(stats["stddev"][0]) * 1000,
        p50_latency_ms=percentile_ms(histogram, samples, 500),
        p99_latency_ms=percentile_ms(histogram, samples, 990),
        p999_latency_ms=percentile_ms(histogram, samples, 999),
        latency_samples=samples,
        rcodes=stats["rcodes"],
        response_bytes=int(stats["size"][1]),
        udp_rcvbuf_drops=drops,
        # The server works only during dnsperf's run time. dnsperf itself busy-waits
        # after it for lost queries to time out (-t), so its share is over its wall time.
        server_cpu_percent=100 * server_cpu / runtime,
        dnsperf_cpu_percent=100 * dnsperf_cpu / wall,
        upstream_queries=upstream_queries,
        qps_per_server_cpu=completed / server_cpu if server_cpu > 0 else 0.0,
        runq_wait_percent=waited,
        warnings=warnings,
    )


# --------------------------------------------------------------------------- reporting


def ttl_range(ttls: Sequence[int]) -> str:
    return f"{min(ttls)}..{max(ttls)}" if ttls else "n/a"


def render_table(results: Sequence[RunResult]) -> list[str]:
    header = (
        f"{'server':<9}  {'qps':>9}  {'avg ms':>7}  {'p50 ms':>7}  {'p99 ms':>7}  "
        f"{'p99.9 ms':>8}  {'lost':>4}  {'rcode':>7}  {'resp B':>6}  {'srv CPU':>7}  "
        f"{'dnsperf CPU':>11}  {'runq wait':>9}  {'qps/srv CPU':>11}  {'upstream q':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        noerror = r.rcodes.get("NOERROR", 0)
        ok = "NOERROR" if noerror == r.queries_completed else "MIXED"
        lines.append(
            f"{r.server:<9}  {r.qps:>9.0f}  {r.avg_latency_ms:>7.3f}  "
            f"{fmt(r.p50_latency_ms):>7}  {fmt(r.p99_latency_ms):>7}  "
            f"{fmt(r.p999_latency_ms):>8}  {r.queries_lost:>4}  {ok:>7}  {r.response_bytes:>6}  "
            f"{r.server_cpu_percent:>6.0f}%  {r.dnsperf_cpu_percent:>10.0f}%  "
            f"{fmt(r.runq_wait_percent, 1) + '%':>9}  {r.qps_per_server_cpu:>11.0f}  "
            f"{r.upstream_queries:>10}"
        )
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="resolverd vs dnsmasq forwarding-cache-hit UDP benchmark with dnsperf "
        "(127.0.0.1 and 127.0.0.2 only)."
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="length of each timed run (default 10)"
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs, for smoke testing")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="warm-up run before each timed run (default 2)"
    )
    parser.add_argument("--names", type=int, default=100, help="forwarded names (default 100)")
    parser.add_argument("--clients", type=int, default=4, help="dnsperf -c (default 4)")
    parser.add_argument(
        "--outstanding", type=int, default=100, help="dnsperf -q, queries in flight (default 100)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs with taskset")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="python that runs resolverd (-m resolverd) and the upstream (default: this one)",
    )
    parser.add_argument("--dnsmasq", default="dnsmasq", help="dnsmasq executable")
    parser.add_argument("--dnsperf", default="dnsperf", help="dnsperf executable")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 2.0
    if not 1 <= args.names <= 254:
        parser.error("--names must be 1..254 (addresses are <documentation net>.<name + 1>)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    python = which(args.python, "python", "forwardbench", sbin=True)
    dnsmasq = which(args.dnsmasq, "dnsmasq", "forwardbench", sbin=True)
    dnsperf = which(args.dnsperf, "dnsperf", "forwardbench", sbin=True)
    server_pin, load_pin, pin_note = pinning(
        args.no_pin,
        "servers and dnsperf share the CPUs",
        "servers (and the upstream) pinned to CPU {server} (one loaded at a time), "
        "dnsperf to CPU {load} (taskset)",
    )
    warmup = min(args.warmup, args.seconds)

    records = make_records(args.names)
    names = list(records)
    versions = {
        "resolverd": first_line([python, "-m", "resolverd", "version"]),
        "dnsmasq": first_line([dnsmasq, "--version"]),
        "dnsperf": dnsperf_version(dnsperf),
        "python": f"Python {platform.python_version()}",
    }
    machine = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
    }
    n_records = sum(len(a) for a in records.values())
    print(
        f"forwardbench: forwarded-name cache hits, {len(names)} names ({n_records} A records, "
        f"1-3 per name, TTL {TTL}) from an upstream on {UPSTREAM_HOST}, UDP on {HOST}",
        flush=True,
    )
    print(f"machine: nproc={machine['nproc']} ({machine['cpu_model']}), {pin_note}")
    print("versions: " + "; ".join(versions.values()))
    print(
        f"dnsperf: -c {args.clients} -q {args.outstanding} -T 1, no -Q (unlimited rate); "
        f"{warmup:g} s warm-up + {args.seconds:g} s timed run per server",
        flush=True,
    )

    servers: list[Server] = []
    results: list[RunResult] = []
    dnsmasq_cmd: list[str] = []
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="forwardbench-") as tmp:
        workdir = Path(tmp)
        try:
            upstream = start_upstream(python, records, server_pin)
            servers.append(upstream)
            uport = upstream.port
            rconf = workdir / "resolverd.yaml"
            rconf.write_text(resolverd_config(uport, workdir / "reg.json"))
            qfile = workdir / "queries-A.txt"
            write_query_file(qfile, names)

            rserver, rport = start_resolverd([python, "-m", "resolverd"], rconf, server_pin)
            servers.append(rserver)
            dserver, dport = start_dnsmasq(dnsmasq, uport, workdir, server_pin)
            servers.append(dserver)
            dnsmasq_cmd = dserver.argv[len(server_pin) :]
            wait_ready(upstream, UPSTREAM_HOST, uport, names[0])
            wait_ready(rserver, HOST, rport, names[0])
            wait_ready(dserver, HOST, dport, names[0])
            print(
                f"servers: upstream on {UPSTREAM_HOST}:{uport}, resolverd on {HOST}:{rport}, "
                f"dnsmasq on {HOST}:{dport}"
            )
            endpoints = {
                "upstream": (UPSTREAM_HOST, uport),
                "resolverd": (HOST, rport),
                "dnsmasq": (HOST, dport),
            }
            # Fills both caches (the first name already is, from wait_ready).
            checked, _, problems = verify(endpoints, records)
            if problems:
                raise RuntimeError(
                    "wrong answers before the benchmark:\n" + describe_problems(problems)
                )
            print(
                f"verified: {checked} queries, the same addresses from the upstream, "
                "resolverd and dnsmasq for every name; both caches now hold every name",
                flush=True,
            )

            upstream_before_load = upstream.count()
            for server, port in ((rserver, rport), (dserver, dport)):
                warm_up(dnsperf, load_pin, port, qfile, warmup, args)
                result = run_dnsperf(
                    dnsperf=dnsperf,
                    pin=load_pin,
                    server=server,
                    port=port,
                    upstream=upstream,
                    qfile=qfile,
                    seconds=args.seconds,
                    workdir=workdir,
                    args=args,
                )
                results.append(result)
                print(
                    f"  A   {server.name:<9} {result.qps:>9.0f} qps, "
                    f"upstream queries during the run: {result.upstream_queries}",
                    flush=True,
                )
            upstream_during_load = upstream.count() - upstream_before_load
            # After the load: still right, and TTLs counted down (cached, not refetched).
            _, ttls_after, after = verify(
                {"resolverd": (HOST, rport), "dnsmasq": (HOST, dport)}, records
            )
            for server_name, ttls in ttls_after.items():
                if ttls and max(ttls) >= TTL:
                    after.append(
                        f"{server_name}: TTL {max(ttls)} after the load: "
                        "an answer was fetched anew, not served from the cache"
                    )
            notable = [
                line
                for line in rserver.lines
                if '"level": "warning"' in line or '"level": "error"' in line
            ]
        finally:
            for server in reversed(servers):
                server.stop()

    by_server = {r.server: r for r in results}
    ratio = by_server["resolverd"].qps / by_server["dnsmasq"].qps
    print()
    for line in render_table(results):
        print(line)
    print()
    print(
        f"ratio resolverd/dnsmasq qps: {ratio:.2f} (target >= {TARGET_RATIO}: "
        f"{'met' if ratio >= TARGET_RATIO else 'MISSED'})"
    )
    cpu_ratio = by_server["resolverd"].qps_per_server_cpu / max(
        by_server["dnsmasq"].qps_per_server_cpu, 1e-9
    )
    print(
        f"ratio resolverd/dnsmasq queries per server CPU-second: {cpu_ratio:.2f} "
        "(less sensitive to other load on the machine)"
    )
    print(
        f"upstream: {upstream_during_load} queries during the warm-ups and timed runs "
        "(counted by the upstream itself); TTLs after the load: "
        + ", ".join(f"{name} {ttl_range(ttls)}" for name, ttls in ttls_after.items())
        + f" (upstream serves {TTL}: lower means counted down in the cache)"
    )
    print(
        "latency: avg from dnsperf; p50/p99/p99.9 are nearest-rank percentiles of every "
        "completed query's latency (dnsperf -v, 1 µs resolution)"
    )
    print(
        "CPU: share of one core; srv over dnsperf's run time, dnsperf over its wall time; "
        "runq wait: share of the run the server was runnable but waiting for a CPU; "
        "qps/srv CPU: completed queries per CPU-second the server used. "
        "At saturation latency is mostly queueing (~ outstanding / qps)."
    )
    for r in results:
        for warning in r.warnings:
            print(f"WARNING: {r.server}: {warning}")
    for line in notable:
        print(f"WARNING: resolverd logged: {line}")
    if upstream_during_load:
        print(
            f"WARNING: the upstream saw {upstream_during_load} queries during the load: "
            "not every answer came from a cache"
        )
    if after:
        print("WARNING: wrong answers after the load:\n" + describe_problems(after))
    if ratio < TARGET_RATIO:
        print(
            f"WARNING: resolverd's forwarded cache hits miss the target: {ratio:.2f}x "
            f"dnsmasq's qps, target {TARGET_RATIO}x"
        )

    report = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "versions": versions,
        "settings": {
            "names": len(names),
            "records": n_records,
            "ttl": TTL,
            "seconds": args.seconds,
            "warmup_seconds": warmup,
            "dnsperf_clients": args.clients,
            "dnsperf_outstanding": args.outstanding,
            "dnsperf_threads": 1,
            "max_qps": None,
            "pinning": pin_note,
            "address": HOST,
            "upstream_address": UPSTREAM_HOST,
            "dnsmasq_argv": dnsmasq_cmd,
        },
        "results": [asdict(r) for r in results],
        "qps_ratio_resolverd_over_dnsmasq": ratio,
        "per_cpu_ratio_resolverd_over_dnsmasq": cpu_ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
        "upstream_queries_during_load": upstream_during_load,
        "ttls_after_load": {name: [min(t), max(t)] for name, t in ttls_after.items() if t},
        "resolverd_warnings": notable,
        "wrong_answers_after_load": after,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
