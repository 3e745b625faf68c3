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
from typing import Any

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


# --------------------------------------------------------------------------- reporting


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    resolverd = which(args.resolverd, "resolverd", "dnsbench")
    dnsmasq = which(args.dnsmasq, "dnsmasq", "dnsbench")
    dnsperf = which(args.dnsperf, "dnsperf", "dnsbench")
    server_pin, load_pin, pin_note = pinning(
        args.no_pin,
        "servers and dnsperf share the CPUs",
        "servers pinned to CPU {server} (one loaded at a time), dnsperf to CPU {load} (taskset)",
    )
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

            rserver, rport = start_resolverd([resolverd], rconf, server_pin)
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
