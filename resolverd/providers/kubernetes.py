"""The Kubernetes provider: Services and discovery.k8s.io/v1 EndpointSlices of
the configured namespaces, listed and watched with the official client.

The client is synchronous (urllib3), so every request runs on a short-lived
daemon thread of its own and hands its result to the event loop with
`call_soon_threadsafe`; the loop alone owns the provider's state. Each
(namespace, resource) pair is one stream: a paged list, then watches resumed
from the last resourceVersion seen (bookmarks included). 410 Gone, as an HTTP
status or as an in-stream ERROR event, means the resume point is too old: the
stream lists again while the current snapshot keeps being served, and the
list result replaces that stream's objects whole. Any other failure marks the
provider stale, backs off and lists again, so it converges on the API
server's exact state. Instances are the join of a Service (name, annotations)
with the endpoints and ports of its slices; one is published only after every
stream has listed and while none is failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

import structlog
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import SERVICE_HOST_ENV_NAME, SERVICE_TOKEN_FILENAME

from resolverd.config import ProviderConfig, parse_instance
from resolverd.model import Health, Instance
from resolverd.providers.backoff import Backoff
from resolverd.table import ServiceTable

log = structlog.get_logger(__name__)

T = TypeVar("T")
Kind = Literal["services", "endpointslices"]
KINDS: Final[tuple[Kind, ...]] = ("services", "endpointslices")

PAGE_SIZE: Final = 500
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
CONNECT_TIMEOUT: Final = 5.0
LIST_READ_TIMEOUT: Final = 30.0
# A watch is silent between events; the server ends it after timeoutSeconds,
# so a read that outlasts that by this much means the connection is dead.
WATCH_READ_GRACE: Final = 15.0
# Two 410s closer together than this, or a watch that ends sooner with no
# event, wait a growing delay first: a server that keeps doing it is not
# hammered with requests.
PACING_WINDOW: Final = 1.0
_PROTOCOLS: Final = frozenset({"tcp", "udp", "sctp"})
_ADDRESS_TYPES: Final = frozenset({"IPv4", "IPv6", "FQDN"})


# --------------------------------------------------------------------------- parsed objects


@dataclass(frozen=True, slots=True)
class Service:
    """What the provider needs of a Service: its name and mapped annotations."""

    namespace: str
    name: str
    version: str | None = None
    weight: str | None = None
    region: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Port:
    name: str  # "" when unnamed
    port: int
    protocol: str  # tcp | udp | sctp


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    health: Health | None  # None: terminating, the instance is leaving
    zone: str | None = None
    node: str | None = None
    pod: str | None = None


@dataclass(frozen=True, slots=True)
class Slice:
    namespace: str
    name: str
    service: str | None  # the kubernetes.io/service-name label
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[Port, ...] = ()


Parsed = Service | Slice


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _mapping(value: object) -> Mapping[str, object] | None:
    return value if isinstance(value, Mapping) else None


def object_name(raw: object) -> str | None:
    """metadata.name of a raw object, None when it has none."""
    obj = _mapping(raw)
    metadata = _mapping(obj.get("metadata")) if obj is not None else None
    return _str_or_none(metadata.get("name")) if metadata is not None else None


def resource_version(raw: object) -> str | None:
    obj = _mapping(raw)
    metadata = _mapping(obj.get("metadata")) if obj is not None else None
    return _str_or_none(metadata.get("resourceVersion")) if metadata is not None else None


def parse_service(namespace: str, raw: object, annotations: Mapping[str, str]) -> Service | None:
    """A Service from its JSON; `annotations` maps model field -> annotation name."""
    name = object_name(raw)
    if name is None:
        log.warning("kubernetes.skipped", namespace=namespace, kind="Service", reason="no name")
        return None
    obj: Mapping[str, object] = _mapping(raw) or {}
    metadata = _mapping(obj.get("metadata")) or {}
    given = _mapping(metadata.get("annotations")) or {}

    def annotation(field_name: str) -> str | None:
        key = annotations.get(field_name)
        value = given.get(key) if key else None
        # An empty annotation is as good as none (the default applies).
        return (value.strip() or None) if isinstance(value, str) else None

    tags_text = annotation("tags")
    tags = tuple(t.strip() for t in tags_text.split(",") if t.strip()) if tags_text else ()
    return Service(
        namespace=namespace,
        name=name,
        version=annotation("version"),
        weight=annotation("weight"),
        region=annotation("region"),
        tags=tags,
    )


def _condition(conditions: Mapping[str, object], key: str) -> bool | None:
    value = conditions.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"conditions.{key} is {value!r}, not a boolean")


def endpoint_health(conditions: Mapping[str, object]) -> Health | None:
    """Endpoint conditions -> health; None for a terminating (leaving) endpoint.

    ready true -> healthy; ready unset -> healthy (the API: "unknown state
    should be interpreted as ready"); ready false -> unhealthy (serving or not:
    the instance stays visible, DNS does not hand it out).
    """
    if _condition(conditions, "terminating"):
        return None
    _condition(conditions, "serving")  # validated only: not ready is unhealthy either way
    ready = _condition(conditions, "ready")
    return Health.HEALTHY if ready is None or ready else Health.UNHEALTHY


def _endpoint(raw: object) -> Endpoint:
    ep = _mapping(raw)
    if ep is None:
        raise ValueError("an endpoint is not an object")
    addresses = ep.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        raise ValueError("an endpoint has no addresses")
    address = addresses[0]  # the API: consumers use the first, the rest are duplicates
    if not isinstance(address, str) or not address:
        raise ValueError(f"endpoint address {address!r} is not a string")
    conditions = _mapping(ep.get("conditions") or {})
    if conditions is None:
        raise ValueError(f"endpoint {address}: conditions is not an object")
    try:
        health = endpoint_health(conditions)
    except ValueError as exc:
        raise ValueError(f"endpoint {address}: {exc}") from None
    target = _mapping(ep.get("targetRef")) or {}
    pod = _str_or_none(target.get("name")) if target.get("kind") == "Pod" else None
    return Endpoint(
        address=address,
        health=health,
        zone=_str_or_none(ep.get("zone")),
        node=_str_or_none(ep.get("nodeName")),
        pod=pod,
    )


def _port(raw: object) -> Port:
    p = _mapping(raw)
    if p is None:
        raise ValueError("a port is not an object")
    number = p.get("port")
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
        raise ValueError(f"port {number!r} is not a port number (1-65535)")
    name = p.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"port {number}: name {name!r} is not a string")
    protocol = p.get("protocol") or "TCP"
    if not isinstance(protocol, str) or protocol.lower() not in _PROTOCOLS:
        raise ValueError(f"port {number}: protocol {protocol!r} is not TCP, UDP or SCTP")
    return Port(name=(name or "").lower(), port=number, protocol=protocol.lower())


def parse_slice(namespace: str, raw: object) -> Slice | None:
    """An EndpointSlice from its JSON. A malformed endpoint or port is skipped
    (logged, naming namespace/name); the rest of the slice still counts."""
    name = object_name(raw)
    if name is None:
        log.warning(
            "kubernetes.skipped", namespace=namespace, kind="EndpointSlice", reason="no name"
        )
        return None
    obj: Mapping[str, object] = _mapping(raw) or {}
    where = f"{namespace}/{name}"

    def skip(reason: str) -> None:
        log.warning("kubernetes.skipped", object=where, kind="EndpointSlice", reason=reason)

    metadata = _mapping(obj.get("metadata")) or {}
    labels = _mapping(metadata.get("labels")) or {}
    service = _str_or_none(labels.get(SERVICE_NAME_LABEL))
    address_type = obj.get("addressType")
    if address_type not in _ADDRESS_TYPES:
        skip(f"addressType {address_type!r} is not IPv4, IPv6 or FQDN")
        return Slice(namespace, name, service)
    raw_endpoints = obj.get("endpoints") or []
    raw_ports = obj.get("ports") or []
    if not isinstance(raw_endpoints, list) or not isinstance(raw_ports, list):
        skip("endpoints or ports is not a list")
        return Slice(namespace, name, service)
    endpoints: list[Endpoint] = []
    for item in raw_endpoints:
        try:
            endpoints.append(_endpoint(item))
        except ValueError as exc:
            skip(str(exc))
    ports: list[Port] = []
    for item in raw_ports:
        try:
            ports.append(_port(item))
        except ValueError as exc:
            skip(str(exc))
    return Slice(namespace, name, service, tuple(endpoints), tuple(ports))


# --------------------------------------------------------------------------- the join


def instance_id(service: Service, endpoint: Endpoint, port: Port) -> str:
    """Stable across slice reshuffles: namespace, service, address and port."""
    return f"{service.namespace}/{service.name}/{endpoint.address}/{port.name or port.port}"


def build_instances(
    services: Iterable[Service],
    slices: Iterable[Slice],
    *,
    provider: str,
    now: float = 0.0,
) -> tuple[list[Instance], set[str]]:
    """Services joined with their slices -> instances, plus the problems found
    (one line each, naming namespace/name) for what had to be skipped."""
    by_service: dict[tuple[str, str], list[Slice]] = {}
    for s in slices:
        if s.service is not None:
            by_service.setdefault((s.namespace, s.service), []).append(s)
    instances: list[Instance] = []
    problems: set[str] = set()
    seen: set[str] = set()
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        for sl in sorted(by_service.get((svc.namespace, svc.name), ()), key=lambda s: s.name):
            for ep in sl.endpoints:
                if ep.health is None:
                    continue
                for port in sl.ports:
                    ident = instance_id(svc, ep, port)
                    if ident in seen:  # the same endpoint in two slices while they move
                        continue
                    seen.add(ident)
                    metadata = {
                        "namespace": svc.namespace,
                        "slice": sl.name,
                        "weight": svc.weight,
                        "region": svc.region,
                        "zone": ep.zone,
                        "node": ep.node,
                        "pod": ep.pod,
                    }
                    data = {
                        "id": ident,
                        "name": svc.name,
                        "address": ep.address,
                        "port": port.port,
                        "version": svc.version or "1.0.0",
                        "tags": list(svc.tags),
                        "metadata": {k: v for k, v in metadata.items() if v is not None},
                        "health": ep.health.value,
                    }
                    try:
                        inst = parse_instance(
                            data, path=f"{svc.namespace}/{sl.name}", provider=provider
                        )
                    except ValueError as exc:
                        problems.add(f"service {svc.namespace}/{svc.name}: {exc}")
                        continue
                    instances.append(
                        replace(
                            inst, port_name=port.name, protocol=port.protocol, last_heartbeat=now
                        )
                    )
    return instances, problems


# --------------------------------------------------------------------------- threads


class _WatchHandle:
    """Lets the loop stop a watch whose thread is blocked reading the socket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stopped = False
        self._watch: Any = None
        self._response: object = None

    def attach(self, watch: Any) -> bool:
        with self._lock:
            self._watch = watch
            return not self.stopped

    def opened(self, response: object) -> None:
        with self._lock:
            self._response = response
            stopped = self.stopped
        if stopped:
            _shutdown(response)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            watch, response = self._watch, self._response
        if watch is not None:
            watch.stop()
        if response is not None:
            _shutdown(response)


def _shutdown(response: object) -> None:
    """Unblock a thread reading `response`: shut its socket down."""
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[[T], object], value: T) -> None:
    # RuntimeError: the loop is closed, nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, value)


async def _in_thread(fn: Callable[[], T], *, name: str) -> T:
    """Run a blocking call on a daemon thread of its own. Not asyncio.to_thread:
    the default executor is joined at interpreter exit (asyncio.run), and a
    request stuck on an unreachable API server would hold shutdown up."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: tuple[bool, Any]) -> None:
        if future.done():
            return
        ok, value = outcome
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def work() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except Exception as exc:
            outcome = (False, exc)
        _post(loop, settle, outcome)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future


# --------------------------------------------------------------------------- the provider


@dataclass(frozen=True, slots=True)
class _Event:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK | SKIPPED
    name: str | None
    obj: Parsed | None
    resource_version: str | None


_END: Final = object()


@dataclass(eq=False, slots=True)
class _Stream:
    namespace: str
    kind: Kind
    objects: dict[str, Parsed] = field(default_factory=dict)
    resource_version: str | None = None
    synced: bool = False  # listed at least once
    failing: bool = False  # the last request failed; a list must succeed first
    last_gone: float = -PACING_WINDOW

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.kind}"


class KubernetesProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        options = config.options
        namespaces = options["namespaces"]
        annotations = options["annotations"]
        assert isinstance(namespaces, tuple) and isinstance(annotations, Mapping)
        kubeconfig = options.get("kubeconfig")
        in_cluster = options.get("in_cluster")
        reconnect_max = options["reconnect_max"]
        watch_timeout = options["watch_timeout"]
        assert isinstance(reconnect_max, float) and isinstance(watch_timeout, float)
        assert kubeconfig is None or isinstance(kubeconfig, str)
        assert in_cluster is None or isinstance(in_cluster, bool)
        self._kubeconfig = os.path.expanduser(kubeconfig) if kubeconfig else None
        self._in_cluster = in_cluster
        self._annotations: Mapping[str, str] = MappingProxyType(
            {str(k): str(v) for k, v in annotations.items()}
        )
        self._reconnect_max = reconnect_max
        self._watch_seconds = max(1, round(watch_timeout))
        self._streams = [_Stream(str(ns), kind) for ns in namespaces for kind in KINDS]
        self._table: ServiceTable | None = None
        self._api: k8s_client.ApiClient | None = None
        self._handles: set[_WatchHandle] = set()
        self._publish_pending = False
        self._reported: set[str] = set()

    # -- public, read-only ------------------------------------------------------------

    def resource_versions(self) -> dict[str, str | None]:
        """Where each stream resumes ("<namespace>/<resource>" -> resourceVersion)."""
        return {s.label: s.resource_version for s in self._streams}

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, table: ServiceTable) -> None:
        self._table = table
        try:
            self._api = await self._connect(table)
            async with asyncio.TaskGroup() as group:
                for stream in self._streams:
                    group.create_task(self._run_stream(stream), name=f"k8s:{stream.label}")
        finally:
            for handle in list(self._handles):
                handle.stop()
            if self._api is not None:
                self._api.close()  # type: ignore[no-untyped-call]
                self._api = None

    async def _connect(self, table: ServiceTable) -> k8s_client.ApiClient:
        """An ApiClient of our own (never the module-global default), retried:
        a kubeconfig or token that appears later is picked up."""
        backoff = Backoff(maximum=self._reconnect_max)
        while True:
            try:
                configuration = await _in_thread(self._load_configuration, name="resolverd-k8s")
            except Exception as exc:
                reason = f"kubernetes client configuration: {_describe(exc)}"
                log.error("kubernetes.config_failed", provider=self.name, error=reason)
                table.mark_stale(self.name, reason)
                await backoff.wait()
                continue
            return k8s_client.ApiClient(configuration=configuration)

    def _load_configuration(self) -> k8s_client.Configuration:
        configuration = k8s_client.Configuration()
        in_cluster = self._in_cluster
        if in_cluster is None:
            in_cluster = os.path.isfile(SERVICE_TOKEN_FILENAME) and bool(
                os.environ.get(SERVICE_HOST_ENV_NAME)
            )
        if in_cluster:
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=self._kubeconfig,
                client_configuration=configuration,
                persist_config=False,  # never rewrite the user's kubeconfig
            )
        # client-go's keepalive: a half-open watch connection is noticed in minutes.
        configuration.keep_alive = True
        log.info(
            "kubernetes.configured",
            provider=self.name,
            host=configuration.host,
            in_cluster=in_cluster,
            namespaces=sorted({s.namespace for s in self._streams}),
        )
        return configuration

    # -- one stream: list, then watch, for ever ---------------------------------------

    async def _run_stream(self, stream: _Stream) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(maximum=self._reconnect_max)
        # Paces what should be rare but could repeat at once for ever with a
        # misbehaving server: 410 after 410, or watches that end as they start.
        pacing = Backoff(maximum=self._reconnect_max)
        while True:
            try:
                await self._list(stream)
                backoff.reset()
                while True:
                    started = loop.time()
                    if await self._watch(stream) or loop.time() - started >= PACING_WINDOW:
                        pacing.reset()
                    else:
                        await pacing.wait()
            except ApiException as exc:
                if exc.status != 410:
                    self._failed(stream, exc)
                    await backoff.wait()
                    continue
                # The resume point is too old: list again, serving what we have.
                log.info(
                    "kubernetes.expired",
                    provider=self.name,
                    stream=stream.label,
                    resource_version=stream.resource_version,
                )
                now = loop.time()
                if now - stream.last_gone < PACING_WINDOW:
                    await pacing.wait()
                stream.last_gone = loop.time()
            except Exception as exc:
                self._failed(stream, exc)
                await backoff.wait()

    def _failed(self, stream: _Stream, exc: Exception) -> None:
        reason = f"{stream.label}: {_describe(exc)}"
        # Warn when the stream starts failing; the retries that follow are debug.
        level = log.debug if stream.failing else log.warning
        level("kubernetes.failed", provider=self.name, error=reason)
        stream.failing = True
        if self._table is not None:
            self._table.mark_stale(self.name, reason)

    def _function(self, kind: Kind) -> Callable[..., Any]:
        assert self._api is not None
        if kind == "services":
            return k8s_client.CoreV1Api(self._api).list_namespaced_service
        return k8s_client.DiscoveryV1Api(self._api).list_namespaced_endpoint_slice

    def _parse(self, kind: Kind, namespace: str, raw: object) -> Parsed | None:
        if kind == "services":
            return parse_service(namespace, raw, self._annotations)
        return parse_slice(namespace, raw)

    async def _list(self, stream: _Stream) -> None:
        function = self._function(stream.kind)
        namespace, kind = stream.namespace, stream.kind

        def list_all() -> tuple[dict[str, Parsed], str]:
            objects: dict[str, Parsed] = {}
            version: str | None = None
            token: str | None = None
            while True:
                page: dict[str, Any] = {"limit": PAGE_SIZE}
                if token:
                    page["_continue"] = token
                response = function(
                    namespace=namespace,
                    _preload_content=False,
                    _request_timeout=(CONNECT_TIMEOUT, LIST_READ_TIMEOUT),
                    **page,
                )
                try:
                    body = json.loads(response.data)
                finally:
                    response.release_conn()
                if not isinstance(body, dict) or not isinstance(body.get("items") or [], list):
                    raise ValueError(f"{namespace}/{kind}: the list is not a list object")
                metadata = _mapping(body.get("metadata")) or {}
                # Every page of a paged list comes from the first page's snapshot.
                version = version or _str_or_none(metadata.get("resourceVersion"))
                for raw in body.get("items") or []:
                    name = object_name(raw)
                    parsed = self._parse(kind, namespace, raw)
                    if name is not None and parsed is not None:
                        objects[name] = parsed
                token = _str_or_none(metadata.get("continue"))
                if token is None:
                    break
            if version is None:
                raise ValueError(f"{namespace}/{kind}: the list has no resourceVersion")
            return objects, version

        objects, version = await _in_thread(list_all, name=f"resolverd-k8s-list-{stream.label}")
        recovered = stream.failing
        stream.objects = objects
        stream.resource_version = version
        stream.synced = True
        stream.failing = False
        log.info(
            "kubernetes.listed",
            provider=self.name,
            stream=stream.label,
            objects=len(objects),
            resource_version=version,
            recovered=recovered,
        )
        self._changed()

    async def _watch(self, stream: _Stream) -> int:
        """One watch request from the stream's resourceVersion, applied as its
        events arrive; returns when the server ends it (timeoutSeconds), with
        the number of events (bookmarks included) it brought."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        handle = _WatchHandle()
        function = self._function(stream.kind)
        namespace, kind = stream.namespace, stream.kind
        start = stream.resource_version

        def opener(**kwargs: Any) -> Any:
            response = function(**kwargs)
            handle.opened(response)
            return response

        def work() -> None:
            try:
                # Untyped in the client: Any keeps mypy's no-untyped-call quiet.
                watch: Any = k8s_watch.Watch(return_type="object")  # type: ignore[no-untyped-call]
                if not handle.attach(watch):
                    return
                # Raw dicts ("object"): one malformed object must not fail the
                # whole stream in the client's model deserializer.
                for event in watch.stream(
                    opener,
                    namespace=namespace,
                    resource_version=start,
                    allow_watch_bookmarks=True,
                    timeout_seconds=self._watch_seconds,
                    _request_timeout=(CONNECT_TIMEOUT, self._watch_seconds + WATCH_READ_GRACE),
                ):
                    if handle.stopped:
                        return
                    parsed = self._event(kind, namespace, event)
                    if parsed is not None:
                        _post(loop, queue.put_nowait, parsed)
                _post(loop, queue.put_nowait, _END)
            except Exception as exc:
                # An in-stream ERROR event arrives here as ApiException(code).
                _post(loop, queue.put_nowait, exc)

        self._handles.add(handle)
        threading.Thread(
            target=work, name=f"resolverd-k8s-watch-{stream.label}", daemon=True
        ).start()
        events = 0
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                changed = False
                try:
                    for item in items:
                        if item is _END:
                            return events
                        if isinstance(item, Exception):
                            raise item
                        assert isinstance(item, _Event)
                        events += 1
                        changed = self._apply(stream, item) or changed
                finally:
                    if changed:
                        self._changed()
        finally:
            handle.stop()
            self._handles.discard(handle)

    def _event(self, kind: Kind, namespace: str, event: object) -> _Event | None:
        """A watch event parsed on the watch thread; None to skip it."""
        data = _mapping(event)
        if data is None:  # the client yields None for a line that is not JSON
            log.warning("kubernetes.bad_event", stream=f"{namespace}/{kind}", event=repr(event))
            return None
        kind_of_event = data.get("type")
        raw = data.get("raw_object", data.get("object"))
        version = resource_version(raw)
        if kind_of_event == "BOOKMARK":
            return _Event("BOOKMARK", None, None, version)
        if kind_of_event not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("kubernetes.bad_event", stream=f"{namespace}/{kind}", type=kind_of_event)
            return None
        name = object_name(raw)
        if name is None:
            log.warning("kubernetes.skipped", stream=f"{namespace}/{kind}", reason="no name")
            return _Event("SKIPPED", None, None, version)  # still moves the resume point
        parsed = None if kind_of_event == "DELETED" else self._parse(kind, namespace, raw)
        return _Event(str(kind_of_event), name, parsed, version)

    def _apply(self, stream: _Stream, event: _Event) -> bool:
        """Apply one event to the stream's objects; True if they changed."""
        if event.resource_version is not None:
            stream.resource_version = event.resource_version
        if event.name is None:
            return False
        if event.type == "DELETED" or event.obj is None:
            # A modification into something malformed drops the object, as a list would.
            return stream.objects.pop(event.name, None) is not None
        old = stream.objects.get(event.name)
        stream.objects[event.name] = event.obj
        return old != event.obj

    # -- publishing -------------------------------------------------------------------

    def _changed(self) -> None:
        """Publish once per loop iteration, however many events arrived."""
        if not self._publish_pending:
            self._publish_pending = True
            asyncio.get_running_loop().call_soon(self._publish)

    def _publish(self) -> None:
        self._publish_pending = False
        if self._table is None:
            return
        if not all(s.synced for s in self._streams) or any(s.failing for s in self._streams):
            # The first snapshot waits for every list; while a stream is failing
            # the provider is stale and the table keeps the last full snapshot.
            return
        services = [o for s in self._streams for o in s.objects.values() if isinstance(o, Service)]
        slices = [o for s in self._streams for o in s.objects.values() if isinstance(o, Slice)]
        instances, problems = build_instances(services, slices, provider=self.name, now=time.time())
        for problem in sorted(problems - self._reported):
            log.warning("kubernetes.instance_skipped", provider=self.name, problem=problem)
        self._reported = problems
        self._table.replace(self.name, instances)


def _describe(exc: BaseException) -> str:
    """One line about a failure; ApiException's str() spans headers and body."""
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}".strip()
    reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError wraps the cause
    text = f"{type(exc).__name__}: {reason if isinstance(reason, Exception) else exc}"
    return text if len(text) <= 200 else text[:197] + "..."
