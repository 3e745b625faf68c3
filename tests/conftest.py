"""Shared fixtures: a real daemon on 127.0.0.1:0 in its own uvloop thread, so
tests drive it with real clients (dnspython, dig, kdig) from plain code."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
import yaml

from resolverd.config import Config, parse_config
from resolverd.daemon import Daemon

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


class DaemonThread:
    """Runs `Daemon` on a uvloop loop in a thread; `call` runs code on it."""

    def __init__(self, config: Config) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.daemon: Daemon = self.call(lambda: Daemon(config))
        self.run(self.daemon.start())
        self.udp = self.daemon.dns.udp_addresses[0]
        self.tcp = self.daemon.dns.tcp_addresses[0]

    def call(self, fn: Callable[[], T]) -> T:
        future: Future[T] = Future()

        def invoke() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return future.result(timeout=10)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(self.daemon.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


def config_from(data: dict[str, Any], *, file: str = "test.yaml") -> Config:
    return parse_config(for_tests(data), file=file)


def for_tests(data: dict[str, Any]) -> dict[str, Any]:
    """A config made safe for a test: every listener on 127.0.0.1:0, no
    forwarding to the machine's resolvers, state files in a temp folder.
    For in-process daemons and for `resolverd run` subprocesses alike."""
    data = dict(data)
    dns = dict(data.get("dns") or {})
    # Tests never take a fixed port: the example's 5354 is `make run`'s.
    dns["listen"] = "127.0.0.1:0"
    dns.pop("listen_udp", None)
    dns.pop("listen_tcp", None)
    # Never the machine's resolv.conf nameservers: forwarding tests name their own.
    forward = dict(dns.get("forward") or {})
    forward.setdefault("upstreams", [])
    dns["forward"] = forward
    data["dns"] = dns
    api = dict(data.get("api") or {})
    api["listen"] = "127.0.0.1:0"  # examples name 50051: `make run`'s, never the tests'
    data["api"] = api
    metrics = dict(data.get("metrics") or {})
    if metrics.get("enabled", True) and "listen" not in metrics:
        metrics["listen"] = "127.0.0.1:0"  # 9153 is `make run`'s
    data["metrics"] = metrics
    registrations = dict(data.get("registrations") or {})
    if "state_file" not in registrations:
        registrations["state_file"] = os.path.join(tempfile.mkdtemp(), "registrations.json")
    data["registrations"] = registrations
    return data


def load_example(name: str) -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture
def start_daemon() -> Iterator[Callable[[dict[str, Any]], DaemonThread]]:
    started: list[DaemonThread] = []

    def start(data: dict[str, Any]) -> DaemonThread:
        d = DaemonThread(config_from(data))
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


@pytest.fixture
def static_daemon(start_daemon: Callable[[dict[str, Any]], DaemonThread]) -> DaemonThread:
    """The seed's static example, as `make run` serves it."""
    return start_daemon(load_example("static.yaml"))


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; `make test` installs it (see .ci/ensure-packages)")
    return path
