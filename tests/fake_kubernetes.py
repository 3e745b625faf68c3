"""A small, faithful fake of the Kubernetes API server for Services and
discovery.k8s.io/v1 EndpointSlices: list (paged with limit/continue, a
consistent snapshot per list, expired continue tokens -> 410) and watch
(newline-delimited JSON events replayed from an event log after a
resourceVersion, timeoutSeconds, BOOKMARK events when allowWatchBookmarks is
set, 410 Gone for a compacted resourceVersion either as the HTTP status or as
an in-stream ERROR event, as real API servers do both).

It runs on aiohttp in its own thread and loop, so sync tests can drive it next
to a real daemon and real DNS clients, and be stopped and started again on the
same port to play an API server that goes away. Every request is recorded
(resource, namespace, query) so tests can check what the real client sent.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import web

T = TypeVar("T")
Obj = dict[str, Any]

# resource -> (apiVersion, kind, list kind)
RESOURCES: dict[str, tuple[str, str, str]] = {
    "services": ("v1", "Service", "ServiceList"),
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice", "EndpointSliceList"),
}
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_WATCH_SECONDS = 1800


# --------------------------------------------------------------------------- object builders


def port(name: str | None, number: int | None, protocol: str = "TCP") -> Obj:
    """An EndpointSlice port (name None: unnamed)."""
    out: Obj = {"port": number, "protocol": protocol}
    if name is not None:
        out["name"] = name
    return out


def endpoint(
    address: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = False,
    zone: str | None = None,
    node: str | None = None,
    pod: str | None = None,
) -> Obj:
    """An endpoint as the EndpointSlice controller writes it: serving follows
    ready unless given; None leaves a condition out (unknown)."""
    conditions: Obj = {}
    for key, value in (
        ("ready", ready),
        ("serving", ready if serving is None else serving),
        ("terminating", terminating),
    ):
        if value is not None:
            conditions[key] = value
    out: Obj = {"addresses": [address], "conditions": conditions}
    if zone is not None:
        out["zone"] = zone
    if node is not None:
        out["nodeName"] = node
    if pod is not None:
        out["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "", "uid": str(uuid.uuid4())}
    return out


def service(
    name: str,
    *,
    annotations: Mapping[str, str] | None = None,
    ports: list[Obj] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "labels": dict(labels or {"app": name}),
            "annotations": dict(annotations or {}),
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "ipFamilies": ["IPv4"],
            "ports": ports or [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
            "selector": {"app": name},
            "sessionAffinity": "None",
        },
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(
    name: str,
    service_name: str | None,
    *,
    endpoints: list[Obj],
    ports: list[Obj],
    address_type: str = "IPv4",
) -> Obj:
    labels = {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
    if service_name is not None:
        labels[SERVICE_NAME_LABEL] = service_name
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": labels},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    }


def status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Event:
    rv: int
    resource: str
    namespace: str
    type: str  # ADDED | MODIFIED | DELETED
    object: Obj


@dataclass(frozen=True)
class Logged:
    """One request as the server saw it."""

    resource: str
    namespace: str
    query: Mapping[str, str]

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass(eq=False)
class _Watcher:
    resource: str
    namespace: str
    bookmarks: bool
    selector: Callable[[Obj], bool]
    request: web.Request
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)


class KubeState:
    """The API server's storage and watchers. Lives on the fake's loop: call
    its methods there (FakeKubernetes.call), several in one call are atomic."""

    def __init__(self) -> None:
        self.rv = 1000
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (resource, namespace, name)
        self.log: list[Event] = []
        self.compacted = 0  # events at or below this resourceVersion are gone
        self.watchers: set[_Watcher] = set()
        self.snapshots: dict[str, tuple[int, list[Obj]]] = {}  # continue id -> (rv, items)
        self.requests: list[Logged] = []
        # Knobs.
        self.gone_mode: Literal["http", "event"] = "http"
        self.bookmark_interval: float | None = 1.0
        self.list_delay = 0.0
        self.ids = itertools.count(1)  # list snapshots, for continue tokens

    # -- writes -------------------------------------------------------------------------

    def put(self, resource: str, namespace: str, obj: Obj) -> Obj:
        """Create or replace an object (ADDED / MODIFIED). Anything goes, so tests
        can store malformed data the real API server's validation would refuse."""
        api_version, kind, _ = RESOURCES[resource]
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        name = metadata.get("name")
        key = (resource, namespace, name)
        old = self.objects.get(key)
        self.rv += 1
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        metadata["namespace"] = namespace
        metadata["resourceVersion"] = str(self.rv)
        if old is not None:
            metadata["uid"] = old["metadata"]["uid"]
            metadata["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            metadata["generation"] = old["metadata"].get("generation", 1) + 1
        else:
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", "2025-01-01T00:00:00Z")
            metadata.setdefault("generation", 1)
        self.objects[key] = obj
        self._emit(Event(self.rv, resource, namespace, "MODIFIED" if old else "ADDED", obj))
        return obj

    def delete(self, resource: str, namespace: str, name: str) -> None:
        obj = self.objects.pop((resource, namespace, name))
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(Event(self.rv, resource, namespace, "DELETED", obj))

    def touch(self, resource: str, namespace: str, name: str) -> None:
        """A write that changes nothing the provider reads (bumps resourceVersion)."""
        obj = copy.deepcopy(self.objects[(resource, namespace, name)])
        obj["metadata"].setdefault("labels", {})["touched"] = str(self.rv + 1)
        self.put(resource, namespace, obj)

    def _emit(self, event: Event) -> None:
        self.log.append(event)
        for w in self.watchers:
            if (w.resource, w.namespace) == (event.resource, event.namespace):
                w.queue.put_nowait(("event", event))

    # -- knobs --------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget the history: a watch from any older resourceVersion is 410 Gone,
        and so is a continue token of an older list."""
        self.compacted = self.rv
        self.log = [e for e in self.log if e.rv > self.compacted]

    def close_watches(self) -> None:
        """End every open watch cleanly (as a timeout would)."""
        for w in self.watchers:
            w.queue.put_nowait(("close", None))

    def send_error(self, code: int = 410) -> None:
        """An in-stream ERROR event on every open watch, which then ends."""
        reason = "Expired" if code == 410 else "InternalError"
        body = status(code, reason, f"too old resource version: 1 ({self.rv})")
        for w in self.watchers:
            w.queue.put_nowait(("error", body))

    def bookmark(self) -> int:
        """A BOOKMARK now, on every open watch that asked for them."""
        for w in self.watchers:
            w.queue.put_nowait(("bookmark", self.rv))
        return self.rv

    def expire_continue_tokens(self) -> None:
        self.snapshots.clear()

    # -- reads --------------------------------------------------------------------------

    def items(self, resource: str, namespace: str) -> list[Obj]:
        return [
            copy.deepcopy(obj)
            for (r, ns, _), obj in sorted(self.objects.items(), key=lambda kv: str(kv[0][2]))
            if (r, ns) == (resource, namespace)
        ]


# --------------------------------------------------------------------------- selectors


class BadRequest(Exception):
    pass


def _label_selector(text: str) -> Callable[[Obj], bool]:
    """Equality-based label selectors: a=b, a==b, a!=b, a, !a (comma = and)."""
    terms: list[tuple[str, str, str]] = []  # (op, key, value)
    for part in filter(None, (p.strip() for p in text.split(","))):
        if " in " in part or " notin " in part:
            raise BadRequest(f"set-based selector {part!r} is not supported by the fake")
        if "!=" in part:
            k, v = part.split("!=", 1)
            terms.append(("!=", k.strip(), v.strip()))
        elif "=" in part:
            k, v = part.replace("==", "=").split("=", 1)
            terms.append(("=", k.strip(), v.strip()))
        elif part.startswith("!"):
            terms.append(("!", part[1:].strip(), ""))
        else:
            terms.append(("exists", part, ""))

    def holds(op: str, key: str, value: str, labels: Mapping[str, str]) -> bool:
        if op == "=":
            return labels.get(key) == value
        if op == "!=":
            return labels.get(key) != value
        return (key in labels) == (op == "exists")

    def match(obj: Obj) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(holds(op, k, v, labels) for op, k, v in terms)

    return match


def _field_selector(text: str) -> Callable[[Obj], bool]:
    """metadata.name / metadata.namespace with =, == or != (comma = and)."""
    terms: list[tuple[str, str, bool]] = []  # (metadata key, value, negated)
    for part in filter(None, (p.strip() for p in text.split(","))):
        negate = "!=" in part
        k, v = (s.strip() for s in part.replace("!=", "=").replace("==", "=").split("=", 1))
        if k not in ("metadata.name", "metadata.namespace"):
            raise BadRequest(f'"{k}" is not a known field selector: only "metadata.name"')
        terms.append((k.split(".", 1)[1], v, negate))

    def match(obj: Obj) -> bool:
        metadata = obj.get("metadata") or {}
        return all((metadata.get(key) == value) != negate for key, value, negate in terms)

    return match


# --------------------------------------------------------------------------- HTTP


def _json(body: Obj, code: int = 200) -> web.Response:
    return web.Response(
        status=code, text=json.dumps(body), content_type="application/json", charset="utf-8"
    )


def _int_param(query: Mapping[str, str], key: str) -> int | None:
    raw = query.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{key}: Invalid value: {raw!r}") from None


def make_app(state: KubeState) -> web.Application:
    def handler(group: str, watch_path: bool) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await collection(request, group=group, watch_path=watch_path)

        return handle

    async def collection(
        request: web.Request, *, group: str, watch_path: bool
    ) -> web.StreamResponse:
        namespace = request.match_info["namespace"]
        resource = request.match_info["resource"]
        if resource not in RESOURCES or group != RESOURCES[resource][0].rpartition("/")[0]:
            return _not_found()
        query = dict(request.query)
        logged = Logged(resource, namespace, query)
        state.requests.append(logged)
        try:
            selector = _selector(query)
            if logged.watch or watch_path:
                return await _watch(request, resource, namespace, query, selector)
            return await _list(resource, namespace, query, selector)
        except BadRequest as exc:
            return _json(status(400, "BadRequest", str(exc)), 400)

    def _selector(query: Mapping[str, str]) -> Callable[[Obj], bool]:
        labels = _label_selector(query.get("labelSelector", ""))
        fields = _field_selector(query.get("fieldSelector", ""))
        return lambda obj: labels(obj) and fields(obj)

    async def _list(
        resource: str, namespace: str, query: Mapping[str, str], selector: Callable[[Obj], bool]
    ) -> web.Response:
        if state.list_delay:
            await asyncio.sleep(state.list_delay)
        limit = _int_param(query, "limit") or 0
        token = query.get("continue")
        if query.get("resourceVersionMatch") == "Exact":
            raise BadRequest("resourceVersionMatch=Exact is not supported by the fake")
        if token:
            try:
                decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                snapshot_id, start = str(decoded["id"]), int(decoded["start"])
            except (ValueError, KeyError, TypeError):
                raise BadRequest(f"continue key is not valid: {token!r}") from None
            snapshot = state.snapshots.get(snapshot_id)
            if snapshot is None or snapshot[0] < state.compacted:
                message = (
                    "The provided continue parameter is too old to display a consistent "
                    "list result. You can start a new list without the continue parameter."
                )
                return _json(status(410, "Expired", message), 410)
            rv, items = snapshot
        else:
            snapshot_id, start = str(next(state.ids)), 0
            items = [_strip(o) for o in state.items(resource, namespace) if selector(o)]
            rv = state.rv
        page = items[start : start + limit] if limit else items[start:]
        metadata: Obj = {"resourceVersion": str(rv)}
        end = start + len(page)
        if end < len(items):
            state.snapshots[snapshot_id] = (rv, items)
            body = json.dumps({"id": snapshot_id, "start": end}).encode()
            metadata["continue"] = base64.urlsafe_b64encode(body).decode()
            metadata["remainingItemCount"] = len(items) - end
        api_version, _, list_kind = RESOURCES[resource]
        return _json(
            {"kind": list_kind, "apiVersion": api_version, "metadata": metadata, "items": page}
        )

    async def _watch(
        request: web.Request,
        resource: str,
        namespace: str,
        query: Mapping[str, str],
        selector: Callable[[Obj], bool],
    ) -> web.StreamResponse:
        api_version, kind, _ = RESOURCES[resource]
        raw_rv = query.get("resourceVersion", "")
        start = _int_param(query, "resourceVersion")
        timeout = _int_param(query, "timeoutSeconds") or DEFAULT_WATCH_SECONDS
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        gone = start is not None and start != 0 and start < state.compacted
        expired = status(410, "Expired", f"too old resource version: {raw_rv} ({state.compacted})")
        if gone and state.gone_mode == "http":
            return _json(expired, 410)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if gone:  # the in-stream form of 410: 200, one ERROR event, the end
            await response.prepare(request)
            await _send(response, "ERROR", expired)
            await response.write_eof()
            return response
        # Backlog and registration in one step (no await between): no event is
        # lost or sent twice.
        if start in (None, 0):  # "any": the current state as ADDED events
            backlog = [
                ("event", Event(state.rv, resource, namespace, "ADDED", o))
                for o in state.items(resource, namespace)
            ]
        else:
            backlog = [
                ("event", e)
                for e in state.log
                if e.rv > start and (e.resource, e.namespace) == (resource, namespace)
            ]
        watcher = _Watcher(resource, namespace, bookmarks, selector, request)
        for item in backlog:
            watcher.queue.put_nowait(item)
        state.watchers.add(watcher)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = state.bookmark_interval if bookmarks else None
        next_bookmark = loop.time() + (interval or 0)
        try:
            await response.prepare(request)
            while (now := loop.time()) < deadline:
                wait = deadline - now if interval is None else min(deadline, next_bookmark) - now
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), max(0.0, wait))
                except TimeoutError:
                    if interval is not None and loop.time() >= next_bookmark:
                        # The queue is empty: everything up to state.rv has been sent.
                        await _deliver(response, watcher, ("bookmark", state.rv), api_version, kind)
                        next_bookmark = loop.time() + interval
                    continue
                if not await _deliver(response, watcher, item, api_version, kind):
                    break
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away, or stop() cut the connection
        finally:
            state.watchers.discard(watcher)
        return response

    async def _deliver(
        response: web.StreamResponse,
        watcher: _Watcher,
        item: tuple[str, Any],
        api_version: str,
        kind: str,
    ) -> bool:
        """Write one queued item; False when the watch ends with it."""
        what, payload = item
        if what == "close":
            return False
        if what == "error":
            await _send(response, "ERROR", payload)
            return False
        if what == "bookmark":
            if watcher.bookmarks:
                obj: Obj = {"kind": kind, "apiVersion": api_version}
                obj["metadata"] = {"resourceVersion": str(payload)}
                await _send(response, "BOOKMARK", obj)
            return True
        event: Event = payload
        if watcher.selector(event.object):
            await _send(response, event.type, event.object)
        return True

    async def _send(response: web.StreamResponse, kind: str, obj: Obj) -> None:
        await response.write((json.dumps({"type": kind, "object": obj}) + "\n").encode())

    async def not_found(request: web.Request) -> web.Response:
        return _not_found()

    app = web.Application()
    for prefix, group in (("/api/v1", ""), ("/apis/discovery.k8s.io/v1", "discovery.k8s.io")):
        for watch_path in (False, True):  # /watch/namespaces/...: the deprecated form
            path = f"{prefix}{'/watch' if watch_path else ''}/namespaces/{{namespace}}/{{resource}}"
            app.router.add_get(path, handler(group, watch_path))
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def _not_found() -> web.Response:
    return _json(status(404, "NotFound", "the server could not find the requested resource"), 404)


def _strip(obj: Obj) -> Obj:
    """List items carry no apiVersion/kind, as the real server sends them."""
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}


# --------------------------------------------------------------------------- the server


class FakeKubernetes:
    """The fake API server on 127.0.0.1 in its own thread and loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.state: KubeState = self.call(KubeState)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.start()

    # -- running code on the fake's loop ----------------------------------------------

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
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    def start(self) -> None:
        """Listen (again) on the same port."""
        self.run(self._start())

    async def _start(self) -> None:
        runner = web.AppRunner(make_app(self.state), shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    def stop(self) -> None:
        """The API server goes away: open watches are cut, connections refused."""
        self.run(self._stop())

    async def _stop(self) -> None:
        # Cut the open watches (the client sees a broken stream, not a clean end)
        # and let their handlers return.
        for w in list(self.state.watchers):
            if w.request.transport is not None:
                w.request.transport.abort()
            w.queue.put_nowait(("close", None))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _drain(self) -> None:
        await self._stop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(self._drain())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """A kubeconfig naming this server: plain HTTP, no credentials."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                        }
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path

    # -- thread-safe shortcuts ----------------------------------------------------------

    def put_service(self, namespace: str, obj: Obj) -> Obj:
        return self.call(lambda: self.state.put("services", namespace, obj))

    def put_slice(self, namespace: str, obj: Obj) -> Obj:
        return self.call(lambda: self.state.put("endpointslices", namespace, obj))

    def delete_service(self, namespace: str, name: str) -> None:
        self.call(lambda: self.state.delete("services", namespace, name))

    def delete_slice(self, namespace: str, name: str) -> None:
        self.call(lambda: self.state.delete("endpointslices", namespace, name))

    def requests(self) -> list[Logged]:
        return self.call(lambda: list(self.state.requests))

    def watchers(self) -> int:
        return self.call(lambda: len(self.state.watchers))

    def iter_requests(self, since: int = 0) -> Iterator[Logged]:
        yield from self.requests()[since:]
