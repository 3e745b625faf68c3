"""How fast a registry change reaches a DNS answer, and what a big table costs.

Propagation: the time from a change in the backend (an etcd put) until a DNS
query to resolverd returns it, over N changes (200; 50 with --quick). Each
change gives one of three instances of the service ``bench`` a new, unique
address; the clock starts just before the put is sent and stops when an A
answer containing the new address arrives. Queries are sent back to back
from a raw UDP socket (a 0.2 ms pause between them, no longer sleeps), so the
resolution is the query round trip. The put's own acknowledgement time (etcd
committing to its temp data dir) is reported apart: it is part of the
propagation, not of resolverd. Targets on loopback: p50 <= 10 ms, p99 <= 50 ms.

Scale: S services x 10 instances (10,000 x 10; 1,000 x 10 with --quick) are
loaded into the backend first, then a fresh daemon is started and the clock
runs from its spawn until a DNS answer shows all 10 instances of the last
service (the provider publishes its first snapshot only once the whole read
is done). Printed: that time, the provider's own read time (its
``etcd.synced`` log line), the daemon's resident memory (VmRSS, and VmHWM the
peak) once synced next to a daemon holding 3 instances, and the propagation
of a few changes with the big table loaded (each change rebuilds the table's
merged view).

Everything runs on 127.0.0.1: a real etcd (tests/etcd_server.py) and
``python -m resolverd run`` as a subprocess with a JSON log, whose
``dns.listening`` line gives the UDP port. etcd's data dir is on /dev/shm by
default (``--tmp DIR`` to choose): on a shared disk, other processes' I/O
stalls etcd's fsync for hundreds of milliseconds, which says nothing about
resolverd. Everything started is stopped and
every temp dir removed, also on errors and SIGTERM. Exit status 0 unless the
benchmark could not run.

Backends are one function pair each in BACKENDS (etcd now; Consul and
Kubernetes fit the same shape: a context manager that yields a `Backend`).

Usage: ``python bench/propagation.py [--quick] [--changes N] [--services N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import proc_cpu_seconds, sigterm_as_exit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.etcd_server import ETCD, EtcdMissingError, EtcdServer  # noqa: E402

HOST = "127.0.0.1"
DOMAIN = "resolverd.internal"
INSTANCES_PER_SERVICE = 10
PROPAGATION_INSTANCES = 3
TARGETS_MS = {"p50": 10.0, "p99": 50.0}
DEFAULT_OUT = ROOT / "bench" / "out" / "propagation.json"


# --------------------------------------------------------------------------- DNS probing


def a_query(qname: str, qid: int) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD, one question
    labels = b"".join(bytes([len(p)]) + p.encode() for p in qname.strip(".").split("."))
    return header + labels + b"\x00" + struct.pack("!HH", 1, 1)  # A, IN


def _skip_name(msg: bytes, pos: int) -> int:
    while True:
        length = msg[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:  # compression pointer ends the name
            return pos + 2
        pos += 1 + length


def a_addresses(msg: bytes) -> set[str]:
    """The A records in the answer section of a DNS response."""
    qdcount, ancount = struct.unpack("!HH", msg[4:8])
    pos = 12
    for _ in range(qdcount):
        pos = _skip_name(msg, pos) + 4
    found = set()
    for _ in range(ancount):
        pos = _skip_name(msg, pos)
        rtype, _cls, _ttl, rdlength = struct.unpack("!HHIH", msg[pos : pos + 10])
        pos += 10
        if rtype == 1 and rdlength == 4:
            found.add(socket.inet_ntoa(msg[pos : pos + 4]))
        pos += rdlength
    return found


class Prober:
    """Asks resolverd for A records of a name over one UDP socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((HOST, port))
        self.sock.settimeout(0.2)
        self._id = random.randrange(65536)

    def ask(self, qname: str) -> set[str]:
        self._id = (self._id + 1) & 0xFFFF
        self.sock.send(a_query(qname, self._id))
        while True:
            try:
                reply = self.sock.recv(65535)
            except TimeoutError:
                return set()
            if reply[:2] == struct.pack("!H", self._id):
                return a_addresses(reply)

    def wait_until(
        self, qname: str, done: Callable[[set[str]], bool], *, timeout: float = 10.0
    ) -> float:
        """perf_counter() when an answer for qname satisfies `done`."""
        deadline = time.perf_counter() + timeout
        while True:
            answer = self.ask(qname)
            now = time.perf_counter()
            if done(answer):
                return now
            if now > deadline:
                raise RuntimeError(f"{qname}: no expected answer within {timeout}s: {answer}")
            time.sleep(0.0002)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- the daemon


LISTENING = re.compile(r'"event": "dns\.listening"')


class Daemon:
    """`python -m resolverd run` with a JSON log in a file (never a full pipe)."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.log_path = workdir / f"resolverd-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resolverd", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.udp_port = self._udp_port()

    def events(self) -> Iterator[dict[str, Any]]:
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                yield json.loads(line)

    def wait_event(self, done: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if done(event):
                    return event
            if self.proc.poll() is not None:
                raise RuntimeError(f"resolverd exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"resolverd: timed out waiting in its log:\n{self.tail()}")
            time.sleep(0.005)

    def _udp_port(self) -> int:
        event = self.wait_event(
            lambda e: e.get("event") == "dns.listening" and e.get("proto") == "udp", 30
        )
        return int(event["port"])

    def memory_kib(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def cpu_seconds(self) -> float:
        """user + system CPU time of the daemon so far (all threads)."""
        return proc_cpu_seconds(self.proc.pid)

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def daemon_config(workdir: Path, provider: dict[str, Any]) -> Path:
    data = {
        "service_discovery": {**provider, "load_balancer": {"algorithm": "round_robin"}},
        "dns": {"listen": f"{HOST}:0", "domains": [DOMAIN]},
        "api": {"listen": f"{HOST}:0"},
        "registrations": {"state_file": str(workdir / f"registrations-{time.monotonic_ns()}.json")},
        "log": {"format": "json", "level": "info"},
    }
    path = workdir / f"resolverd-{time.monotonic_ns()}.yaml"
    path.write_text(json.dumps(data, indent=1))  # JSON is YAML
    return path


# --------------------------------------------------------------------------- results


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Propagation:
    backend: str
    table_instances: int
    changes: int
    latencies_ms: list[float] = field(repr=False)
    ack_ms: list[float] = field(repr=False)

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def max(self) -> float:
        return max(self.latencies_ms)

    @property
    def ack_p50(self) -> float:
        return percentile(self.ack_ms, 50)

    @property
    def after_ack_ms(self) -> list[float]:
        """From etcd's acknowledgement of the put to the answer: resolverd's
        share (the watch event may even arrive before the ack: then ~0)."""
        return [max(0.0, t - a) for t, a in zip(self.latencies_ms, self.ack_ms, strict=True)]

    def summary(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "table_instances": self.table_instances,
            "changes": self.changes,
            "p50_ms": round(self.p50, 3),
            "p99_ms": round(self.p99, 3),
            "max_ms": round(self.max, 3),
            "put_ack_p50_ms": round(self.ack_p50, 3),
            "put_ack_p99_ms": round(percentile(self.ack_ms, 99), 3),
            "after_ack_p50_ms": round(percentile(self.after_ack_ms, 50), 3),
            "after_ack_p99_ms": round(percentile(self.after_ack_ms, 99), 3),
        }


@dataclass
class Scale:
    backend: str
    services: int
    instances: int
    load_seconds: float
    sync_seconds: float  # daemon spawn -> answer with the last service
    listening_seconds: float  # daemon spawn -> DNS socket bound
    provider_read_seconds: float | None
    sync_cpu_seconds: float  # the daemon's CPU time until synced
    rss_mib: float
    peak_rss_mib: float
    small_rss_mib: float  # a daemon with the propagation benchmark's 3 instances
    propagation: Propagation | None = None


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """What a benchmark needs from a registry."""

    name: str
    version: str
    provider: dict[str, Any]  # the service_discovery keys selecting it
    # Put instance `index` of `service` at `address`; returns when acknowledged.
    put: Callable[[str, int, str], Awaitable[None]]
    # Load services x instances as fast as the backend allows.
    load: Callable[[int, int], Awaitable[None]]


def instance_json(service: str, index: int, address: str) -> str:
    """The seed's ServiceInstance JSON, as a registering service would write it."""
    return json.dumps(
        {
            "id": f"{service}-{index}",
            "name": service,
            "version": "1.2.0",
            "address": address,
            "port": 8080,
            "tags": ["production", "primary" if index == 0 else "secondary"],
            "metadata": {"weight": "10", "region": "us-east-1"},
            "health": "healthy",
            "lastHeartbeat": "2024-01-15T10:30:00.000Z",
        }
    )


def scale_address(service: int, index: int) -> str:
    return f"127.{10 + service // 250}.{service % 250}.{index + 1}"


@contextlib.asynccontextmanager
async def etcd_backend(workdir: Path) -> Any:
    import aetcd  # type: ignore[import-untyped]

    server = EtcdServer(extra_args=("--max-txn-ops=1000",), tmp_root=str(workdir))
    try:
        server.start()
        version = subprocess.run(
            [ETCD, "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
        async with aetcd.Client(HOST, server.client_port, timeout=30) as client:

            async def put(service: str, index: int, address: str) -> None:
                key = f"/services/{service}/{service}-{index}"
                await client.put(key.encode(), instance_json(service, index, address).encode())

            async def load(services: int, per_service: int) -> None:
                ops = [
                    client.transactions.put(
                        f"/services/svc-{s:05d}/svc-{s:05d}-{i}".encode(),
                        instance_json(f"svc-{s:05d}", i, scale_address(s, i)).encode(),
                    )
                    for s in range(services)
                    for i in range(per_service)
                ]
                batches = [ops[n : n + 1000] for n in range(0, len(ops), 1000)]
                for group in range(0, len(batches), 4):  # four transactions in flight
                    await asyncio.gather(
                        *(
                            client.transaction(compare=[], success=batch, failure=[])
                            for batch in batches[group : group + 4]
                        )
                    )

            yield Backend(
                name="etcd",
                version=version,
                provider={
                    "provider": "etcd",
                    "etcd": {"endpoints": [server.endpoint], "reconnect_max": "1s"},
                },
                put=put,
                load=load,
            )
    finally:
        server.close()


# name -> a context manager yielding a Backend (Consul and Kubernetes go here).
BACKENDS: dict[str, Callable[[Path], Any]] = {"etcd": etcd_backend}


# --------------------------------------------------------------------------- measurements


def shows(address: str) -> Callable[[set[str]], bool]:
    return lambda answer: address in answer


async def measure_propagation(
    backend: Backend, daemon: Daemon, *, changes: int, service: str, table_instances: int
) -> Propagation:
    probe = Prober(daemon.udp_port)
    qname = f"{service}.{DOMAIN}"
    latencies: list[float] = []
    acks: list[float] = []
    try:
        for n in range(changes):
            index = n % PROPAGATION_INSTANCES
            address = f"127.200.{n // 250}.{n % 250 + 1}"  # new each time
            start = time.perf_counter()
            await backend.put(service, index, address)
            acks.append((time.perf_counter() - start) * 1000)
            seen = probe.wait_until(qname, shows(address))
            latencies.append((seen - start) * 1000)
    finally:
        probe.close()
    return Propagation(backend.name, table_instances, changes, latencies, acks)


async def run_backend(name: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    async with BACKENDS[name](workdir) as backend:
        # -- propagation on a small table
        for index in range(PROPAGATION_INSTANCES):
            await backend.put("bench", index, f"127.100.0.{index + 1}")
        daemon = Daemon(daemon_config(workdir, backend.provider), workdir)
        try:
            probe = Prober(daemon.udp_port)
            try:
                probe.wait_until(f"bench.{DOMAIN}", lambda a: len(a) == PROPAGATION_INSTANCES)
            finally:
                probe.close()
            small_rss = daemon.memory_kib()["VmRSS"] / 1024
            propagation = await measure_propagation(
                backend,
                daemon,
                changes=args.changes,
                service="bench",
                table_instances=PROPAGATION_INSTANCES,
            )
        finally:
            daemon.stop()

        # -- the table at scale
        started = time.perf_counter()
        await backend.load(args.services, INSTANCES_PER_SERVICE)
        load_seconds = time.perf_counter() - started
        total = args.services * INSTANCES_PER_SERVICE + PROPAGATION_INSTANCES
        daemon = Daemon(daemon_config(workdir, backend.provider), workdir)
        try:
            listening = time.perf_counter() - daemon.started
            probe = Prober(daemon.udp_port)
            try:
                last = f"svc-{args.services - 1:05d}.{DOMAIN}"
                synced = probe.wait_until(
                    last, lambda a: len(a) == INSTANCES_PER_SERVICE, timeout=600
                )
            finally:
                probe.close()
            memory = daemon.memory_kib()
            sync_cpu = daemon.cpu_seconds()
            read = next(
                (e.get("seconds") for e in daemon.events() if e.get("event") == f"{name}.synced"),
                None,
            )
            loaded = await measure_propagation(
                backend,
                daemon,
                changes=args.scale_changes,
                service="bench",
                table_instances=total,
            )
        finally:
            daemon.stop()
        scale = Scale(
            backend=name,
            services=args.services,
            instances=args.services * INSTANCES_PER_SERVICE,
            load_seconds=load_seconds,
            sync_seconds=synced - daemon.started,
            listening_seconds=listening,
            provider_read_seconds=read,
            sync_cpu_seconds=sync_cpu,
            rss_mib=memory["VmRSS"] / 1024,
            peak_rss_mib=memory["VmHWM"] / 1024,
            small_rss_mib=small_rss,
            propagation=loaded,
        )
        return {"version": backend.version, "propagation": propagation, "scale": scale}


# --------------------------------------------------------------------------- output


def verdict(p: Propagation) -> str:
    ok = p.p50 <= TARGETS_MS["p50"] and p.p99 <= TARGETS_MS["p99"]
    return "ok" if ok else "MISSED"


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def render(
    results: dict[str, dict[str, Any]], args: argparse.Namespace, loads: Sequence[str]
) -> list[str]:
    lines = [
        "",
        f"load average (1/5/15 min) before: {loads[0]}, after: {loads[1]} "
        f"on {len(os.sched_getaffinity(0))} CPUs (other work on the machine skews the tails)",
        "",
        f"propagation: backend put -> DNS answer with the change ({args.changes} changes, "
        f"{PROPAGATION_INSTANCES} instances in the table)",
        f"  {'backend':<8} {'p50':>9} {'p99':>9} {'max':>9}   {'target p50/p99':<17} verdict",
    ]
    for name, r in results.items():
        p: Propagation = r["propagation"]
        target = f"<= {TARGETS_MS['p50']:g} / <= {TARGETS_MS['p99']:g} ms"
        lines.append(
            f"  {name:<8} {p.p50:>6.2f} ms {p.p99:>6.2f} ms {p.max:>6.2f} ms   {target:<17} "
            f"{verdict(p)}"
        )
        after = p.after_ack_ms
        lines.append(
            f"    of which the backend's put acknowledgement: p50 {p.ack_p50:.2f} ms, "
            f"p99 {percentile(p.ack_ms, 99):.2f} ms; after the ack: "
            f"p50 {percentile(after, 50):.2f} ms, p99 {percentile(after, 99):.2f} ms"
        )
    for name, r in results.items():
        s: Scale = r["scale"]
        lp = s.propagation
        read = "-" if s.provider_read_seconds is None else f"{s.provider_read_seconds:.2f} s"
        lines += [
            "",
            f"scale: {s.services:,} services x {INSTANCES_PER_SERVICE} instances "
            f"({s.instances:,}) from {name}",
            f"  load into {name:<22} {s.load_seconds:8.2f} s",
            f"  daemon start -> DNS listening   {s.listening_seconds:8.2f} s",
            f"  daemon start -> last service    {s.sync_seconds:8.2f} s   (initial sync)",
            f"  provider read (log)             {read:>10}",
            f"  daemon CPU until synced         {s.sync_cpu_seconds:8.2f} s",
            f"  RSS synced / peak               {s.rss_mib:8.1f} MiB / {s.peak_rss_mib:.1f} MiB"
            f"   (3 instances: {s.small_rss_mib:.1f} MiB)",
        ]
        if lp is not None:
            lines.append(
                f"  propagation, table loaded       p50 {lp.p50:.1f} ms, p99 {lp.p99:.1f} ms, "
                f"max {lp.max:.1f} ms ({lp.changes} changes)"
            )
    return lines


def write_json(path: Path, results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    out: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "targets_ms": TARGETS_MS,
        "machine": {"nproc": len(os.sched_getaffinity(0)), "kernel": platform.release()},
        "python": platform.python_version(),
        "load_average": load_average(),
        "backends": {},
    }
    for name, r in results.items():
        scale: Scale = r["scale"]
        scale_dict = {k: v for k, v in asdict(scale).items() if k != "propagation"}
        if scale.propagation is not None:
            scale_dict["propagation"] = scale.propagation.summary()
        out["backends"][name] = {
            "version": r["version"],
            "propagation": r["propagation"].summary(),
            "scale": scale_dict,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Registry change -> DNS answer latency, and the table at scale (loopback)."
    )
    parser.add_argument("--quick", action="store_true", help="50 changes, 1,000 x 10 instances")
    parser.add_argument("--changes", type=int, help="changes to time (default 200)")
    parser.add_argument("--services", type=int, help="services at scale (default 10,000)")
    parser.add_argument(
        "--scale-changes", type=int, default=20, help="changes timed at scale (default 20)"
    )
    parser.add_argument("--backend", action="append", choices=sorted(BACKENDS), help="default: all")
    parser.add_argument(
        "--tmp",
        default=default_tmp(),
        help="where etcd's data dir and the daemon's files go (default: /dev/shm when "
        "writable, so another process's disk I/O does not stall etcd's fsync; "
        "give a disk path to include a disk)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    args = parser.parse_args(argv)
    args.changes = args.changes or (50 if args.quick else 200)
    args.services = args.services or (1000 if args.quick else 10_000)
    args.backend = args.backend or sorted(BACKENDS)
    if not 1 <= args.services <= 60_000:
        parser.error("--services must be 1..60000")
    if not 1 <= args.changes <= 60_000:
        parser.error("--changes must be 1..60000")
    return args


def default_tmp() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"propagation bench: {', '.join(args.backend)}; {args.changes} changes; "
        f"{args.services:,} x {INSTANCES_PER_SERVICE} at scale; {HOST} only; "
        f"{len(os.sched_getaffinity(0))} CPUs, Python {platform.python_version()}",
        flush=True,
    )
    loads = [load_average()]
    workdir = Path(tempfile.mkdtemp(prefix="resolverd-propagation-", dir=args.tmp))
    print(f"  data dirs under {workdir}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        with sigterm_as_exit():
            for name in args.backend:
                results[name] = asyncio.run(run_backend(name, workdir, args))
                print(f"  {name}: {results[name]['version']}", flush=True)
    except EtcdMissingError as exc:
        print(f"propagation: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as exc:
        print(f"propagation: could not run: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    loads.append(load_average())
    print("\n".join(render(results, args, loads)))
    write_json(args.out, results, args)
    print(f"\nresults: {os.path.relpath(args.out, Path.cwd())}")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "propagation"
    sys.exit(main())
