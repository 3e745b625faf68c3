"""The command line as an operator uses it: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import EXAMPLES, need

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


def test_unavailable_provider_fails_start(tmp_path: Path) -> None:
    data = yaml.safe_load((EXAMPLES / "consul.yaml").read_text())
    data["dns"]["listen"] = "127.0.0.1:0"
    path = tmp_path / "consul.yaml"
    path.write_text(yaml.safe_dump(data))
    out = run("run", "-c", str(path))
    assert out.returncode == 2
    assert "consul" in out.stderr and "not available" in out.stderr
    assert "dns.listening" not in out.stdout


def test_run_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = yaml.safe_load((EXAMPLES / "static.yaml").read_text())
    data["dns"]["listen"] = "127.0.0.1:0"
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
        assert "table.changed" in events and len(events) + len(rest.splitlines()) < 12
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
