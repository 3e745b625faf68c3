"""The Consul provider: the catalog's services and their health, followed with
blocking queries.

One watcher long-polls ``/v1/catalog/services`` and starts or stops one watcher
per service, each long-polling ``/v1/health/service/<name>``. Every watcher
follows the rules Consul documents for blocking clients: it compares what
comes back (a wake-up is no proof of a change), resets its index to 0 (a full
read) when the index goes backwards, never blocks with an index below 1, and
goes through a token bucket so a server that answers at once cannot make it
spin. Instances keep the health their checks give them (the seed dropped the
non-passing ones; here status shows them and balancing serves only healthy
ones). The table gets a complete snapshot only once the catalog and every
service in it have been read; while any watcher cannot reach Consul the
provider is stale and the last snapshot keeps being served.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import consul  # type: ignore[import-untyped]
import consul.aio  # type: ignore[import-untyped]
import structlog

from resolverd.config import ProviderConfig, parse_instance
from resolverd.model import Health, Instance
from resolverd.providers.backoff import Backoff
from resolverd.table import ServiceTable

log = structlog.get_logger(__name__)

# Token bucket per watcher: two requests back to back, then one per interval.
# Consul's docs ask for a bucket with a burst of 2 so that quick successive
# changes are delivered at once but a churning (or misbehaving) server is
# polled at a bounded rate; consul-template limits its loop to ~1 per 100 ms.
RATE_INTERVAL = 0.1
RATE_BURST = 2
# How long past `wait` (plus Consul's jitter of up to wait/16) a request may
# take before it counts as lost: a half-open connection must not hang a watcher.
REQUEST_SLACK = 10.0
# One HTTP connection per watcher is held for the whole blocking query, so the
# client pool must not be the bottleneck (aiohttp's default is 100).
MAX_CONNECTIONS = 4096
# Consul agents refuse more than limits.http_max_conns_per_client (default 200)
# concurrent connections from one address.
AGENT_CONNECTION_LIMIT = 200
DEFAULT_VERSION = "1.0.0"


class BadResponse(Exception):
    """Consul answered something that is not the documented shape."""


# ----------------------------------------------------------------------------- pure policy


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking request, from Consul's client rules.

    ``previous`` is the index the request was made with (0: a full read).
    An index of 0 or less is a Consul bug that would turn blocking into a busy
    loop: 1 is always safe to wait on (and is not "going backwards"). An index
    lower than the previous one (a snapshot restore, a leader change) resets
    the loop: 0 makes the next request a full, non-blocking read.
    """
    if returned <= 0:
        return 1
    if returned < previous:
        return 0
    return returned


def go_duration(seconds: float) -> str:
    """``seconds`` as a Go duration for ``?wait=`` (Consul rejects a bare number)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{max(1, math.ceil(seconds * 1000))}ms"


def health_from_checks(checks: object) -> Health:
    """Consul's checks of an instance (its node's and its own) as one state:
    any critical (or anything not passing/warning) -> critical, else any
    warning -> unhealthy, else healthy. No checks at all is healthy, as in
    Consul's own DNS interface."""
    statuses = {
        check.get("Status")
        for check in (checks if isinstance(checks, list) else ())
        if isinstance(check, dict)
    }
    if statuses - {"passing", "warning"}:
        return Health.CRITICAL
    if "warning" in statuses:
        return Health.UNHEALTHY
    return Health.HEALTHY


def version_from_tags(tags: list[Any]) -> str:
    """The seed's rule: the first ``version=x`` tag, else 1.0.0."""
    for tag in tags:
        if isinstance(tag, str) and tag.startswith("version="):
            return tag.partition("=")[2] or DEFAULT_VERSION
    return DEFAULT_VERSION


def instance_from_entry(entry: object, *, provider: str, now: float) -> tuple[str, Instance]:
    """One ``/v1/health/service/<name>`` entry as (node name, instance).

    Raises ValueError naming the node, service id and field when the entry
    cannot be served (a port of 0, a service name that is not a DNS label...).
    """
    if not isinstance(entry, dict):
        raise ValueError("entry is not an object")
    node, service = entry.get("Node"), entry.get("Service")
    if not isinstance(node, dict) or not isinstance(service, dict):
        raise ValueError("entry without Node or Service")
    node_name = str(node.get("Node", ""))
    raw_tags = service.get("Tags") or []
    if not isinstance(raw_tags, list):
        raise ValueError(f"{node_name}/{service.get('ID')}: Tags is not a list")
    tags = [tag for tag in raw_tags if tag != ""]
    name = service.get("Service")
    data = {
        "id": service.get("ID"),
        # DNS names are case-insensitive and the answer layer looks names up
        # lowercased; Consul keeps the case it was given.
        "name": name.lower() if isinstance(name, str) else name,
        "version": version_from_tags(tags),
        # Consul's documented fallback: a service without its own address is
        # reached at its node's.
        "address": service.get("Address") or node.get("Address"),
        "port": service.get("Port"),
        "tags": tags,
        "metadata": service.get("Meta") or {},
        "health": health_from_checks(entry.get("Checks")).value,
    }
    instance = parse_instance(data, path=f"{node_name}/{service.get('ID')}", provider=provider)
    return node_name, replace(instance, last_heartbeat=now)


def unique_ids(pairs: list[tuple[str, Instance]]) -> list[Instance]:
    """Service IDs are unique per node only (agents default the ID to the
    service name); an ID found on several nodes becomes ``<id>@<node>`` so
    instance ids stay unique in the table, the balancer and DNS."""
    counts = Counter(inst.id for _, inst in pairs)
    return [
        replace(inst, id=f"{inst.id}@{node}") if counts[inst.id] > 1 else inst
        for node, inst in pairs
    ]


class RateLimit:
    """A token bucket: `burst` requests at once, then one per `interval`."""

    def __init__(
        self, *, interval: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def delay(self) -> float:
        """Take a token; the seconds to wait before using it (0: go now)."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) / self._interval)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens * self._interval

    async def acquire(self) -> None:
        delay = self.delay()
        if delay > 0:
            await asyncio.sleep(delay)


# ----------------------------------------------------------------------------- the client


class _Api:
    """The two endpoints used, typed: py-consul itself has no annotations."""

    def __init__(self, options: Mapping[str, object]) -> None:
        token = options["token"]
        verify: bool | str = bool(options["verify"])
        if verify and options["ca_file"]:
            verify = str(options["ca_file"])
        cert = None
        if options["cert_file"]:
            cert = (str(options["cert_file"]), str(options["key_file"]))
        self._client: Any = consul.aio.Consul(
            host=str(options["host"]),
            port=int(str(options["port"])),
            scheme=str(options["scheme"]),
            token=token,
            dc=options["datacenter"],
            verify=verify,
            cert=cert,
            connections_limit=MAX_CONNECTIONS,
        )
        if token is not None:
            # py-consul lets $CONSUL_HTTP_TOKEN override an explicit token; the config wins.
            self._client.token = token

    async def services(self, *, index: int, wait: str) -> tuple[int, object]:
        raw_index, data = await self._client.catalog.services(index=index or None, wait=wait)
        return _index(raw_index), data

    async def health(self, service: str, *, index: int, wait: str) -> tuple[int, object]:
        raw_index, data = await self._client.health.service(service, index=index or None, wait=wait)
        return _index(raw_index), data

    async def close(self) -> None:
        await self._client.close()


def _index(raw: object) -> int:
    try:
        return int(str(raw))
    except ValueError:
        raise BadResponse(f"X-Consul-Index {raw!r} is not a number") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_EXPECTED = (aiohttp.ClientError, consul.ConsulException, OSError, TimeoutError, BadResponse)


# ----------------------------------------------------------------------------- the provider


@dataclass(eq=False)
class _Watch:
    service: str
    task: asyncio.Task[None] | None = None
    raw: object = None  # the last response, to recognise wake-ups without a change
    instances: tuple[tuple[str, Instance], ...] | None = None  # None: not read yet


class ConsulProvider:
    def __init__(
        self,
        config: ProviderConfig,
        *,
        rate_interval: float = RATE_INTERVAL,
        rate_burst: int = RATE_BURST,
    ) -> None:
        self.name = config.name
        self._options = config.options
        wait = float(str(config.options["wait"]))
        self._wait = go_duration(wait)
        # Consul adds up to wait/16 of jitter to every blocking query.
        self._blocking_timeout = wait + wait / 16 + REQUEST_SLACK
        self._reconnect_max = float(str(config.options["reconnect_max"]))
        self._rate_interval = rate_interval
        self._rate_burst = rate_burst
        self._table: ServiceTable | None = None
        self._api: _Api | None = None
        self._watches: dict[str, _Watch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: dict[str, str] = {}  # watcher -> why its last request failed
        self._catalog_read = False
        self._published: tuple[Instance, ...] | None = None
        self._stale = False
        self._publish_pending = False
        self._closing = False
        self._warned_connections = False

    async def run(self, table: ServiceTable) -> None:
        self._table = table
        api = self._api = await self._connect()
        try:
            await self._watch(
                "catalog",
                lambda index: api.services(index=index, wait=self._wait),
                self._on_catalog,
            )
        finally:
            self._closing = True
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await api.close()

    async def _connect(self) -> _Api:
        """The client; TLS files that cannot be loaded (yet) make the provider
        stale and are retried, as an unreachable server is."""
        backoff = Backoff(maximum=self._reconnect_max)
        while True:
            try:
                api = _Api(self._options)
            except Exception as exc:
                self._failed("client", exc)
                await backoff.wait()
                continue
            self._errors.pop("client", None)
            return api

    # -- watchers -----------------------------------------------------------------

    async def _watch(
        self,
        key: str,
        fetch: Callable[[int], Awaitable[tuple[int, object]]],
        handle: Callable[[object], None],
    ) -> None:
        """One blocking-query loop; returns only when cancelled."""
        index = 0  # 0: a full read that does not block
        backoff = Backoff(maximum=self._reconnect_max)
        limit = RateLimit(interval=self._rate_interval, burst=self._rate_burst)
        while True:
            await limit.acquire()
            try:
                async with asyncio.timeout(self._blocking_timeout if index else REQUEST_SLACK):
                    returned, data = await fetch(index)
                handle(data)
            except Exception as exc:
                if not isinstance(exc, _EXPECTED):
                    log.exception("consul.watch_error", provider=self.name, watch=key)
                self._failed(key, exc)
                index = 0  # after an error, a full read proves the backend is back
                await backoff.wait()
                continue
            backoff.reset()
            self._succeeded(key)
            following = next_index(index, returned)
            if index and following == 0:
                log.info(
                    "consul.index_reset",
                    provider=self.name,
                    watch=key,
                    previous=index,
                    returned=returned,
                )
            index = following

    def _on_catalog(self, data: object) -> None:
        if not isinstance(data, dict):
            raise BadResponse(f"catalog/services: expected an object, got {type(data).__name__}")
        names = {str(name) for name in data}
        first = not self._catalog_read
        self._catalog_read = True
        if names == self._watches.keys():
            if first:
                self._schedule_publish()  # e.g. an empty catalog: synced with 0 instances
            return
        for service in self._watches.keys() - names:
            self._stop_watch(service)
        for service in sorted(names - self._watches.keys()):
            self._start_watch(service)
        if len(names) >= AGENT_CONNECTION_LIMIT - 10 and not self._warned_connections:
            self._warned_connections = True
            log.warning(
                "consul.many_services",
                provider=self.name,
                services=len(names),
                hint="one blocking query per service: raise the agent's "
                "limits.http_max_conns_per_client (default 200)",
            )
        self._schedule_publish()

    def _start_watch(self, service: str) -> None:
        api = self._api
        assert api is not None  # watchers start from the catalog watcher, inside run()
        watch = _Watch(service)
        self._watches[service] = watch
        task = asyncio.create_task(
            self._watch(
                f"service {service}",
                lambda index: api.health(service, index=index, wait=self._wait),
                lambda data: self._on_health(watch, data),
            ),
            name=f"provider:{self.name}:{service}",
        )
        watch.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop_watch(self, service: str) -> None:
        watch = self._watches.pop(service)
        if watch.task is not None:
            watch.task.cancel()
        self._errors.pop(f"service {service}", None)

    def _on_health(self, watch: _Watch, data: object) -> None:
        if self._watches.get(watch.service) is not watch:
            return  # stopped while its answer was on the way
        if data is None:
            # py-consul turns a 404 into None: no such service (e.g. a name
            # that does not fit in a URL path), so no instances.
            data = []
        if not isinstance(data, list):
            raise BadResponse(
                f"health/service/{watch.service}: expected a list, got {type(data).__name__}"
            )
        if watch.instances is not None and data == watch.raw:
            return  # woken without a change (timeout, idempotent write, another service)
        watch.raw = data
        now = time.time()
        instances: list[tuple[str, Instance]] = []
        for entry in data:
            try:
                instances.append(instance_from_entry(entry, provider=self.name, now=now))
            except ValueError as exc:
                log.warning(
                    "consul.instance_skipped",
                    provider=self.name,
                    service=watch.service,
                    reason=str(exc),
                )
        parsed = tuple(instances)
        if parsed != watch.instances:
            watch.instances = parsed
            self._schedule_publish()

    # -- freshness and publishing ---------------------------------------------------

    def _failed(self, key: str, exc: BaseException) -> None:
        reason = f"{key}: {_describe(exc)}"
        first = not self._errors
        self._errors[key] = reason
        self._stale = True
        if self._table is not None:
            self._table.mark_stale(self.name, reason)
        if first:
            log.warning("consul.unreachable", provider=self.name, error=reason)
        else:
            log.debug("consul.request_failed", provider=self.name, error=reason)

    def _succeeded(self, key: str) -> None:
        if self._errors.pop(key, None) is not None and not self._errors:
            self._schedule_publish()

    def _schedule_publish(self) -> None:
        """Publish once this loop turn is over, so answers that arrive together
        (several services after a full resync) make one table change."""
        if not self._publish_pending:
            self._publish_pending = True
            asyncio.get_running_loop().call_soon(self._publish)

    def _publish(self) -> None:
        self._publish_pending = False
        if self._table is None or self._closing or self._errors or not self._catalog_read:
            return
        pairs: list[tuple[str, Instance]] = []
        for watch in self._watches.values():
            if watch.instances is None:
                return  # a service not read yet: the snapshot would be partial
            pairs.extend(watch.instances)
        snapshot = tuple(sorted(unique_ids(pairs), key=lambda i: (i.name, i.id)))
        if snapshot == self._published and not self._stale:
            return
        self._table.replace(self.name, snapshot)
        self._published = snapshot
        self._stale = False
