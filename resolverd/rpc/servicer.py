"""The `resolverd.api.v1.Resolver` servicer: proto <-> model, and the same
lookup and balancing as the DNS answers.

Validation names the offending field (INVALID_ARGUMENT ``client.latitude:
...``). Connections reported on a Report stream are owned by that stream and
released when it ends, however it ends, so a dead client cannot leave counts
behind.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn

import grpc
import structlog

from resolverd.api.v1 import resolver_pb2 as pb
from resolverd.balancing import Balancer, ClientContext, OutcomeStats, Plan, effective_weight
from resolverd.config import Config, Location
from resolverd.dns.answers import srv_target
from resolverd.model import Health, Instance, is_dns_label, parse_ip
from resolverd.providers.registrations import RegistrationError, RegistrationsProvider
from resolverd.table import Change, ServiceTable, View, health_status

log = structlog.get_logger(__name__)

HEALTH_TO_PB = {
    Health.HEALTHY: pb.HEALTH_HEALTHY,
    Health.UNHEALTHY: pb.HEALTH_UNHEALTHY,
    Health.CRITICAL: pb.HEALTH_CRITICAL,
}
HEALTH_FROM_PB = {v: k for k, v in HEALTH_TO_PB.items()}
MUTATING = ("Register", "Deregister", "Report")
MAX_CACHED = 10_000  # per derived-data cache; cleared whole when full


class WatchHub:
    """Wakes the Watch streams of the services a table change touched."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        self.closed = False

    def close(self) -> None:
        """End every Watch stream (shutdown), so they do not hold the grace period."""
        self.closed = True
        for events in self._events.values():
            for event in events:
                event.set()

    def add(self, service: str, event: asyncio.Event) -> Callable[[], None]:
        self._events.setdefault(service, set()).add(event)

        def remove() -> None:
            events = self._events.get(service)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[service]

        return remove

    def on_change(self, view: View, change: Change) -> None:
        for service in change.services:
            for event in self._events.get(service, ()):
                event.set()


class ResolverServicer:
    """Implements every method of resolver.proto's Resolver service."""

    def __init__(
        self,
        *,
        config: Config,
        table: ServiceTable,
        balancer: Balancer,
        outcomes: OutcomeStats,
        registrations: RegistrationsProvider,
        hub: WatchHub,
    ) -> None:
        self._config = config
        self._table = table
        self._balancer = balancer
        self._tracker = balancer.tracker
        self._outcomes = outcomes
        self._registrations = registrations
        self._hub = hub
        self._token = config.api.token
        self._domain = config.dns.domains[0] + "."
        self._endpoints: dict[tuple[str, str], tuple[Instance, pb.Endpoint]] = {}
        PlanKey = tuple[str, str, tuple[str, ...], Location | None]
        self._plans: dict[PlanKey, tuple[tuple[int, int], Plan, tuple[Instance, ...]]] = {}
        self._responses: dict[
            tuple[PlanKey, int, int], tuple[tuple[int, int, int], pb.ResolveResponse]
        ] = {}

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: policies, TTL, token, domain; caches dropped."""
        self._config = config
        self._token = config.api.token
        self._domain = config.dns.domains[0] + "."
        self._endpoints.clear()
        self._plans.clear()
        self._responses.clear()

    # -- helpers --------------------------------------------------------------------

    async def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """With a token configured, changes over TCP need `authorization: Bearer
        <token>`; the unix socket is guarded by its file permissions."""
        if self._token is None or context.peer().startswith("unix:"):
            return
        expected = f"Bearer {self._token}".encode()
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and hmac.compare_digest(str(value).encode(), expected):
                return
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

    def endpoint(self, inst: Instance) -> pb.Endpoint:
        """The endpoint message of an instance, with its live stats."""
        ep = pb.Endpoint()
        ep.CopyFrom(self._base_endpoint(inst))
        open_connections = self._tracker.count(inst.id)
        outcome = self._outcomes.get(inst.id)
        if open_connections or outcome is not None:
            ep.stats.open_connections = open_connections
            if outcome is not None:
                ep.stats.successes = outcome.successes
                ep.stats.failures = outcome.failures
                ep.stats.average_latency_ms = outcome.average_latency_ms
        return ep

    def _base_endpoint(self, inst: Instance) -> pb.Endpoint:
        """The instance's fields as a message, built once per instance object."""
        key = (inst.provider, inst.id)
        cached = self._endpoints.get(key)
        if cached is not None and cached[0] is inst:
            return cached[1]
        ep = pb.Endpoint(
            id=inst.id,
            address=inst.address,
            port=inst.port,
            version=inst.version,
            tags=inst.tags,
            health=HEALTH_TO_PB[inst.health],
            weight=min(round(effective_weight(inst)), 2**32 - 1),
            provider=inst.provider,
            target=srv_target(inst, self._domain),
        )
        if inst.metadata:
            ep.metadata.update(dict(inst.metadata))
        if len(self._endpoints) >= MAX_CACHED:
            self._endpoints.clear()
        self._endpoints[key] = (inst, ep)
        return ep

    # -- Resolve --------------------------------------------------------------------

    async def Resolve(
        self, request: pb.ResolveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ResolveResponse:
        error = _check_resolve(request)
        if error is not None:
            await _invalid(context, error)
        service = request.service.lower()
        tags = tuple(request.tags)
        client = request.client
        location = _location_of(client) or self._config.dns.client_location
        view = self._table.view
        policy = self._config.policy_for(service)
        # The plan depends only on the view, the connection counts (for
        # least_connections) and the request's filters: cache it on those.
        key = (service, request.version, tags, location)
        stamp = (view.revision, self._tracker.version)
        cached = self._plans.get(key)
        if cached is None or cached[0] != stamp:
            known = view.instances(service)
            if not known:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"service {service!r} is not known")
            matching = _filter(known, request.version, tags)
            if not matching:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"no instance of {service!r} matches version {request.version!r} "
                    f"and tags {list(tags)}",
                )
            plan = self._balancer.plan(service, matching, policy, location=location)
            if len(self._plans) >= MAX_CACHED:
                self._plans.clear()
            cached = self._plans[key] = (stamp, plan, tuple(matching))
        _stamp, plan, servable_from = cached
        ctx = ClientContext(
            address=client.address or _peer_ip(context.peer()),
            session_key=client.session_key or None,
            location=location,
        )
        index = self._balancer.pick(service, plan, policy, ctx)
        if index is None:
            counts = {h.value: sum(1 for i in servable_from if i.health is h) for h in Health}
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"no healthy instance of {service!r} ({len(servable_from)} known: "
                + ", ".join(f"{n} {h}" for h, n in counts.items() if n)
                + ")",
            )
            raise AssertionError("abort returned")  # pragma: no cover
        # The response for this pick, until anything it shows changes.
        rkey = (key, index, request.limit)
        rstamp = (view.revision, self._tracker.version, self._outcomes.version)
        response = self._responses.get(rkey)
        if response is None or response[0] != rstamp:
            order = plan.order(index)
            if request.limit:
                order = order[: request.limit]
            message = pb.ResolveResponse(
                endpoints=[self.endpoint(i) for i in order],
                revision=view.revision,
                ttl_seconds=self._config.dns.ttl,
            )
            if len(self._responses) >= MAX_CACHED:
                self._responses.clear()
            response = self._responses[rkey] = (rstamp, message)
        return response[1]

    # -- Report ---------------------------------------------------------------------

    async def Report(
        self,
        request_iterator: AsyncIterator[pb.ReportRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ReportResponse:
        await self._authorize(context)
        held: dict[str, int] = {}
        events = outcomes = 0
        tracker = self._tracker
        try:
            async for request in request_iterator:
                deltas: dict[str, int] = {}
                for i, event in enumerate(request.connections):
                    if not event.instance_id:
                        await _invalid(context, f"connections[{i}].instance_id: must not be empty")
                    deltas[event.instance_id] = (
                        deltas.get(event.instance_id, 0) + event.opened - event.closed
                    )
                    events += event.opened + event.closed
                for instance_id, delta in deltas.items():
                    if delta > 0:
                        tracker.opened(instance_id, delta)
                        held[instance_id] = held.get(instance_id, 0) + delta
                    elif delta < 0:
                        # A stream can only close what it opened.
                        n = min(-delta, held.get(instance_id, 0))
                        if n:
                            tracker.closed(instance_id, n)
                            held[instance_id] -= n
                for i, outcome in enumerate(request.outcomes):
                    if not outcome.instance_id:
                        await _invalid(context, f"outcomes[{i}].instance_id: must not be empty")
                    if outcome.latency_ms < 0:
                        await _invalid(context, f"outcomes[{i}].latency_ms: must not be negative")
                    self._outcomes.record(
                        outcome.instance_id,
                        success=outcome.success,
                        latency_ms=outcome.latency_ms,
                        count=outcome.count or 1,
                    )
                    outcomes += outcome.count or 1
        finally:
            released = 0
            for instance_id, n in held.items():
                if n > 0:
                    tracker.closed(instance_id, n)
                    released += n
        return pb.ReportResponse(connection_events=events, outcomes=outcomes, released=released)

    # -- Watch ----------------------------------------------------------------------

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchResponse]:
        error = _check_service(request.service) or _check_tags(request.tags)
        if error is not None:
            await _invalid(context, error)
        service = request.service.lower()
        tags = tuple(request.tags)
        wake = asyncio.Event()
        remove = self._hub.add(service, wake)
        sent: dict[str, Instance] | None = None
        try:
            while not self._hub.closed:
                view = self._table.view
                current = {i.id: i for i in _filter(view.instances(service), request.version, tags)}
                if sent is None:
                    registered, deregistered, updated = sorted(current), [], []
                else:
                    registered = sorted(k for k in current if k not in sent)
                    deregistered = sorted(k for k in sent if k not in current)
                    updated = sorted(k for k in current if k in sent and sent[k] != current[k])
                if sent is None or registered or deregistered or updated:
                    yield pb.WatchResponse(
                        service=service,
                        revision=view.revision,
                        endpoints=[self.endpoint(i) for i in current.values()],
                        registered=registered,
                        deregistered=deregistered,
                        updated=updated,
                    )
                    sent = current
                await wake.wait()
                wake.clear()
        finally:
            remove()

    # -- registrations --------------------------------------------------------------

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterResponse:
        await self._authorize(context)
        if not request.HasField("instance"):
            await _invalid(context, "instance: required")
        inst = request.instance
        data: dict[str, Any] = {
            "id": inst.id,
            "name": inst.name,
            "address": inst.address,
            "port": inst.port,
            "tags": list(inst.tags),
            "metadata": dict(inst.metadata),
        }
        if inst.version:
            data["version"] = inst.version
        if inst.health != pb.HEALTH_UNSPECIFIED:
            if inst.health not in HEALTH_FROM_PB:
                await _invalid(context, f"instance.health: unknown value {inst.health}")
            data["health"] = HEALTH_FROM_PB[inst.health].value
        try:
            revision, created = self._registrations.register(data, self._table)
        except RegistrationError as exc:
            await _registration_error(context, exc)
        except OSError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"cannot persist: {exc}")
        return pb.RegisterResponse(revision=revision, created=created)

    async def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeregisterResponse:
        await self._authorize(context)
        try:
            revision = self._registrations.deregister(request.id, self._table)
        except RegistrationError as exc:
            await _registration_error(context, exc)
        except OSError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"cannot persist: {exc}")
        return pb.DeregisterResponse(revision=revision)

    # -- status -----------------------------------------------------------------------

    async def ListServices(
        self, request: pb.ListServicesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListServicesResponse:
        view = self._table.view
        return pb.ListServicesResponse(
            services=[
                pb.ServiceInstances(name=name, endpoints=[self.endpoint(i) for i in insts])
                for name, insts in view.services.items()
            ],
            revision=view.revision,
        )

    async def GetHealthStatus(
        self, request: pb.GetHealthStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetHealthStatusResponse:
        view = self._table.view
        now = time.time()
        types = {p.name: p.type for p in self._config.providers}
        providers = [
            pb.ProviderStatus(
                name=state.name,
                type=types.get(state.name, state.name),
                synced=state.synced,
                stale=state.stale,
                age_seconds=state.age(now) or 0.0,
                error=state.error or "",
                instances=state.instances,
                restored=state.restored,
            )
            for state in self._table.states().values()
        ]
        return pb.GetHealthStatusResponse(
            services={
                name: pb.ServiceHealth(**counts) for name, counts in health_status(view).items()
            },
            revision=view.revision,
            providers=providers,
        )


# -- validation (pure, field-named) ---------------------------------------------------


async def _invalid(context: grpc.aio.ServicerContext[Any, Any], message: str) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
    raise AssertionError("abort returned")  # pragma: no cover


async def _registration_error(
    context: grpc.aio.ServicerContext[Any, Any], exc: RegistrationError
) -> NoReturn:
    code = {
        "invalid": grpc.StatusCode.INVALID_ARGUMENT,
        "conflict": grpc.StatusCode.FAILED_PRECONDITION,
        "not_found": grpc.StatusCode.NOT_FOUND,
    }[exc.kind]
    await context.abort(code, str(exc))
    raise AssertionError("abort returned")  # pragma: no cover


def _check_resolve(request: pb.ResolveRequest) -> str | None:
    """The first problem with a Resolve request, naming its field."""
    problem = _check_service(request.service) or _check_tags(request.tags)
    if problem is not None:
        return problem
    client = request.client
    if client.address and parse_ip(client.address) is None:
        return f"client.address: {client.address!r} is not an IP address"
    has_lat, has_lon = client.HasField("latitude"), client.HasField("longitude")
    if has_lat != has_lon:
        missing, given = ("longitude", "latitude") if has_lat else ("latitude", "longitude")
        return f"client.{missing}: required with client.{given}"
    if has_lat and not -90 <= client.latitude <= 90:
        return f"client.latitude: {client.latitude:g} is not a latitude (-90..90)"
    if has_lon and not -180 <= client.longitude <= 180:
        return f"client.longitude: {client.longitude:g} is not a longitude (-180..180)"
    return None


def _check_service(name: str) -> str | None:
    if not name:
        return "service: required"
    if not is_dns_label(name):
        return f"service: {name!r} is not a DNS label"
    return None


def _check_tags(tags: Sequence[str]) -> str | None:
    for i, tag in enumerate(tags):
        if not tag:
            return f"tags[{i}]: must not be empty"
    return None


def _location_of(client: pb.ClientInfo) -> Location | None:
    if not client.HasField("latitude"):
        return None
    return Location(latitude=client.latitude, longitude=client.longitude)


def _filter(instances: Sequence[Instance], version: str, tags: Sequence[str]) -> list[Instance]:
    """The seed's getService version filter (exact), plus every tag required."""
    return [
        i
        for i in instances
        if (not version or i.version == version) and all(t in i.tags for t in tags)
    ]


def _peer_ip(peer: str) -> str | None:
    """'ipv4:127.0.0.1:5555' / 'ipv6:[::1]:5555' -> the IP; unix peers have none."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return None
