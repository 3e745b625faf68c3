"""A small, faithful fake of Consul's HTTP API for the two endpoints resolverd
reads, so tests (and benchmarks) drive the real py-consul client against it.

It keeps a catalog (nodes, services, checks) and a raft-like index that grows
with every write, and implements blocking queries as Consul does:
``?index=N&wait=D`` holds the request until the query's own index passes N or
the wait (plus up to wait/16 of jitter) is over, then answers with the data
and ``X-Consul-Index``. Knobs reproduce what real clusters do to clients:
spurious wake-ups (an answer without a change), a snapshot restore (the index
goes backwards and blocking queries are abandoned), an index of 0 for empty
results (an old Consul bug), 5xx errors, slow answers, ACL tokens,
datacenters, and being killed and brought back on the same port.

Every method that changes state may be called from any thread. Run it in a
thread of its own with `FakeConsulThread`, or standalone::

    python -m tests.fake_consul --port 8500 [--token T] [--datacenter dc1]

which then reads JSON commands, one per line, on stdin, e.g.
``{"op": "register", "service": "web", "id": "web-1", "port": 8080}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
MAX_WAIT = 600.0  # Consul caps wait at 10 minutes
DEFAULT_WAIT = 300.0


def parse_go_duration(text: str) -> float:
    """Seconds of a Go duration (``5s``, ``100ms``, ``1m30s``); ValueError otherwise."""
    if text in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return total


@dataclass
class _Wake:
    """One generation of waiters; `kind` says why it ended."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    kind: str = ""


@dataclass
class Request:
    """What the fake was asked: for assertions on token, datacenter, index."""

    path: str
    query: dict[str, str]
    token: str | None
    status: int = 0


class FakeConsul:
    def __init__(
        self,
        *,
        datacenter: str = "dc1",
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.datacenter = datacenter
        self.token = token
        self.host = host
        self.port = port
        self._lock = threading.RLock()
        self.index = 10  # raft index: grows with every write
        self._nodes: dict[str, dict[str, Any]] = {}
        self._services: dict[tuple[str, str], dict[str, Any]] = {}  # (node, id) -> service
        self._checks: dict[tuple[str, str], dict[str, Any]] = {}  # (node, check id) -> check
        self._service_index: dict[str, int] = {}  # lowercased name -> last write touching it
        self._catalog_index = self.index  # last write to the services table
        # Knobs.
        self.spurious_always = False  # every blocking query answers at once
        self.zero_index_when_empty = False  # old Consul bug: X-Consul-Index 0 for no data
        self.delays: dict[str, float] = {}  # endpoint key ("catalog", "health:web") -> seconds
        self._failures: int | None = 0  # next N requests fail; None: until heal()
        self._failure = (500, "rpc error making call: No cluster leader")
        # Observations.
        self.requests: Counter[str] = Counter()
        self.log: list[Request] = []
        # Serving.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: _Wake | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._inflight: dict[int, web.Request] = {}

    # -- serving --------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Serve on host:port (port 0 picks one, kept for later restarts)."""
        self._loop = asyncio.get_running_loop()
        self._wake = _Wake()
        app = web.Application()
        app.router.add_get("/v1/catalog/services", self._catalog_services)
        app.router.add_get("/v1/health/service/{name}", self._health_service)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Die as a killed agent does: connections drop, nothing answers.
        The data stays (a restarted agent keeps its raft state)."""
        for request in list(self._inflight.values()):
            if request.transport is not None:
                request.transport.abort()
        self._wake_all("shutdown")
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = self._site = None

    @property
    def running(self) -> bool:
        return self._site is not None

    # -- state changes (any thread) ------------------------------------------------------

    def add_node(self, node: str, address: str = "127.0.0.1") -> None:
        with self._lock:
            index = self._bump()
            if node in self._nodes:
                self._nodes[node]["Address"] = address
                self._nodes[node]["ModifyIndex"] = index
            else:
                self._nodes[node] = {
                    "ID": f"00000000-0000-0000-0000-{len(self._nodes) + 1:012d}",
                    "Node": node,
                    "Address": address,
                    "Datacenter": self.datacenter,
                    "TaggedAddresses": {"lan": address, "wan": address},
                    "Meta": {"consul-network-segment": ""},
                    "CreateIndex": index,
                    "ModifyIndex": index,
                }
                self._checks[(node, "serfHealth")] = self._check(
                    node, "serfHealth", "Serf Health Status", "passing", None, index
                )
            self._touch_node(node, index)
        self._notify("change")

    def register(
        self,
        service: str,
        *,
        port: int,
        id: str | None = None,
        node: str = "node1",
        address: str = "",
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        status: str | None = "passing",
        node_address: str = "127.0.0.1",
    ) -> None:
        """Register (or replace) a service instance on a node, as the agent's
        /v1/agent/service/register would; `status` adds one service check."""
        if node not in self._nodes:
            self.add_node(node, node_address)
        sid = id or service
        with self._lock:
            index = self._bump()
            old = self._services.get((node, sid))
            if old is not None and old["Service"].lower() != service.lower():
                self._service_index[old["Service"].lower()] = index
            self._services[(node, sid)] = {
                "ID": sid,
                "Service": service,
                "Tags": list(tags),
                "Address": address,
                "TaggedAddresses": {},
                "Meta": dict(meta or {}),
                "Port": port,
                "Weights": {"Passing": 1, "Warning": 1},
                "EnableTagOverride": False,
                "Proxy": {},
                "Connect": {},
                "Namespace": "",
                "CreateIndex": old["CreateIndex"] if old else index,
                "ModifyIndex": index,
            }
            check_id = f"service:{sid}"
            if status is None:
                self._checks.pop((node, check_id), None)
            else:
                self._checks[(node, check_id)] = self._check(
                    node, check_id, f"Service '{service}' check", status, sid, index
                )
            self._service_index[service.lower()] = index
            self._catalog_index = index
        self._notify("change")

    def update(self, id: str, *, node: str = "node1", **changes: Any) -> None:
        """Change fields of a registered instance: port, address, tags, meta."""
        keys = {"port": "Port", "address": "Address", "tags": "Tags", "meta": "Meta"}
        with self._lock:
            svc = self._services[(node, id)]
            index = self._bump()
            for key, value in changes.items():
                svc[keys[key]] = list(value) if key == "tags" else value
            svc["ModifyIndex"] = index
            self._service_index[svc["Service"].lower()] = index
            self._catalog_index = index
        self._notify("change")

    def deregister(self, id: str, *, node: str = "node1") -> None:
        with self._lock:
            svc = self._services.pop((node, id))
            for key in [
                k for k, c in self._checks.items() if k[0] == node and c["ServiceID"] == id
            ]:
                del self._checks[key]
            index = self._bump()
            # Consul keeps the index of a deleted service (its tombstone).
            self._service_index[svc["Service"].lower()] = index
            self._catalog_index = index
        self._notify("change")

    def set_check(
        self, id: str, status: str, *, node: str = "node1", check_id: str | None = None
    ) -> None:
        """Set (or add, with a new `check_id`) a check of a service instance."""
        with self._lock:
            svc = self._services[(node, id)]
            check_id = check_id or f"service:{id}"
            index = self._bump()
            self._checks[(node, check_id)] = self._check(
                node, check_id, f"Service '{svc['Service']}' check", status, id, index
            )
            self._service_index[svc["Service"].lower()] = index
        self._notify("change")

    def set_node_check(self, node: str, status: str) -> None:
        """The node's serfHealth: it counts for every instance on the node."""
        with self._lock:
            index = self._bump()
            self._checks[(node, "serfHealth")]["Status"] = status
            self._checks[(node, "serfHealth")]["ModifyIndex"] = index
            self._touch_node(node, index)
        self._notify("change")

    # -- knobs -------------------------------------------------------------------------------

    def spurious_wakeup(self) -> None:
        """Every waiting blocking query answers now, with unchanged data and index."""
        self._notify("spurious")

    def restore(self, index: int | None = None) -> None:
        """A snapshot restore (or a new leader from an older snapshot): the raft
        index goes back and all blocking queries are abandoned, so clients see
        an index lower than the one they asked with. The data stays."""
        with self._lock:
            self.index = index if index is not None else max(2, self.index // 4)
            self._catalog_index = min(self._catalog_index, self.index)
            for name, value in self._service_index.items():
                self._service_index[name] = min(value, self.index)
            for node in self._nodes.values():
                node["ModifyIndex"] = min(node["ModifyIndex"], self.index)
        self._notify("abandon")

    def fail(
        self,
        count: int | None = 1,
        *,
        status: int = 500,
        message: str = "rpc error making call: No cluster leader",
    ) -> None:
        """The next `count` requests (None: all until heal()) answer `status`;
        waiting blocking queries answer it too (as on a lost leader)."""
        with self._lock:
            self._failures = count
            self._failure = (status, message)
        self._notify("fail")

    def heal(self) -> None:
        with self._lock:
            self._failures = 0

    def request_count(self, key: str | None = None) -> int:
        with self._lock:
            return self.requests[key] if key else sum(self.requests.values())

    def requests_to(self, key: str) -> list[Request]:
        with self._lock:
            return [r for r in self.log if _key(r.path) == key]

    # -- handlers --------------------------------------------------------------------------

    async def _catalog_services(self, request: web.Request) -> web.Response:
        def read() -> tuple[int, Any]:
            services: dict[str, set[str]] = {}
            for svc in self._services.values():
                services.setdefault(svc["Service"], set()).update(svc["Tags"])
            data = {name: sorted(tags) for name, tags in sorted(services.items())}
            index = 0 if self.zero_index_when_empty and not data else self._catalog_index
            return index, data

        return await self._blocking(request, "catalog", read)

    async def _health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def read() -> tuple[int, Any]:
            entries = []
            for (node, sid), svc in sorted(self._services.items()):
                if svc["Service"].lower() != name.lower():
                    continue
                checks = [
                    dict(c)
                    for (n, _), c in sorted(self._checks.items())
                    if n == node and c["ServiceID"] in ("", sid)
                ]
                entries.append(
                    {"Node": dict(self._nodes[node]), "Service": dict(svc), "Checks": checks}
                )
            # An unknown service answers with the services table's index.
            index = self._service_index.get(name.lower(), self._catalog_index)
            if self.zero_index_when_empty and not entries:
                index = 0
            return index, entries

        return await self._blocking(request, f"health:{name}", read)

    async def _blocking(
        self, request: web.Request, key: str, read: Callable[[], tuple[int, Any]]
    ) -> web.Response:
        loop = asyncio.get_running_loop()
        token = request.headers.get("X-Consul-Token") or request.query.get("token")
        entry = Request(request.path, dict(request.query), token)
        with self._lock:
            self.requests[key] += 1
            self.log.append(entry)
        self._inflight[id(request)] = request
        try:
            response = await self._answer(request, key, read, token, loop)
        finally:
            self._inflight.pop(id(request), None)
        entry.status = response.status
        return response

    async def _answer(
        self,
        request: web.Request,
        key: str,
        read: Callable[[], tuple[int, Any]],
        token: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> web.Response:
        failure = self._take_failure()
        if failure is not None:
            return failure
        if self.token is not None and token is not None and token != self.token:
            return web.Response(status=403, text="ACL not found")
        dc = request.query.get("dc")
        if dc is not None and dc != self.datacenter:
            return web.Response(status=500, text="No path to datacenter")
        try:
            min_index = int(request.query.get("index", "0"))
            if min_index < 0:
                raise ValueError
        except ValueError:
            return web.Response(status=400, text="Invalid index")
        try:
            wait = min(parse_go_duration(request.query.get("wait", "")), MAX_WAIT)
        except ValueError:
            return web.Response(status=400, text="Invalid wait time")
        wait = wait or DEFAULT_WAIT
        delay = self.delays.get(key, 0.0)
        if delay:
            await asyncio.sleep(delay)
        # Consul spreads wake-ups with up to wait/16 of jitter.
        deadline = loop.time() + wait + random.uniform(0, wait / 16)
        while True:
            with self._lock:
                index, data = read()
            if not min_index or index > min_index or self.spurious_always:
                break
            wake = self._wake
            assert wake is not None
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(wake.event.wait(), remaining)
            except TimeoutError:
                continue
            if wake.kind == "shutdown":
                return web.Response(status=503, text="shutting down")
            if wake.kind == "fail":
                failure = self._take_failure()
                if failure is not None:
                    return failure
            if wake.kind in ("spurious", "abandon"):
                with self._lock:
                    index, data = read()
                break
        if self.token is not None and token is None:
            # The anonymous token: ACLs filter everything out (default deny).
            data = {} if isinstance(data, dict) else []
            headers = {"X-Consul-Results-Filtered-By-ACLs": "true"}
        else:
            headers = {}
        headers.update(
            {
                "X-Consul-Index": str(index),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
                "X-Consul-Effective-Consistency": "leader",
            }
        )
        return web.json_response(data, headers=headers)

    # -- internals ---------------------------------------------------------------------------

    def _take_failure(self) -> web.Response | None:
        with self._lock:
            if self._failures == 0:
                return None
            if self._failures is not None:
                self._failures -= 1
            status, message = self._failure
        return web.Response(status=status, text=message)

    def _bump(self) -> int:
        self.index += 1
        return self.index

    def _touch_node(self, node: str, index: int) -> None:
        for (n, _), svc in self._services.items():
            if n == node:
                self._service_index[svc["Service"].lower()] = index

    def _check(
        self, node: str, check_id: str, name: str, status: str, sid: str | None, index: int
    ) -> dict[str, Any]:
        svc = self._services.get((node, sid)) if sid else None
        return {
            "Node": node,
            "CheckID": check_id,
            "Name": name,
            "Status": status,
            "Notes": "",
            "Output": "",
            "ServiceID": sid or "",
            "ServiceName": svc["Service"] if svc else "",
            "ServiceTags": list(svc["Tags"]) if svc else [],
            "Type": "ttl" if sid else "",
            "CreateIndex": index,
            "ModifyIndex": index,
        }

    def _notify(self, kind: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake_all(kind)
        else:
            loop.call_soon_threadsafe(self._wake_all, kind)

    def _wake_all(self, kind: str) -> None:
        wake, self._wake = self._wake, _Wake()
        if wake is not None:
            wake.kind = kind
            wake.event.set()


def _key(path: str) -> str:
    if path == "/v1/catalog/services":
        return "catalog"
    return "health:" + path.rsplit("/", 1)[-1]


class FakeConsulThread:
    """A FakeConsul on its own event loop in a daemon thread; `stop` and
    `start` kill it and bring it back on the same port."""

    def __init__(self, fake: FakeConsul | None = None) -> None:
        self.fake = fake or FakeConsul()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.fake.port

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def start(self) -> None:
        self._run(self.fake.start())

    def stop(self) -> None:
        self._run(self.fake.stop())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            if self.fake.running:
                self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--token")
    parser.add_argument("--datacenter", default="dc1")
    args = parser.parse_args(argv)
    fake = FakeConsul(datacenter=args.datacenter, token=args.token, host=args.host, port=args.port)
    runner = FakeConsulThread(fake)
    runner.start()
    print(json.dumps({"listening": fake.address}), flush=True)
    ops: dict[str, Callable[..., Any]] = {
        "register": fake.register,
        "update": fake.update,
        "deregister": fake.deregister,
        "set_check": fake.set_check,
        "set_node_check": fake.set_node_check,
        "add_node": fake.add_node,
        "spurious_wakeup": fake.spurious_wakeup,
        "restore": fake.restore,
        "fail": fake.fail,
        "heal": fake.heal,
        "stop": runner.stop,
        "start": runner.start,
    }
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                command = json.loads(line)
                op = ops[command.pop("op")]
                args_list = command.pop("args", [])
                op(*args_list, **command)
                print(json.dumps({"ok": True, "index": fake.index}), flush=True)
            except Exception as exc:
                print(json.dumps({"ok": False, "error": repr(exc)}), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
