"""The command line as an operator uses it: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import EXAMPLES, for_tests, need

RESOLVERD = [sys.executable, "-m", "resolverd"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RESOLVERD, *args], capture_output=True, text=True, timeout=60)


def test_version() -> None:
    from resolverd import __version__

    out = run("version")
    assert out.returncode == 0 and out.stdout.strip() == f"resolverd {__version__}"


def test_check_config_examples() -> None:
    for name in ("static.yaml", "consul.yaml", "kubernetes.yaml"):
        out = run("check-config", str(EXAMPLES / name))
        assert out.returncode == 0, out.stderr
        assert "ok" in out.stdout


def test_bad_config_is_located_and_exits_before_binding(tmp_path: Path) -> None:
    data = yaml.safe_load((EXAMPLES / "static.yaml").read_text())
    data["service_discovery"]["static_services"][1]["port"] = 70000
    bad = tmp_path / "static.yaml"
    bad.write_text(yaml.safe_dump(data))
    expected = (
        "static.yaml: service_discovery.static_services[1].port: 70000 is not a port (1-65535)"
    )
    for args in (("check-config", str(bad)), ("run", "-c", str(bad))):
        out = run(*args)
        assert out.returncode == 2
        assert expected in out.stderr
        assert "dns.listening" not in out.stdout


def test_unreachable_consul_still_starts_serves_others_and_reports_stale(
    tmp_path: Path,
) -> None:
    import queue
    import socket
    import threading
    import time

    import grpc

    from resolverd.api.v1 import resolver_pb2 as pb
    from resolverd.api.v1 import resolver_pb2_grpc as pb_grpc

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    data = yaml.safe_load((EXAMPLES / "consul.yaml").read_text())
    sd = data["service_discovery"]
    del sd["provider"]
    consul = {**sd.pop("consul"), "host": "127.0.0.1", "port": closed_port, "reconnect_max": "1s"}
    static = yaml.safe_load((EXAMPLES / "static.yaml").read_text())["service_discovery"]
    sd["providers"] = [
        {"type": "consul", "consul": consul},
        {"type": "static", "static_services": static["static_services"]},
    ]
    data = for_tests(data)
    data["registrations"] = {"state_file": str(tmp_path / "registrations.json")}
    path = tmp_path / "consul.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen(
        [*RESOLVERD, "run", "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[dict[str, object]] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()

    seen: list[dict[str, object]] = []

    def wait_for(event: str, **fields: object) -> dict[str, object]:
        """The first line (already read or still to come) with this event and fields."""
        deadline = time.monotonic() + 20
        checked = 0
        while True:
            for got in seen[checked:]:
                if got["event"] == event and all(got.get(k) == v for k, v in fields.items()):
                    return got
            checked = len(seen)
            seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))

    try:
        port = wait_for("dns.listening", proto="udp")["port"]
        api = wait_for("rpc.listening")["address"]
        wait_for("daemon.started")
        stale = wait_for("provider.stale", provider="consul")
        assert "Cannot connect" in str(stale["error"])
        out = subprocess.run(
            [need("dig"), "@127.0.0.1", "-p", str(port), "SRV", "user-service", "+short"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        assert sorted(line.split()[2] for line in out.splitlines()) == ["8080", "8080"]
        with grpc.insecure_channel(str(api)) as channel:
            status = pb_grpc.ResolverStub(channel).GetHealthStatus(
                pb.GetHealthStatusRequest(), timeout=10
            )
        providers = {p.name: p for p in status.providers}
        assert providers["consul"].stale and not providers["consul"].synced
        assert "Cannot connect" in providers["consul"].error
        assert providers["static"].synced and not providers["static"].stale
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = yaml.safe_load((EXAMPLES / "static.yaml").read_text())
    data = for_tests(data)
    path = tmp_path / "static.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen(
        [*RESOLVERD, "run", "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        events = []
        port = None
        for line in proc.stdout:
            event = json.loads(line)  # JSON when stdout is not a TTY
            events.append(event["event"])
            if event["event"] == "dns.listening" and event["proto"] == "udp":
                port = event["port"]
            if event["event"] == "daemon.started":
                break
        assert port is not None
        out = subprocess.run(
            [need("dig"), "@127.0.0.1", "-p", str(port), "SRV", "user-service", "+short"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        assert sorted(line.split()[2] for line in out.splitlines()) == ["8080", "8080"]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "daemon.stopped" in rest
        # Lifecycle events only: no line per query.
        assert "table.changed" in events and len(events) + len(rest.splitlines()) < 16
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
