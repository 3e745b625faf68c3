"""The app's view: a process in its own network namespace whose only
nameserver is resolverd resolves services and other names through the C
library (getaddrinfo, getent), with the upstream, resolverd and the app all
inside that namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    reason = _can_netns()
    if reason is not None:
        pytest.skip(reason)
    name = f"resolverd-test-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    conf = Path("/etc/netns") / name
    try:
        for cmd in (
            "ip link set lo up",
            # A non-loopback address, as an app's pod has: glibc's getaddrinfo with
            # AI_ADDRCONFIG (getent ahosts) returns nothing when only loopback is up.
            # A documentation address on a veth pair that stays inside the
            # namespace: nothing is ever sent to it.
            "ip link add app0 type veth peer name app1",
            "ip addr add 192.0.2.1/32 dev app0",
            "ip link set app1 up",
            "ip link set app0 up",
        ):
            subprocess.run(["ip", "netns", "exec", name, *cmd.split()], check=True)
        conf.mkdir(parents=True)
        (conf / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
        yield name
    finally:
        shutil.rmtree(conf, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


def test_app_in_a_namespace_resolves_through_resolverd(netns: str, tmp_path: Path) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        upstream = subprocess.Popen(
            in_ns(
                netns,
                sys.executable,
                str(ROOT / "tests" / "upstream.py"),
                "127.0.0.2:53",
                "www.example.test. 300 IN A 192.0.2.80",
            ),
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        procs.append(upstream)
        assert upstream.stdout is not None and "listening" in upstream.stdout.readline()
        config = {
            "service_discovery": {
                "provider": "static",
                "static_services": [
                    {"id": "web-1", "name": "web", "address": "127.0.5.1", "port": 8080},
                    {"id": "web-2", "name": "web", "address": "127.0.5.2", "port": 8080},
                ],
            },
            "dns": {"listen": "127.0.0.1:53", "forward": {"upstreams": ["127.0.0.2:53"]}},
            "api": {"listen": "127.0.0.1:0"},
            "metrics": {"listen": "127.0.0.1:0"},
            "registrations": {"state_file": str(tmp_path / "reg.json")},
        }
        path = tmp_path / "resolverd.yaml"
        path.write_text(yaml.safe_dump(config))
        daemon = subprocess.Popen(
            in_ns(netns, sys.executable, "-m", "resolverd", "run", "-c", str(path)),
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        procs.append(daemon)
        assert daemon.stdout is not None
        for line in daemon.stdout:
            if "daemon.started" in line:
                break

        def run(*args: str) -> str:
            out = subprocess.run(in_ns(netns, *args), capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            return out.stdout

        hosts = run("getent", "ahostsv4", "web")
        assert {line.split()[0] for line in hosts.splitlines()} == {"127.0.5.1", "127.0.5.2"}
        code = "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('%s', 80)}))"
        assert run(sys.executable, "-c", code % "web") == "['127.0.5.1', '127.0.5.2']\n"
        assert run("getent", "hosts", "www.example.test").split()[0] == "192.0.2.80"
        assert run(sys.executable, "-c", code % "www.example.test") == "['192.0.2.80']\n"
        fqdn = run("getent", "hosts", "web.resolverd.internal").split()[0]
        assert fqdn in {"127.0.5.1", "127.0.5.2"}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
