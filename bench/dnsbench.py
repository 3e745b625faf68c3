"""Benchmark resolverd's UDP answer path against dnsmasq serving the same data.

What it measures: sustained UDP throughput (queries per second) and latency
(average, and p50/p99/p99.9 from dnsperf's per-query timings) of resolverd
answering ``A`` and ``SRV`` queries for 100 services x 3 instances, next to
dnsmasq answering the same names with the same records and TTL. Why dnsmasq:
it is a small, single-threaded C server that answers local data from memory,
so it is a fair one-core reference for a one-core Python/uvloop daemon, and
the qps ratio says whether resolverd's hot path costs more than it should.

How: everything runs on 127.0.0.1. The script writes a resolverd YAML config
(static provider, round robin) and a dnsmasq config (``host-record`` and
``srv-host`` lines; ``--no-resolv`` and no ``server=`` lines, so it never
forwards), starts both and checks that both give the same answers for every
name, queried without EDNS as dnsperf does: 3 A records; 3 SRV records with the
same targets, weights and ports and priorities {1, 2, 3} (resolverd's round
robin rotates which target has priority 1, dnsmasq's are fixed), plus the 3
targets' A records in the additional section; TTL 30; no truncation. Then it
runs dnsperf against each server and query type: a warm-up, then a timed run
with a fixed number of queries in flight and no rate limit, which saturates
the server. With ``taskset`` and at least two CPUs, both servers are pinned to
CPU 0 (only one is loaded at a time) and dnsperf to CPU 1, so the server under
test has one core to itself. The CPU each server and dnsperf used is reported:
a server near 100% is saturated; dnsperf near 100% means the load generator is
at its limit too, and the server might go faster with a faster client.

Latency percentiles come from ``dnsperf -v``, which prints every response's
latency (microsecond resolution); they are nearest-rank over all completed
queries. At saturation latency is mostly queueing: about in-flight / qps.

Output: a table on stdout and bench/out/results.json. A resolverd/dnsmasq qps
ratio below 1.0, lost queries, non-NOERROR responses or wrong answers after
the load print warnings; the exit status is 0 unless the benchmark could not
run (a tool missing, a server failing to start, or wrong answers before it).

Usage: ``python bench/dnsbench.py [--seconds N] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

HOST = "127.0.0.1"  # the only address anything binds to or queries
DOMAIN = "bench.internal"
TTL = 30
SRV_PORT = 8080
INSTANCES_PER_SERVICE = 3
QTYPES = ("A", "SRV")
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out" / "results.json"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    service: str
    address: str
    priority: int

    @property
    def target(self) -> str:
        """resolverd's SRV target name for the instance; dnsmasq is given the same."""
        return f"{self.id}.{self.service}.instance.{DOMAIN}"


def make_instances(services: int) -> list[Instance]:
    """svc-000 .. svc-NNN, instance j (1..3) of service i at 127.1.i.j."""
    return [
        Instance(
            id=f"svc-{i:03d}-{j}", service=f"svc-{i:03d}", address=f"127.1.{i}.{j}", priority=j
        )
        for i in range(services)
        for j in range(1, INSTANCES_PER_SERVICE + 1)
    ]


def service_names(instances: Sequence[Instance]) -> list[str]:
    return sorted({inst.service for inst in instances})


def qname(service: str, qtype: str) -> str:
    return f"{service}.{DOMAIN}" if qtype == "A" else f"_{service}._tcp.{DOMAIN}"


def resolverd_config(instances: Sequence[Instance]) -> str:
    """The YAML config; listen port 0, the bound port is read from the daemon's log."""
    lines = ["service_discovery:", "  provider: static", "  static_services:"]
    lines += [
        f'    - {{id: {inst.id}, name: {inst.service}, version: "1.0.0", '
        f"address: {inst.address}, port: {SRV_PORT}}}"
        for inst in instances
    ]
    lines += [
        "  load_balancer:",
        "    algorithm: round_robin",
        "    health_check_enabled: true",
        "dns:",
        f"  listen: {HOST}:0",
        f"  domains: [{DOMAIN}]",
        f"  ttl: {TTL}",
        "log:",
        "  format: json",
        "",
    ]
    return "\n".join(lines)


def dnsmasq_config(instances: Sequence[Instance]) -> str:
    """Same records: 3 A per service name, 3 SRV per _svc._tcp name, A for each target.

    SRV priorities and weights copy resolverd's (priority = instance number, weight 1).
    """
    lines = ["# generated by bench/dnsbench.py: local data only, never forwards"]
    for inst in instances:
        lines.append(f"host-record={inst.service}.{DOMAIN},{inst.address}")
    for inst in instances:
        lines.append(f"host-record={inst.target},{inst.address}")
    for inst in instances:
        lines.append(
            f"srv-host=_{inst.service}._tcp.{DOMAIN},{inst.target},{SRV_PORT},{inst.priority},1"
        )
    lines.append(f"local-ttl={TTL}")
    lines.append("")
    return "\n".join(lines)


def write_query_file(path: Path, services: Sequence[str], qtype: str) -> None:
    path.write_text("".join(f"{qname(s, qtype)} {qtype}\n" for s in services))


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """A port free for both UDP and TCP on HOST (dnsmasq binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port on 127.0.0.1")


class Server:
    """A server subprocess whose output is drained into memory by a thread."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(
            target=self._drain, args=(self.proc.stdout,), name=f"{name}-output", daemon=True
        )
        self._reader.start()

    def _drain(self, stream: TextIO) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log}")
                if remaining <= 0:
                    raise RuntimeError(f"{self.name}: timed out waiting for {pattern.pattern}")
                self._cond.wait(min(remaining, 0.2))

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-40:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log}")

    def cpu_seconds(self) -> float:
        """user + system CPU time of the process (all threads) so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=2)


LISTENING_RE = re.compile(r'^\{.*"event": "dns\.listening".*\}$')


def start_resolverd(exe: str, config: Path, pin: list[str]) -> tuple[Server, int]:
    server = Server("resolverd", [*pin, exe, "run", "-c", str(config)])
    deadline = time.monotonic() + 30
    while True:
        server.wait_for_line(LISTENING_RE, timeout=max(0.1, deadline - time.monotonic()))
        for line in list(server.lines):
            if not LISTENING_RE.match(line):
                continue
            event = json.loads(line)
            if event.get("proto") == "udp":
                if event.get("address") != HOST:
                    raise RuntimeError(f"resolverd listens on {event.get('address')}, not {HOST}")
                return server, int(event["port"])
        if time.monotonic() > deadline:
            raise RuntimeError(f"resolverd logged no UDP dns.listening event:\n{server.log}")
        time.sleep(0.05)


def start_dnsmasq(exe: str, config: Path, workdir: Path, pin: list[str]) -> tuple[Server, int]:
    port = free_port()
    argv = [
        *pin,
        exe,
        "--no-daemon",
        "--no-resolv",  # no upstream from /etc/resolv.conf; the config has no server= lines
        "--no-hosts",
        "--no-poll",
        f"--port={port}",
        f"--listen-address={HOST}",
        "--bind-interfaces",
        f"--conf-file={config}",
        f"--pid-file={workdir / 'dnsmasq.pid'}",
        "--log-facility=-",
    ]
    if os.geteuid() == 0:
        argv.append("--user=root")
    server = Server("dnsmasq", argv)
    server.wait_for_line(re.compile(r"started, version"), timeout=15)
    return server, port


def wait_ready(server: Server, port: int, name: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        try:
            query(port, name, "A", timeout=0.5)
            return
        except (dns.exception.Timeout, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} does not answer on {HOST}:{port}") from None


# --------------------------------------------------------------------------- verification


def query(port: int, name: str, qtype: str, timeout: float = 2.0) -> dns.message.Message:
    """One UDP query without EDNS, as dnsperf sends them."""
    message = dns.message.make_query(name, qtype)
    return dns.query.udp(message, HOST, port=port, timeout=timeout)


@dataclass(frozen=True, slots=True)
class Answer:
    """What a response says, normalised for comparison (order-free)."""

    ttl: int
    records: list[Any]  # A: addresses; SRV: (port, weight, target), sorted
    priorities: list[int]  # SRV priorities, sorted
    glue: list[tuple[str, str]]  # SRV: additional-section A records (name, address), sorted


def summarize(response: dns.message.Message, qtype: str) -> Answer:
    """The answer and additional sections; raises ValueError on anything unexpected."""
    rcode = dns.rcode.to_text(response.rcode())
    if rcode != "NOERROR":
        raise ValueError(f"rcode {rcode}")
    if response.flags & dns.flags.TC:
        raise ValueError("truncated (TC) without EDNS")
    rdtype = dns.rdatatype.from_text(qtype)
    records: list[Any] = []
    priorities: list[int] = []
    ttls: set[int] = set()
    for rrset in response.answer:
        if rrset.rdtype != rdtype:
            raise ValueError(f"unexpected {dns.rdatatype.to_text(rrset.rdtype)} in answer")
        ttls.add(rrset.ttl)
        for rr in rrset:
            if qtype == "A":
                records.append(rr.address)
            else:
                target = rr.target.to_text(omit_final_dot=True).lower()
                records.append((rr.port, rr.weight, target))
                priorities.append(rr.priority)
    glue = [
        (rrset.name.to_text(omit_final_dot=True).lower(), rr.address)
        for rrset in response.additional
        if rrset.rdtype == dns.rdatatype.A
        for rr in rrset
    ]
    if len(ttls) != 1:
        raise ValueError(f"TTLs {sorted(ttls)}")
    return Answer(ttls.pop(), sorted(records), sorted(priorities), sorted(glue))


def verify(servers: dict[str, int], instances: Sequence[Instance]) -> tuple[int, list[str]]:
    """Every name gets the expected records from every server: (queries sent, problems).

    SRV priorities are compared as a set ({1, 2, 3}), not per target: resolverd's
    round robin rotates which instance gets priority 1; dnsmasq's are fixed.
    """
    by_service: dict[str, list[Instance]] = {}
    for inst in instances:
        by_service.setdefault(inst.service, []).append(inst)
    problems: list[str] = []
    checked = 0
    for service, members in sorted(by_service.items()):
        expected = {
            "A": Answer(TTL, sorted(m.address for m in members), [], []),
            "SRV": Answer(
                TTL,
                sorted((SRV_PORT, 1, m.target) for m in members),
                sorted(m.priority for m in members),
                sorted((m.target, m.address) for m in members),
            ),
        }
        for qtype in QTYPES:
            name = qname(service, qtype)
            for server, port in servers.items():
                checked += 1
                try:
                    got = summarize(query(port, name, qtype), qtype)
                except Exception as exc:
                    problems.append(f"{server} {name} {qtype}: {exc}")
                    continue
                if got != expected[qtype]:
                    problems.append(
                        f"{server} {name} {qtype}: got {got}, expected {expected[qtype]}"
                    )
    return checked, problems


def describe_problems(problems: Sequence[str], limit: int = 10) -> str:
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"  {shown}{more}"


# --------------------------------------------------------------------------- dnsperf


@dataclass(slots=True)
class RunResult:
    server: str
    qtype: str
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
    warnings: list[str] = field(default_factory=list)


STAT_PATTERNS = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "runtime": re.compile(r"Run time \(s\):\s+([\d.]+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "avg": re.compile(r"Average Latency \(s\):\s+([\d.]+) \(min ([\d.]+), max ([\d.]+)\)"),
    "stddev": re.compile(r"Latency StdDev \(s\):\s+([\d.]+)"),
    "size": re.compile(r"Average packet size:\s+request (\d+), response (\d+)"),
    "rcodes": re.compile(r"Response codes:\s+(.*)"),
}
RCODE_RE = re.compile(r"([A-Z]+) (\d+) \(")


def dnsperf_argv(
    dnsperf: str, pin: list[str], port: int, qfile: Path, seconds: float, args: argparse.Namespace
) -> list[str]:
    # No -Q: no rate limit. -q outstanding queries keep the server busy all the time.
    return [
        *pin,
        dnsperf,
        "-s",
        HOST,
        "-p",
        str(port),
        "-d",
        str(qfile),
        "-l",
        f"{seconds:g}",
        "-c",
        str(args.clients),
        "-q",
        str(args.outstanding),
        "-T",
        "1",
    ]


def percentile_ms(histogram: Counter[int], total: int, permille: int) -> float | None:
    """Nearest-rank percentile (``permille`` 990 is p99) of µs-resolution samples, in ms."""
    if total == 0:
        return None
    rank = max(1, -(-total * permille // 1000))  # ceil(total * permille / 1000)
    seen = 0
    for micros in sorted(histogram):
        seen += histogram[micros]
        if seen >= rank:
            return micros / 1000
    return max(histogram) / 1000


def parse_dnsperf(path: Path) -> tuple[dict[str, Any], Counter[int], Counter[str]]:
    """Summary stats, a latency histogram (µs -> count) and rcodes from `dnsperf -v` output.

    Verbose lines are ``> RCODE name type latency-seconds`` (``> T name type`` for a
    timeout), printed with microsecond precision.
    """
    histogram: Counter[int] = Counter()
    verbose_rcodes: Counter[str] = Counter()
    other: list[str] = []
    with path.open() as fh:
        for line in fh:
            if line.startswith("> "):
                parts = line.split()
                if len(parts) == 5:
                    histogram[round(float(parts[4]) * 1_000_000)] += 1
                verbose_rcodes[parts[1]] += 1
            else:
                other.append(line)
    text = "".join(other)
    stats: dict[str, Any] = {}
    for key, pattern in STAT_PATTERNS.items():
        match = pattern.search(text)
        if match is None:
            raise RuntimeError(f"dnsperf output has no {key!r} line:\n{text[-2000:]}")
        stats[key] = match.groups()
    stats["rcodes"] = {code: int(n) for code, n in RCODE_RE.findall(stats["rcodes"][0])}
    return stats, histogram, verbose_rcodes


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def udp_rcvbuf_errors() -> int | None:
    """The kernel's count of UDP datagrams dropped for a full socket receive buffer."""
    try:
        rows = [
            line.split()
            for line in Path("/proc/net/snmp").read_text().splitlines()
            if line.startswith("Udp:")
        ]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return None


def run_dnsperf(
    *,
    dnsperf: str,
    pin: list[str],
    server: Server,
    port: int,
    qtype: str,
    qfile: Path,
    seconds: float,
    workdir: Path,
    args: argparse.Namespace,
) -> RunResult:
    out = workdir / f"dnsperf-{server.name}-{qtype}.txt"
    argv = [*dnsperf_argv(dnsperf, pin, port, qfile, seconds, args), "-v"]
    server_before, children_before = server.cpu_seconds(), children_cpu()
    drops_before, started = udp_rcvbuf_errors(), time.monotonic()
    with out.open("w") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.PIPE, text=True, check=False)
    wall = time.monotonic() - started
    server_cpu = server.cpu_seconds() - server_before
    dnsperf_cpu = children_cpu() - children_before
    drops_after = udp_rcvbuf_errors()
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
    return RunResult(
        server=server.name,
        qtype=qtype,
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
        warnings=warnings,
    )


def warm_up(
    dnsperf: str, pin: list[str], port: int, qfile: Path, seconds: float, a: argparse.Namespace
) -> None:
    argv = dnsperf_argv(dnsperf, pin, port, qfile, seconds, a)
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"dnsperf warm-up failed ({proc.returncode}): {proc.stderr.strip()}")


# --------------------------------------------------------------------------- reporting


def first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def dnsperf_version(dnsperf: str) -> str:
    proc = subprocess.run([dnsperf, "-h"], capture_output=True, text=True, check=False)
    match = re.search(r"Version (\S+)", proc.stdout + proc.stderr)
    return f"dnsperf {match.group(1)}" if match else "dnsperf (unknown version)"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_table(results: Sequence[RunResult]) -> list[str]:
    header = (
        f"{'query':<5}  {'server':<9}  {'qps':>9}  {'avg ms':>7}  {'p50 ms':>7}  "
        f"{'p99 ms':>7}  {'p99.9 ms':>8}  {'lost':>4}  {'rcode':>7}  {'resp B':>6}  "
        f"{'srv CPU':>7}  {'dnsperf CPU':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        noerror = r.rcodes.get("NOERROR", 0)
        ok = "NOERROR" if noerror == r.queries_completed else "MIXED"
        lines.append(
            f"{r.qtype:<5}  {r.server:<9}  {r.qps:>9.0f}  {r.avg_latency_ms:>7.3f}  "
            f"{fmt(r.p50_latency_ms):>7}  {fmt(r.p99_latency_ms):>7}  "
            f"{fmt(r.p999_latency_ms):>8}  {r.queries_lost:>4}  {ok:>7}  {r.response_bytes:>6}  "
            f"{r.server_cpu_percent:>6.0f}%  {r.dnsperf_cpu_percent:>10.0f}%"
        )
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="resolverd vs dnsmasq UDP benchmark with dnsperf (127.0.0.1 only)."
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="length of each timed run (default 10)"
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs, for smoke testing")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="warm-up run before each timed run (default 2)"
    )
    parser.add_argument("--services", type=int, default=100, help="services (default 100)")
    parser.add_argument("--clients", type=int, default=4, help="dnsperf -c (default 4)")
    parser.add_argument(
        "--outstanding",
        type=int,
        default=100,
        help="dnsperf -q, queries in flight (default 100: saturates both servers here; "
        "200 overflows the default 208 KiB socket receive buffer in bursts)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs with taskset")
    parser.add_argument(
        "--resolverd",
        default=str(Path(sys.executable).with_name("resolverd")),
        help="resolverd executable (default: next to this python)",
    )
    parser.add_argument("--dnsmasq", default="dnsmasq", help="dnsmasq executable")
    parser.add_argument("--dnsperf", default="dnsperf", help="dnsperf executable")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 2.0
    if not 1 <= args.services <= 256:
        parser.error("--services must be 1..256 (addresses are 127.1.<service>.<n>)")
    return args


def which(name: str, what: str) -> str:
    path = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
    if path is None:
        raise SystemExit(f"dnsbench: {what} not found ({name}); `make bench-deps` installs it")
    return path


def pinning(disabled: bool) -> tuple[list[str], list[str], str]:
    """taskset prefixes for the servers and for dnsperf, and a sentence saying so."""
    taskset = shutil.which("taskset")
    cpus = sorted(os.sched_getaffinity(0))
    if disabled:
        return [], [], "no CPU pinning (--no-pin)"
    if taskset is None or len(cpus) < 2:
        why = "taskset not found" if taskset is None else f"only {len(cpus)} CPU available"
        return [], [], f"no CPU pinning ({why}): servers and dnsperf share the CPUs"
    server_cpu, load_cpu = cpus[0], cpus[1]
    return (
        [taskset, "-c", str(server_cpu)],
        [taskset, "-c", str(load_cpu)],
        f"servers pinned to CPU {server_cpu} (one loaded at a time), "
        f"dnsperf to CPU {load_cpu} (taskset)",
    )


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the servers are stopped by `finally`."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    resolverd = which(args.resolverd, "resolverd")
    dnsmasq = which(args.dnsmasq, "dnsmasq")
    dnsperf = which(args.dnsperf, "dnsperf")
    server_pin, load_pin, pin_note = pinning(args.no_pin)
    warmup = min(args.warmup, args.seconds)

    instances = make_instances(args.services)
    services = service_names(instances)
    versions = {
        "resolverd": first_line([resolverd, "version"]),
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
    print(
        f"dnsbench: {len(services)} services x {INSTANCES_PER_SERVICE} instances, UDP on {HOST}",
        flush=True,
    )
    print(f"machine: nproc={machine['nproc']} ({machine['cpu_model']}), {pin_note}")
    print("versions: " + "; ".join(versions.values()))
    print(
        f"dnsperf: -c {args.clients} -q {args.outstanding} -T 1, no -Q (unlimited rate); "
        f"{warmup:g} s warm-up + {args.seconds:g} s timed run per server and query type",
        flush=True,
    )

    servers: list[Server] = []
    results: list[RunResult] = []
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="dnsbench-") as tmp:
        workdir = Path(tmp)
        try:
            rconf = workdir / "resolverd.yaml"
            rconf.write_text(resolverd_config(instances))
            dconf = workdir / "dnsmasq.conf"
            dconf.write_text(dnsmasq_config(instances))
            qfiles = {qtype: workdir / f"queries-{qtype}.txt" for qtype in QTYPES}
            for qtype, path in qfiles.items():
                write_query_file(path, services, qtype)

            rserver, rport = start_resolverd(resolverd, rconf, server_pin)
            servers.append(rserver)
            dserver, dport = start_dnsmasq(dnsmasq, dconf, workdir, server_pin)
            servers.append(dserver)
            first = qname(services[0], "A")
            wait_ready(rserver, rport, first)
            wait_ready(dserver, dport, first)
            print(f"servers: resolverd on {HOST}:{rport}, dnsmasq on {HOST}:{dport}")
            checked, problems = verify({"resolverd": rport, "dnsmasq": dport}, instances)
            if problems:
                raise RuntimeError(
                    "wrong answers before the benchmark:\n" + describe_problems(problems)
                )
            print(
                f"verified: {checked} queries, same answers from both (3 A; 3 SRV + 3 glue A; "
                f"TTL {TTL}; no TC without EDNS)",
                flush=True,
            )

            for qtype in QTYPES:
                for server, port in ((rserver, rport), (dserver, dport)):
                    warm_up(dnsperf, load_pin, port, qfiles[qtype], warmup, args)
                    result = run_dnsperf(
                        dnsperf=dnsperf,
                        pin=load_pin,
                        server=server,
                        port=port,
                        qtype=qtype,
                        qfile=qfiles[qtype],
                        seconds=args.seconds,
                        workdir=workdir,
                        args=args,
                    )
                    results.append(result)
                    print(
                        f"  {qtype:<3} {server.name:<9} {result.qps:>9.0f} qps",
                        flush=True,
                    )
            # Answers must still be right after the load (caches, round-robin state).
            _, after = verify({"resolverd": rport, "dnsmasq": dport}, instances)
            notable = [
                line
                for line in rserver.lines
                if '"level": "warning"' in line or '"level": "error"' in line
            ]
        finally:
            for server in reversed(servers):
                server.stop()

    ratios = {
        qtype: next(r.qps for r in results if r.qtype == qtype and r.server == "resolverd")
        / next(r.qps for r in results if r.qtype == qtype and r.server == "dnsmasq")
        for qtype in QTYPES
    }
    print()
    for line in render_table(results):
        print(line)
    print()
    print(
        "ratio resolverd/dnsmasq qps: "
        + ", ".join(f"{qtype} {ratio:.2f}" for qtype, ratio in ratios.items())
    )
    print(
        "latency: avg from dnsperf; p50/p99/p99.9 are nearest-rank percentiles of every "
        "completed query's latency (dnsperf -v, 1 µs resolution)"
    )
    print(
        "CPU: share of one core; srv over dnsperf's run time, dnsperf over its wall time. "
        "At saturation latency is mostly queueing (~ outstanding / qps)."
    )
    for r in results:
        for warning in r.warnings:
            print(f"WARNING: {r.qtype} {r.server}: {warning}")
    for line in notable:
        print(f"WARNING: resolverd logged: {line}")
    if after:
        print("WARNING: wrong answers after the load:\n" + describe_problems(after))
    for qtype, ratio in ratios.items():
        if ratio < 1.0:
            print(
                f"WARNING: resolverd is slower than dnsmasq for {qtype}: {ratio:.2f}x dnsmasq's qps"
            )

    report = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "versions": versions,
        "settings": {
            "services": len(services),
            "instances_per_service": INSTANCES_PER_SERVICE,
            "seconds": args.seconds,
            "warmup_seconds": warmup,
            "dnsperf_clients": args.clients,
            "dnsperf_outstanding": args.outstanding,
            "dnsperf_threads": 1,
            "max_qps": None,
            "pinning": pin_note,
            "address": HOST,
        },
        "results": [asdict(r) for r in results],
        "qps_ratio_resolverd_over_dnsmasq": ratios,
        "resolverd_warnings": notable,
        "wrong_answers_after_load": after,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
