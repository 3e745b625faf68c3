"""Prometheus metrics and status over HTTP, in CoreDNS's and grpc-prometheus's names.

The components keep plain counters: cached DNS answers count their own hits
(one integer increment on the hot path), everything off the hot path counts in
dicts and `Durations`. Nothing here runs per query. At scrape time
`MetricsCollector` sums those counters into metric families, so a scrape costs
one pass over the answer caches (a few ms at their 20,000-entry cap) and
nothing between scrapes. `MetricsServer` serves, on one loopback address by
default (CoreDNS's 127.0.0.1:9153):

    /metrics          Prometheus text (or OpenMetrics, if the scraper asks)
    /health/services  the seed's getHealthStatus JSON: {service: {total, healthy, ...}}
    /healthz          200 "OK" while the event loop runs (CoreDNS's health)
    /readyz           200 once every provider has synced, else 503 naming them (ready)

DNS labels are bounded: `type` is one of a fixed set of QTYPEs or "other",
`rcode` a name or "RCODE<n>", `zone` a served domain, "." (bare service names
and forwarded names, as CoreDNS's root zone) or "dropped" (messages no zone
could handle: FORMERR, NOTIMP), as CoreDNS.
"""

from __future__ import annotations

import bisect
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from resolverd import __version__
from resolverd.config import Config
from resolverd.table import ServiceTable, health_status

if TYPE_CHECKING:
    from resolverd.balancing import ConnectionTracker
    from resolverd.dns.answers import Answerer
    from resolverd.dns.forward import Forwarder
    from resolverd.health import HealthChecker
    from resolverd.rpc.server import GrpcMetrics

log = structlog.get_logger(__name__)

PREFIX = "resolverd"

# -- counters the components keep (no Prometheus objects) ---------------------------

# What a DNS reply is counted under: over TCP or not, QTYPE (`known_qtype`),
# RCODE, zone, and whether it had answer records (success vs. NODATA). Cached
# entries hold a small int naming one (their cache's `stat_keys` index), so
# summing their hits costs a list index, not a tuple hash.
StatKey = tuple[bool, int, int, str, bool]


class StatIds:
    """Interned `StatKey`s: `keys[i]` is id i; `hits[i]` the hits of dropped
    entries with that id. Bounded by the label vocabulary, not by traffic."""

    __slots__ = ("_ids", "hits", "keys")

    def __init__(self) -> None:
        self.keys: list[StatKey] = []
        self.hits: list[int] = []
        self._ids: dict[StatKey, int] = {}

    def id(self, key: StatKey) -> int:
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = len(self.keys)
            self.keys.append(key)
            self.hits.append(0)
        return found


# Histogram bounds in seconds: 62.5 us doubling to 8.192 s. CoreDNS's are
# 0.25 ms..8.192 s; two finer ones because building an answer takes ~0.1 ms.
DURATION_BUCKETS = tuple(0.0000625 * 2**i for i in range(18))


class Durations:
    """A latency histogram as plain counters, for code off the hot path.

    counts[i] holds the observations in (buckets[i-1], buckets[i]]; the last
    slot those above every bound (Prometheus's +Inf bucket)."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def add(self, other: Durations) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum

    @property
    def count(self) -> int:
        return sum(self.counts)


# -- label vocabulary -------------------------------------------------------------

# CoreDNS reports these QTYPEs by name and every other one as "other".
QTYPE_NAMES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    13: "HINFO",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    35: "NAPTR",
    39: "DNAME",
    43: "DS",
    46: "RRSIG",
    47: "NSEC",
    48: "DNSKEY",
    50: "NSEC3",
    64: "SVCB",
    65: "HTTPS",
    251: "IXFR",
    252: "AXFR",
    255: "ANY",
    257: "CAA",
}
RCODE_NAMES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    6: "YXDOMAIN",
    7: "YXRRSET",
    8: "NXRRSET",
    9: "NOTAUTH",
    10: "NOTZONE",
    16: "BADVERS",
}


def known_qtype(qtype: int) -> int:
    """The QTYPE as counted: a named one, or 0 ("other"), so the counters stay
    small whatever types clients send."""
    return qtype if qtype in QTYPE_NAMES else 0


def qtype_name(qtype: int) -> str:
    return QTYPE_NAMES.get(qtype, "other")


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode, f"RCODE{rcode}")


def answer_kind(rcode: int, answered: bool) -> str:
    """CoreDNS's cache types: success, denial (NXDOMAIN, NODATA); plus error."""
    if rcode == 0:
        return "success" if answered else "denial"
    return "denial" if rcode == 3 else "error"


def _hostport(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Counted(Protocol):
    hits: int
    stat: int


def _entry_hits(ids: StatIds, caches: Iterable[Iterable[_Counted]]) -> dict[StatKey, int]:
    """Hits of live entries plus dropped ones, by what they count under: the
    scrape's one pass over the caches (~1 ms per 20,000 entries)."""
    totals = list(ids.hits)
    for cache in caches:
        for entry in cache:
            if entry.hits:
                totals[entry.stat] += entry.hits
    keys = ids.keys
    return {keys[i]: n for i, n in enumerate(totals) if n}


def _add(into: dict[StatKey, int], counts: Mapping[StatKey, int]) -> None:
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n


def _buckets(durations: Durations) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, as Prometheus histograms have them."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(durations.buckets, durations.counts, strict=False):
        total += n
        out.append((repr(bound), total))
    out.append(("+Inf", total + durations.counts[-1]))
    return out


class _ForwardTotals:
    """A forwarder's counters, summed; kept when a reload replaces it."""

    def __init__(self) -> None:
        self.hits: dict[StatKey, int] = {}  # forwarding-cache hits
        self.requests: dict[tuple[str, int], int] = {}
        self.responses: dict[tuple[tuple[str, int], int], int] = {}
        self.failures: dict[tuple[tuple[str, int], str], int] = {}
        self.durations: dict[tuple[str, int], Durations] = {}
        self.coalesced = 0

    def add(self, fwd: Forwarder) -> None:
        _add(self.hits, _entry_hits(fwd.stat_ids, [fwd.cache.values()]))
        for upstream, stats in fwd.upstream_stats.items():
            self.requests[upstream] = self.requests.get(upstream, 0) + stats.requests
            for rcode, n in stats.responses.items():
                self.responses[upstream, rcode] = self.responses.get((upstream, rcode), 0) + n
            for reason, n in stats.failures.items():
                self.failures[upstream, reason] = self.failures.get((upstream, reason), 0) + n
            self.durations.setdefault(upstream, Durations()).add(stats.durations)
        self.coalesced += fwd.stats["coalesced"]

    def merged(self, fwd: Forwarder | None) -> _ForwardTotals:
        out = _ForwardTotals()
        out.merge(self)
        if fwd is not None:
            out.add(fwd)
        return out

    def merge(self, other: _ForwardTotals) -> None:
        _add(self.hits, other.hits)
        for upstream, n in other.requests.items():
            self.requests[upstream] = self.requests.get(upstream, 0) + n
        for key, n in other.responses.items():
            self.responses[key] = self.responses.get(key, 0) + n
        for fkey, n in other.failures.items():
            self.failures[fkey] = self.failures.get(fkey, 0) + n
        for upstream, durations in other.durations.items():
            self.durations.setdefault(upstream, Durations()).add(durations)
        self.coalesced += other.coalesced


# -- the collector ------------------------------------------------------------------


class MetricsCollector:
    """Builds every resolverd_* family from the components' counters at scrape time."""

    def __init__(
        self,
        *,
        config: Config,
        table: ServiceTable,
        answerer: Answerer,
        forwarder: Forwarder | None,
        tracker: ConnectionTracker,
        health: HealthChecker | None,
        grpc: GrpcMetrics | None,
    ) -> None:
        self.config = config
        self.table = table
        self.answerer = answerer
        self.forwarder = forwarder
        self.tracker = tracker
        self.health = health
        self.grpc = grpc
        # Counts of components a reload replaced: counters never go back.
        self._retired_forward = _ForwardTotals()
        self._retired_checks: dict[str, int] = {}

    def reconfigure(
        self, *, config: Config, forwarder: Forwarder | None, health: HealthChecker | None
    ) -> None:
        self.config = config
        if forwarder is not self.forwarder and self.forwarder is not None:
            self._retired_forward.add(self.forwarder)
        self.forwarder = forwarder
        if health is not self.health and self.health is not None:
            for state, n in self.health.results.items():
                self._retired_checks[state.value] = self._retired_checks.get(state.value, 0) + n
        self.health = health

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        forward = self._retired_forward.merged(self.forwarder)
        yield from self._dns(forward)
        yield from self._forward(forward)
        yield from self._providers(now)
        yield from self._services()
        yield from self._health_checks()
        yield from self._connections()
        yield from self._grpc()
        info = GaugeMetricFamily(
            f"{PREFIX}_build_info", "resolverd's version; always 1.", labels=["version", "python"]
        )
        info.add_metric([__version__, sys.version.split()[0]], 1)
        yield info

    # -- DNS ----------------------------------------------------------------------

    def _dns(self, forward: _ForwardTotals) -> Iterator[Metric]:
        answerer = self.answerer
        caches = [answerer.udp_cache.values(), answerer.tcp_cache.values()]
        hits = _entry_hits(answerer.stat_ids, caches)
        replies = dict(answerer.counts)
        _add(replies, hits)
        _add(replies, forward.hits)

        requests: dict[tuple[str, str, str], int] = {}
        responses: dict[tuple[str, str], int] = {}
        for (tcp, qtype, rcode, zone, _answered), n in replies.items():
            rkey = ("tcp" if tcp else "udp", qtype_name(qtype), zone)
            requests[rkey] = requests.get(rkey, 0) + n
            skey = (rcode_name(rcode), zone)
            responses[skey] = responses.get(skey, 0) + n
        family = CounterMetricFamily(
            f"{PREFIX}_dns_requests",
            "DNS queries answered, by transport, query type and zone (a served "
            'domain; "." for bare service names and forwarded names; "dropped" '
            "for messages no zone could handle).",
            labels=["proto", "type", "zone"],
        )
        for (proto, qtype_label, zone), n in sorted(requests.items()):
            family.add_metric([proto, qtype_label, zone], n)
        yield family
        family = CounterMetricFamily(
            f"{PREFIX}_dns_responses",
            "DNS responses sent, by response code and zone.",
            labels=["rcode", "zone"],
        )
        for (rcode_label, zone), n in sorted(responses.items()):
            family.add_metric([rcode_label, zone], n)
        yield family

        histogram = HistogramMetricFamily(
            f"{PREFIX}_dns_request_duration_seconds",
            "Server-side time of the DNS queries no cache answered, every one of "
            "them, by path: build (an answer built from the table: the first "
            "query for a name after each change), direct (error replies, "
            "refused recursion), forward (until the upstream answered). Queries "
            "answered from a cache (resolverd_cache_hits_total) are not timed: "
            "they take microseconds, and timing them would double the hot "
            "path's cost.",
            labels=["path"],
        )
        for path, durations in answerer.durations.items():
            histogram.add_metric([path], _buckets(durations), durations.sum)
        yield histogram

        by_kind: dict[tuple[str, str], int] = {}
        for cache_name, counts in (("answer", hits), ("forward", forward.hits)):
            for kind in ("success", "denial", "error"):
                by_kind[cache_name, kind] = 0
            for (_tcp, _qtype, rcode, _zone, answered), n in counts.items():
                key = (cache_name, answer_kind(rcode, answered))
                by_kind[key] += n
        family = CounterMetricFamily(
            f"{PREFIX}_cache_hits",
            "DNS replies served from a cache: answer (our zones) or forward "
            "(upstream answers), by CoreDNS's type: success, denial (NXDOMAIN "
            "or NODATA) or error.",
            labels=["cache", "type"],
        )
        for (cache_name, kind), n in sorted(by_kind.items()):
            family.add_metric([cache_name, kind], n)
        yield family
        family = CounterMetricFamily(
            f"{PREFIX}_cache_misses",
            "DNS queries a cache could not answer: answers built, queries forwarded "
            "upstream. Messages answered without a lookup (FORMERR, NOTIMP, "
            "refused recursion) are neither hits nor misses.",
            labels=["cache"],
        )
        for cache_name, n in sorted(answerer.misses.items()):
            family.add_metric([cache_name], n)
        yield family
        gauge = GaugeMetricFamily(
            f"{PREFIX}_cache_entries", "Entries in each DNS cache.", labels=["cache"]
        )
        gauge.add_metric(["answer"], len(answerer.udp_cache) + len(answerer.tcp_cache))
        gauge.add_metric(["forward"], len(self.forwarder.cache) if self.forwarder else 0)
        yield gauge

    def _forward(self, forward: _ForwardTotals) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"{PREFIX}_forward_requests",
            "Queries sent to each upstream resolver (retries on the next one included).",
            labels=["to"],
        )
        for upstream, n in sorted(forward.requests.items()):
            family.add_metric([_hostport(upstream)], n)
        yield family
        family = CounterMetricFamily(
            f"{PREFIX}_forward_responses",
            "Responses received from each upstream resolver, by response code.",
            labels=["to", "rcode"],
        )
        for (upstream, rcode), n in sorted(forward.responses.items()):
            family.add_metric([_hostport(upstream), rcode_name(rcode)], n)
        yield family
        family = CounterMetricFamily(
            f"{PREFIX}_forward_failures",
            "Upstream exchanges that gave no usable answer, by reason: timeout, "
            "network, malformed, servfail, refused (the next upstream is tried).",
            labels=["to", "reason"],
        )
        for (upstream, reason), n in sorted(forward.failures.items()):
            family.add_metric([_hostport(upstream), reason], n)
        yield family
        histogram = HistogramMetricFamily(
            f"{PREFIX}_forward_request_duration_seconds",
            "Time from sending a query to an upstream to its response.",
            labels=["to"],
        )
        for upstream, durations in sorted(forward.durations.items()):
            histogram.add_metric([_hostport(upstream)], _buckets(durations), durations.sum)
        yield histogram
        yield CounterMetricFamily(
            f"{PREFIX}_forward_coalesced",
            "Forwarded queries that waited for an identical one already in flight.",
            value=forward.coalesced,
        )

    # -- table ---------------------------------------------------------------------

    def _providers(self, now: float) -> Iterator[Metric]:
        types = {p.name: p.type for p in self.config.providers}
        states = sorted(self.table.states().items())
        synced = GaugeMetricFamily(
            f"{PREFIX}_provider_synced",
            "1 once the provider has published from its backend since start.",
            labels=["provider", "type"],
        )
        stale = GaugeMetricFamily(
            f"{PREFIX}_provider_stale",
            "1 while the provider cannot reach its backend (its last snapshot is served).",
            labels=["provider"],
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_provider_stale_age_seconds",
            "Seconds since the provider's snapshot was last known good: 0 while "
            "its backend is reachable; absent if it never was.",
            labels=["provider"],
        )
        instances = GaugeMetricFamily(
            f"{PREFIX}_provider_instances",
            "Instances in the provider's snapshot.",
            labels=["provider"],
        )
        last_sync = GaugeMetricFamily(
            f"{PREFIX}_provider_last_sync_timestamp_seconds",
            "Unix time of the provider's last successful sync.",
            labels=["provider"],
        )
        for name, state in states:
            synced.add_metric([name, types.get(name, name)], 1 if state.synced else 0)
            stale.add_metric([name], 1 if state.stale else 0)
            seconds = state.age(now)
            if seconds is not None:
                age.add_metric([name], seconds)
            instances.add_metric([name], state.instances)
            if state.last_sync is not None:
                last_sync.add_metric([name], state.last_sync)
        yield from (synced, stale, age, instances, last_sync)
        yield GaugeMetricFamily(
            f"{PREFIX}_ready",
            "1 once every provider has synced (or was restored from the on-disk copy).",
            value=1 if self.table.ready else 0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_table_revision",
            "The service table's revision (bumped on every change).",
            value=self.table.view.revision,
        )

    def _services(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            f"{PREFIX}_service_instances",
            "Instances of each service by health (the seed's getHealthStatus).",
            labels=["service", "health"],
        )
        for service, counts in health_status(self.table.view).items():
            gauge.add_metric([service, "healthy"], counts["healthy"])
            gauge.add_metric([service, "unhealthy"], counts["unhealthy"])
            gauge.add_metric([service, "critical"], counts["critical"])
        yield gauge

    def _health_checks(self) -> Iterator[Metric]:
        results = dict.fromkeys(("healthy", "unhealthy", "critical"), 0)
        for state, n in self._retired_checks.items():
            results[state] = results.get(state, 0) + n
        if self.health is not None:
            for health_state, n in self.health.results.items():
                results[health_state.value] = results.get(health_state.value, 0) + n
        family = CounterMetricFamily(
            f"{PREFIX}_health_checks",
            "Active health check probes by result, in the seed's states: healthy "
            "(connected, or HTTP 2xx), unhealthy (another HTTP status), critical "
            "(no answer).",
            labels=["result"],
        )
        for result, n in sorted(results.items()):
            family.add_metric([result], n)
        yield family
        yield GaugeMetricFamily(
            f"{PREFIX}_health_checked_instances",
            "Instances being actively health checked.",
            value=self.health.instances if self.health is not None else 0,
        )

    def _connections(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            f"{PREFIX}_connections_open",
            "Open connections reported over gRPC, for instances in the table "
            "with at least one (least_connections balances on these).",
            labels=["service", "instance"],
        )
        by_id = self.table.view.by_id
        for instance_id, n in sorted(self.tracker.counts().items()):
            inst = by_id.get(instance_id)
            if inst is not None:
                gauge.add_metric([inst.name, instance_id], n)
        yield gauge

    # -- gRPC ---------------------------------------------------------------------

    def _grpc(self) -> Iterator[Metric]:
        grpc = self.grpc
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        started = CounterMetricFamily(
            f"{PREFIX}_grpc_server_started", "RPCs started on the server.", labels=labels
        )
        handled = CounterMetricFamily(
            f"{PREFIX}_grpc_server_handled",
            "RPCs completed on the server, by status code (grpc-prometheus's "
            "spelling: OK, NotFound, InvalidArgument ...).",
            labels=[*labels, "grpc_code"],
        )
        seconds = HistogramMetricFamily(
            f"{PREFIX}_grpc_server_handling_seconds",
            "Time from an RPC's start to its completion on the server (for "
            "streams, the stream's lifetime).",
            labels=labels,
        )
        if grpc is not None:
            for key, n in sorted(grpc.started.items()):
                started.add_metric(list(key), n)
            for hkey, n in sorted(grpc.handled.items()):
                handled.add_metric(list(hkey), n)
            for key, durations in sorted(grpc.durations.items()):
                seconds.add_metric(list(key), _buckets(durations), durations.sum)
        yield from (started, handled, seconds)


# -- HTTP ---------------------------------------------------------------------------


class MetricsServer:
    """/metrics, /health/services, /healthz and /readyz on `config.metrics.listen`
    (nothing when it is None). `reconfigure` follows a reloaded config."""

    def __init__(
        self,
        *,
        config: Config,
        table: ServiceTable,
        answerer: Answerer,
        forwarder: Forwarder | None,
        tracker: ConnectionTracker,
        health: HealthChecker | None,
        grpc: GrpcMetrics | None = None,
    ) -> None:
        self.config = config
        self.table = table
        self.collector = MetricsCollector(
            config=config,
            table=table,
            answerer=answerer,
            forwarder=forwarder,
            tracker=tracker,
            health=health,
            grpc=grpc,
        )
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self.address: tuple[str, int] | None = None  # bound, once started

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health/services", self._services)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def start(self) -> None:
        listen = self.config.metrics.listen
        if listen is None:
            return
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            self._site, self.address = await self._bind(runner, listen)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("metrics.listening", address=_hostport(self.address))

    async def _bind(
        self, runner: web.AppRunner, listen: tuple[str, int]
    ) -> tuple[web.SockSite, tuple[str, int]]:
        host, port = listen
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"metrics cannot listen on {_hostport(listen)}: {exc.strerror}"
            ) from None
        bound = sock.getsockname()
        site = web.SockSite(runner, sock)
        await site.start()
        return site, (bound[0], bound[1])

    async def stop(self) -> None:
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()
            log.info("metrics.stopped")

    async def reconfigure(
        self, *, config: Config, forwarder: Forwarder | None, health: HealthChecker | None
    ) -> None:
        """A reloaded config and the components it replaced. A new listen
        address is bound before the old one is let go; if it cannot be, this
        raises OSError and the old one stays."""
        self.collector.reconfigure(config=config, forwarder=forwarder, health=health)
        old = self.config.metrics.listen
        self.config = config
        new = config.metrics.listen
        if new == old:
            return
        if new is None:
            await self.stop()
            return
        if self._runner is None:
            await self.start()
            return
        site, address = await self._bind(self._runner, new)
        if self._site is not None:
            await self._site.stop()
        self._site, self.address = site, address
        log.info("metrics.listening", address=_hostport(address))

    # -- handlers -------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        # On the loop, between queries: the counters are never seen half-updated.
        body = encoder(self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _services(self, request: web.Request) -> web.Response:
        return web.json_response(health_status(self.table.view))

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.table.ready:
            return web.Response(text="OK")
        waiting = [
            state
            for _, state in sorted(self.table.states().items())
            if not (state.synced or state.restored)
        ]
        lines = [f"{s.name}: not synced" + (f" ({s.error})" if s.error else "") for s in waiting]
        return web.Response(status=503, text="\n".join(["not ready", *lines]) + "\n")
