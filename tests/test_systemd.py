"""Running under systemd: sd_notify messages on a socket the test owns, reload
on SIGHUP without a lost query, shutdown on SIGTERM (and at once on a second)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import grpc
import pytest
import yaml

from resolverd.api.v1 import resolver_pb2 as pb
from resolverd.api.v1 import resolver_pb2_grpc as pb_grpc
from resolverd.config import parse_config
from resolverd.systemd import Notifier
from tests.conftest import DaemonThread, config_from

ROOT = Path(__file__).resolve().parent.parent


def config(
    tmp: Path,
    *,
    instances: int = 2,
    ttl: int = 5,
    extra: dict[str, Any] | None = None,
    listen: str = "127.0.0.1:0",
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "service_discovery": {
            "provider": "static",
            "static_services": [
                {"id": f"web-{i}", "name": "web", "address": f"127.0.6.{i}", "port": 80}
                for i in range(1, instances + 1)
            ],
            "load_balancer": {"algorithm": "round_robin"},
        },
        "dns": {"listen": listen, "ttl": ttl, "forward": {"upstreams": []}},
        "api": {"listen": "127.0.0.1:0"},
        "metrics": {"listen": "127.0.0.1:0"},
        "registrations": {"state_file": str(tmp / "reg.json")},
    }
    data.update(extra or {})
    return data


class Daemon:
    """`resolverd run` as systemd would run it, with a notify socket we read."""

    def __init__(self, tmp: Path, data: dict[str, Any], *, watchdog_usec: int = 0) -> None:
        self.path = tmp / "resolverd.yaml"
        self.path.write_text(yaml.safe_dump(data))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(tmp / "notify.sock"))
        self.sock.settimeout(10)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp / "notify.sock")}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resolverd", "run", "-c", str(self.path)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[dict[str, Any]] = []
        self.port = 0
        self.rpc = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            self.lines.append(event)
            if event["event"] == "dns.listening" and event["proto"] == "udp":
                self.port = event["port"]
            if event["event"] == "rpc.listening":
                self.rpc = event["address"]
            if event["event"] == "daemon.started":
                break
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def message(self, want: str, *, skip_watchdog: bool = True) -> dict[str, str]:
        """The next notify datagram containing `want` (others are skipped)."""
        while True:
            data = self.sock.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in data.splitlines())
            if want in fields:
                return fields

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.sock.close()


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:
        d.close()


def a_records(port: int, name: str = "web.resolverd.internal.") -> list[str]:
    reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=2)
    return sorted(rr.address for rrset in reply.answer for rr in rrset)


def test_notify_protocol(tmp_path: Path, spawned: list[Daemon]) -> None:
    d = Daemon(tmp_path, config(tmp_path), watchdog_usec=200_000)
    spawned.append(d)
    ready = d.message("READY")
    assert ready["READY"] == "1"
    assert ready["STATUS"] == "serving 1 services, 2 instances"
    for _ in range(3):  # pings every WATCHDOG_USEC / 2
        assert d.message("WATCHDOG")["WATCHDOG"] == "1"
    d.proc.send_signal(signal.SIGHUP)
    reloading = d.message("RELOADING")
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert d.message("READY")["READY"] == "1"
    d.proc.send_signal(signal.SIGTERM)
    assert d.message("STOPPING")["STOPPING"] == "1"
    assert d.proc.wait(10) == 0


def test_reload_under_load_loses_no_query(tmp_path: Path, spawned: list[Daemon]) -> None:
    d = Daemon(tmp_path, config(tmp_path))
    spawned.append(d)
    d.message("READY")
    failures: list[str] = []
    answered = [0]
    running = threading.Event()
    running.set()

    def load() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            while running.is_set():
                q = dns.message.make_query("web.resolverd.internal.", "A")
                s.sendto(q.to_wire(), ("127.0.0.1", d.port))
                try:
                    reply = dns.message.from_wire(s.recv(4096))
                except (TimeoutError, dns.exception.DNSException) as exc:
                    failures.append(repr(exc))
                    continue
                if reply.id != q.id or reply.rcode() != dns.rcode.NOERROR or not reply.answer:
                    failures.append(reply.to_text())
                answered[0] += 1

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        # A valid new config: one more instance and a new TTL, same listener.
        d.path.write_text(yaml.safe_dump(config(tmp_path, instances=3, ttl=9)))
        d.proc.send_signal(signal.SIGHUP)
        d.message("READY")
        assert a_records(d.port) == ["127.0.6.1", "127.0.6.2", "127.0.6.3"]
        # An invalid one is rejected with its located error; the running config stays.
        bad = config(tmp_path, instances=3, ttl=9)
        bad["service_discovery"]["static_services"][0]["port"] = 70000
        d.path.write_text(yaml.safe_dump(bad))
        d.proc.send_signal(signal.SIGHUP)
        status = d.message("READY")["STATUS"]
        assert "reload rejected" in status and "70000 is not a port (1-65535)" in status
        assert a_records(d.port) == ["127.0.6.1", "127.0.6.2", "127.0.6.3"]
        time.sleep(0.3)  # keep the load running past the second reload
    finally:
        running.clear()
        for w in workers:
            w.join(10)
    assert answered[0] > 100
    assert failures == []
    rejected = [e for e in d.lines if e["event"] == "daemon.reload_rejected"]
    assert rejected and "static_services[0].port" in rejected[0]["error"]


def test_second_signal_exits_at_once(tmp_path: Path, spawned: list[Daemon]) -> None:
    d = Daemon(tmp_path, config(tmp_path))
    spawned.append(d)
    d.message("READY")
    # An open Report stream keeps the graceful stop waiting for its grace period.
    ready = threading.Event()

    def hold_stream() -> None:
        async def run() -> None:
            async with grpc.aio.insecure_channel(d.rpc) as channel:
                queue: asyncio.Queue[pb.ReportRequest] = asyncio.Queue()

                async def requests() -> Any:
                    while True:
                        yield await queue.get()

                call = pb_grpc.ResolverStub(channel).Report(requests())
                await queue.put(
                    pb.ReportRequest(
                        connections=[pb.ConnectionEvent(instance_id="web-1", opened=1)]
                    )
                )
                ready.set()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call

        asyncio.run(run())

    threading.Thread(target=hold_stream, daemon=True).start()
    assert ready.wait(10)
    time.sleep(0.2)  # the server has the stream (the message above was sent)
    d.proc.send_signal(signal.SIGTERM)
    d.message("STOPPING")
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 1
    assert time.monotonic() - started < 2


def test_reload_keeps_listeners_and_unchanged_providers(tmp_path: Path) -> None:
    two = {
        "service_discovery": {
            "providers": [
                {
                    "type": "static",
                    "name": "a",
                    "static_services": [
                        {"id": "a-1", "name": "web", "address": "127.0.6.1", "port": 80}
                    ],
                },
                {
                    "type": "static",
                    "name": "b",
                    "static_services": [
                        {"id": "b-1", "name": "api", "address": "127.0.6.2", "port": 80}
                    ],
                },
            ]
        },
    }
    d = DaemonThread(config_from(two))
    try:
        udp = d.daemon.dns.udp_addresses[0]
        task_a = d.daemon._provider_tasks["a"]
        task_b = d.daemon._provider_tasks["b"]
        changed = json.loads(json.dumps(two))
        changed["service_discovery"]["providers"][1]["static_services"][0]["address"] = "127.0.6.9"
        changed["dns"] = {"listen": "127.0.0.1:0", "ttl": 42}
        new = config_from(changed)
        d.run(d.daemon.reload(new))
        assert d.daemon.dns.udp_addresses[0] == udp  # the same socket, kept
        assert d.daemon._provider_tasks["a"] is task_a  # untouched section: not restarted
        assert d.daemon._provider_tasks["b"] is not task_b and task_b.done()
        reply = dns.query.udp(
            dns.message.make_query("api.resolverd.internal.", "A"), udp[0], port=udp[1], timeout=2
        )
        assert [rr.address for rr in reply.answer[0]] == ["127.0.6.9"]
        assert reply.answer[0].ttl == 42
        # A new listen address is bound and the old one closed.
        moved = parse_config(
            {
                **changed,
                "dns": {"listen": "127.0.0.2:0", "forward": {"upstreams": []}},
                "api": {"listen": "127.0.0.1:0"},
                "registrations": {"state_file": new.registrations.state_file},
            },
            file="moved.yaml",
        )
        d.run(d.daemon.reload(moved))
        assert [a[0] for a in d.daemon.dns.udp_addresses] == ["127.0.0.2"]
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(
                dns.message.make_query("api.resolverd.internal.", "A"),
                udp[0],
                port=udp[1],
                timeout=0.5,
            )
    finally:
        d.close()


def test_notifier_is_a_no_op_without_socket() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    n.ready("x")  # nothing to send to, nothing raised
    assert Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval == 1.5
    assert Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_abstract_notify_socket() -> None:
    name = f"resolverd-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.send(READY=1, STATUS="ok")
        assert server.recv(100) == b"READY=1\nSTATUS=ok"
        n.close()
    finally:
        server.close()
