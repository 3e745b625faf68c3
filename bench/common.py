"""Helpers shared by the benchmark scripts in this directory.

The scripts run as ``python bench/X.py``, so this directory is on ``sys.path`` and
they import from here with ``from common import ...``.
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
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

HOST = "127.0.0.1"  # where the servers under test listen and the load generators send

# --------------------------------------------------------------------------- processes


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14, 15


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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

    def __init__(
        self, name: str, argv: list[str], *, stdin: bool = False, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
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

    def wait_for_line(
        self, pattern: re.Pattern[str], timeout: float, *, start: int = 0
    ) -> re.Match[str]:
        """The first line from index `start` on that matches."""
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = max(seen, len(self.lines))
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
        return proc_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=2)


LISTENING_RE = re.compile(r'^\{.*"event": "dns\.listening".*\}$')


def start_resolverd(command: list[str], config: Path, pin: list[str]) -> tuple[Server, int]:
    """Start `command run -c config` and return it with the UDP port from `dns.listening`."""
    server = Server("resolverd", [*pin, *command, "run", "-c", str(config)])
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


def which(name: str, what: str, prog: str, *, sbin: bool = False) -> str:
    """`name` on PATH (or in /usr/sbin, /sbin with `sbin`), or an executable path; else exit."""
    path = shutil.which(name)
    if sbin:
        path = path or shutil.which(name, path=os.pathsep.join(["/usr/sbin", "/sbin"]))
    path = path or (name if os.access(name, os.X_OK) else None)
    if path is None:
        raise SystemExit(f"{prog}: {what} not found ({name}); `make bench-deps` installs it")
    return path


def pinning(disabled: bool, shared: str, pinned: str) -> tuple[list[str], list[str], str]:
    """taskset prefixes for the server(s) and for the load generator, and a sentence saying so.

    `shared` ends the sentence when there is no pinning; `pinned` is the sentence when
    there is, with ``{server}`` and ``{load}`` for the two CPUs.
    """
    taskset = shutil.which("taskset")
    cpus = sorted(os.sched_getaffinity(0))
    if disabled:
        return [], [], "no CPU pinning (--no-pin)"
    if taskset is None or len(cpus) < 2:
        why = "taskset not found" if taskset is None else f"only {len(cpus)} CPU available"
        return [], [], f"no CPU pinning ({why}): {shared}"
    server_cpu, load_cpu = cpus[0], cpus[1]
    return (
        [taskset, "-c", str(server_cpu)],
        [taskset, "-c", str(load_cpu)],
        pinned.format(server=server_cpu, load=load_cpu),
    )


# --------------------------------------------------------------------------- dnsperf


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
