"""A small asyncio client for resolverd's gRPC API.

Pick an endpoint, tell resolverd about the connections you hold (they drive
least-connections for gRPC and DNS alike), and follow a service's changes::

    from resolverd.client import Client

    async with Client("127.0.0.1:50051", token=os.environ.get("RESOLVERD_TOKEN")) as rd:
        ep = (await rd.resolve("user-service", tags=["production"])).first
        async with rd.connection(ep.id):          # opened now, closed on exit
            ...                                   # talk to ep.address:ep.port
        await rd.report_outcome(ep.id, success=True, latency_ms=12.5)

        async for event in rd.watch("user-service"):
            print(event.revision, [e.id for e in event.endpoints])

Connection events and call outcomes travel on one long-lived Report stream per
client, started on first use. Reporting never blocks or fails the caller: events
queued while a message is being written go out together in the next one, and if
the stream breaks the next event starts a new stream that re-reports the
connections still open. Whatever the stream opened is released by resolverd
when it ends, so a crashed application never leaves counts behind.

``target`` is ``host:port`` or ``unix:/path/to.sock``. RPC failures raise
:class:`ResolverError` carrying the gRPC status code and details.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from types import MappingProxyType

import grpc
import grpc.aio

from resolverd.api.v1 import resolver_pb2 as pb
from resolverd.api.v1.resolver_pb2_grpc import ResolverStub
from resolverd.model import Health

__all__ = ["Client", "Endpoint", "Resolution", "ResolverError", "WatchEvent"]

_HEALTH: Mapping[pb.Health, Health] = {
    pb.HEALTH_HEALTHY: Health.HEALTHY,
    pb.HEALTH_UNHEALTHY: Health.UNHEALTHY,
    pb.HEALTH_CRITICAL: Health.CRITICAL,
}
_PROTO_HEALTH: Mapping[Health, pb.Health] = {h: p for p, h in _HEALTH.items()}


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    name: str
    type: str
    synced: bool
    stale: bool
    age_seconds: float
    error: str
    instances: int
    restored: bool


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance as resolverd reports it (the proto ``Endpoint``)."""

    id: str
    address: str
    port: int
    version: str
    tags: tuple[str, ...]
    metadata: Mapping[str, str] = field(hash=False)
    health: Health
    weight: int
    provider: str
    target: str
    open_connections: int
    successes: int
    failures: int
    average_latency_ms: float

    @classmethod
    def from_proto(cls, msg: pb.Endpoint) -> Endpoint:
        return cls(
            id=msg.id,
            address=msg.address,
            port=msg.port,
            version=msg.version,
            tags=tuple(msg.tags),
            metadata=MappingProxyType(dict(msg.metadata)),
            health=_HEALTH.get(msg.health, Health.HEALTHY),
            weight=msg.weight,
            provider=msg.provider,
            target=msg.target,
            open_connections=msg.stats.open_connections,
            successes=msg.stats.successes,
            failures=msg.stats.failures,
            average_latency_ms=msg.stats.average_latency_ms,
        )


@dataclass(frozen=True, slots=True)
class Resolution:
    """Endpoints in the service's balancing order, best first."""

    endpoints: tuple[Endpoint, ...]
    revision: int
    ttl: int  # seconds the caller may reuse this answer

    @property
    def first(self) -> Endpoint:
        if not self.endpoints:
            raise LookupError("no endpoints")
        return self.endpoints[0]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A service's whole current set, and the ids that changed since the last event."""

    service: str
    revision: int
    endpoints: tuple[Endpoint, ...]
    registered: tuple[str, ...]
    deregistered: tuple[str, ...]
    updated: tuple[str, ...]


class ResolverError(Exception):
    """An RPC failed; ``code`` is its gRPC status (NOT_FOUND, UNAVAILABLE, ...)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@contextmanager
def _rpc_errors() -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as err:
        raise ResolverError(err.code(), err.details() or "") from err


def _endpoints(msgs: Sequence[pb.Endpoint]) -> tuple[Endpoint, ...]:
    return tuple(Endpoint.from_proto(m) for m in msgs)


class Client:
    """resolverd's gRPC API over one channel; use as ``async with Client(...)``."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.target = target
        self._timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._channel: grpc.aio.Channel
        if root_certificates or private_key or certificate_chain:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.aio.secure_channel(target, creds)
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = ResolverStub(self._channel)
        # The Report stream: connections open now, and what is queued to send.
        self._open: Counter[str] = Counter()
        self._opened: Counter[str] = Counter()
        self._closed: Counter[str] = Counter()
        self._outcomes: list[pb.CallOutcome] = []
        self._report: grpc.aio.StreamUnaryCall[pb.ReportRequest, pb.ReportResponse] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._report_error: ResolverError | None = None
        self._is_closed = False

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- unary calls

    async def resolve(
        self,
        service: str,
        *,
        version: str = "",
        tags: Sequence[str] = (),
        session_key: str = "",
        address: str = "",
        latitude: float | None = None,
        longitude: float | None = None,
        limit: int = 0,
    ) -> Resolution:
        """The service's endpoints in balancing order (NOT_FOUND when it has none)."""
        client = pb.ClientInfo(
            address=address, session_key=session_key, latitude=latitude, longitude=longitude
        )
        request = pb.ResolveRequest(
            service=service, version=version, tags=tags, client=client, limit=limit
        )
        with _rpc_errors():
            response: pb.ResolveResponse = await self._stub.Resolve(
                request, metadata=self._metadata, timeout=self._timeout
            )
        return Resolution(_endpoints(response.endpoints), response.revision, response.ttl_seconds)

    async def register(
        self,
        *,
        id: str,
        name: str,
        address: str,
        port: int,
        version: str = "",
        tags: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        health: Health = Health.HEALTHY,
    ) -> int:
        """Register (or replace) an instance at run time; returns the table revision."""
        instance = pb.Instance(
            id=id,
            name=name,
            version=version,
            address=address,
            port=port,
            tags=tags,
            metadata=metadata or {},
            health=_PROTO_HEALTH[health],
        )
        with _rpc_errors():
            response: pb.RegisterResponse = await self._stub.Register(
                pb.RegisterRequest(instance=instance),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        return response.revision

    async def deregister(self, instance_id: str) -> int:
        """Remove a runtime registration; returns the table revision."""
        with _rpc_errors():
            response: pb.DeregisterResponse = await self._stub.Deregister(
                pb.DeregisterRequest(id=instance_id),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        return response.revision

    async def list_services(self) -> dict[str, tuple[Endpoint, ...]]:
        """Every service and all its instances (any health)."""
        with _rpc_errors():
            response: pb.ListServicesResponse = await self._stub.ListServices(
                pb.ListServicesRequest(), metadata=self._metadata, timeout=self._timeout
            )
        return {s.name: _endpoints(s.endpoints) for s in response.services}

    async def provider_status(self) -> tuple[ProviderStatus, ...]:
        """Each provider's freshness: synced, stale (serving its last snapshot), age."""
        with _rpc_errors():
            response: pb.GetHealthStatusResponse = await self._stub.GetHealthStatus(
                pb.GetHealthStatusRequest(), metadata=self._metadata, timeout=self._timeout
            )
        return tuple(
            ProviderStatus(
                name=p.name,
                type=p.type,
                synced=p.synced,
                stale=p.stale,
                age_seconds=p.age_seconds,
                error=p.error,
                instances=p.instances,
                restored=p.restored,
            )
            for p in response.providers
        )

    async def health_status(self) -> dict[str, dict[str, int]]:
        """Per service: ``{"total", "healthy", "unhealthy", "critical"}`` instance counts."""
        with _rpc_errors():
            response: pb.GetHealthStatusResponse = await self._stub.GetHealthStatus(
                pb.GetHealthStatusRequest(), metadata=self._metadata, timeout=self._timeout
            )
        return {
            name: {
                "total": h.total,
                "healthy": h.healthy,
                "unhealthy": h.unhealthy,
                "critical": h.critical,
            }
            for name, h in sorted(response.services.items())
        }

    # ----------------------------------------------------------------- watch

    async def watch(
        self, service: str, *, version: str = "", tags: Sequence[str] = ()
    ) -> AsyncGenerator[WatchEvent, None]:
        """The service's current set, then one event per change, until the caller stops."""
        call = self._stub.Watch(
            pb.WatchRequest(service=service, version=version, tags=tags),
            metadata=self._metadata,
        )
        try:
            with _rpc_errors():
                async for msg in call:
                    yield _watch_event(msg)
        finally:
            call.cancel()

    # ----------------------------------------------------------------- reports

    @asynccontextmanager
    async def connection(self, instance_id: str) -> AsyncIterator[None]:
        """Report a connection to ``instance_id`` opened now and closed on exit."""
        self._check_report(instance_id)
        self._open[instance_id] += 1
        self._opened[instance_id] += 1
        self._kick()
        try:
            yield
        finally:
            self._open[instance_id] -= 1
            if self._open[instance_id] <= 0:
                del self._open[instance_id]
            if not self._is_closed:  # after close() the stream's end released it
                self._closed[instance_id] += 1
                self._kick()

    async def report_outcome(self, instance_id: str, *, success: bool, latency_ms: float) -> None:
        """Report how a call to ``instance_id`` went."""
        self._check_report(instance_id)
        if latency_ms < 0:
            raise ValueError(f"latency_ms must not be negative, got {latency_ms}")
        self._outcomes.append(
            pb.CallOutcome(instance_id=instance_id, success=success, latency_ms=latency_ms)
        )
        self._kick()

    async def flush(self) -> None:
        """Wait until everything reported so far is written to the stream.

        Raises :class:`ResolverError` when the stream broke before it was.
        """
        while (sender := self._sender) is not None and not sender.done():
            await asyncio.shield(sender)
        if self._report_error is not None:
            raise self._report_error

    def _check_report(self, instance_id: str) -> None:
        # The server ends the whole stream (releasing its connections) on a bad entry.
        if not instance_id:
            raise ValueError("instance_id must not be empty")
        if self._is_closed:
            raise RuntimeError("resolverd client is closed")

    def _kick(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="resolverd-report")

    async def _send(self) -> None:
        """Write queued events until none are left, batching what arrives meanwhile."""
        while self._opened or self._closed or self._outcomes:
            if self._report is None or self._report.done():
                # A new stream starts from the connections open now: the server
                # released whatever an earlier stream had opened.
                self._report = self._stub.Report(metadata=self._metadata)
                self._opened, self._closed = Counter(self._open), Counter()
            ids = sorted(self._opened.keys() | self._closed.keys())
            request = pb.ReportRequest(
                connections=[
                    pb.ConnectionEvent(
                        instance_id=i, opened=self._opened[i], closed=self._closed[i]
                    )
                    for i in ids
                ],
                outcomes=self._outcomes,
            )
            self._opened, self._closed, self._outcomes = Counter(), Counter(), []
            try:
                await self._report.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The stream ended under us; the next event starts a new one.
                call, self._report = self._report, None
                self._report_error = ResolverError(await call.code(), await call.details() or "")
                return
            self._report_error = None

    async def close(self) -> None:
        """End the Report stream cleanly (releasing what it holds open) and the channel."""
        if self._is_closed:
            return
        self._is_closed = True
        try:
            with suppress(ResolverError):
                await self.flush()
            if self._report is not None and not self._report.done():
                with suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
                    async with asyncio.timeout(self._timeout):
                        await self._report.done_writing()
                        await self._report
        finally:
            await self._channel.close()


def _watch_event(msg: pb.WatchResponse) -> WatchEvent:
    return WatchEvent(
        service=msg.service,
        revision=msg.revision,
        endpoints=_endpoints(msg.endpoints),
        registered=tuple(msg.registered),
        deregistered=tuple(msg.deregistered),
        updated=tuple(msg.updated),
    )
