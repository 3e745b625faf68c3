"""Load balancing as pure policy plus small bounded state.

Balancing is pure policy: given a service's instances and a request context it
returns an order, nothing else. The expensive, client-independent part is an
immutable :class:`Plan` (base order, a cyclic schedule of "first" indexes and,
for ``ip_hash``, a consistent-hash ring) that the DNS layer can turn into
precomputed wire answers per variant; the per-request part is a tiny
:meth:`Balancer.pick` that chooses one index. The only mutable state lives in
small bounded objects: a counter per service, a :class:`StickySessions` LRU with
a TTL per service, and a :class:`ConnectionTracker` that least-connections
reads. Compared with the seed's ``LoadBalancer`` this keeps its semantics but
fixes its bugs: round robin is a real cycle, weighted is smooth and
deterministic, least-connections ties rotate, ``ip_hash`` uses consistent
hashing and spreads address-less clients, ``0`` is a valid coordinate, and the
sticky map no longer grows forever.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import structlog

from resolverd.config import Algorithm, BalancePolicy, Location
from resolverd.model import Health, Instance

__all__ = [
    "Balancer",
    "ClientContext",
    "ConnectionTracker",
    "Plan",
    "StickySessions",
    "build_plan",
    "effective_weight",
    "haversine_km",
    "instance_location",
    "ring_pick",
    "servable",
]

log = structlog.get_logger(__name__)

EARTH_RADIUS_KM = 6371.0
RING_POINTS_PER_INSTANCE = 64
WEIGHTED_MAX_EXACT_CYCLE = 4096
WEIGHTED_DEFAULT_CYCLE = 1000


@dataclass(frozen=True, slots=True)
class ClientContext:
    """What is known about the client of one request."""

    address: str | None = None  # client IP (DNS source address or ECS subnet; gRPC peer)
    session_key: str | None = None  # explicit sticky key (gRPC); DNS uses address
    location: Location | None = None


# --------------------------------------------------------------------------- pure helpers


def servable(instances: Sequence[Instance], policy: BalancePolicy) -> tuple[Instance, ...]:
    """The instances that may receive traffic, in input order.

    With health checks enabled only healthy instances qualify; otherwise all do.
    """
    if not policy.health_check_enabled:
        return tuple(instances)
    return tuple(inst for inst in instances if inst.health is Health.HEALTHY)


def _number(metadata: Mapping[str, str], key: str, default: float) -> float:
    raw = metadata.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def effective_weight(inst: Instance) -> float:
    """The seed's load-adjusted weight: ``max(1, weight * (1 - currentLoad / capacity))``.

    Metadata ``weight`` (default 1), ``capacity`` (default 100) and
    ``currentLoad`` (default 0); unparsable or non-finite numbers fall back to
    their defaults. A capacity ``<= 0`` means no load adjustment, and the load
    factor is clamped to ``[0, 1]`` so a negative load cannot inflate a weight
    (nor a negative weight times an overload turn positive). Always ``>= 1``.
    """
    md = inst.metadata
    weight = _number(md, "weight", 1.0)
    capacity = _number(md, "capacity", 100.0)
    load = _number(md, "currentLoad", 0.0)
    factor = 0.0 if capacity <= 0 else min(1.0, max(0.0, load / capacity))
    return max(1.0, weight * (1.0 - factor))


def haversine_km(a: Location, b: Location) -> float:
    """Great-circle distance between two points, in kilometres."""
    lat1 = math.radians(a.latitude)
    lat2 = math.radians(b.latitude)
    dlat = lat2 - lat1
    dlon = math.radians(b.longitude - a.longitude)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def instance_location(inst: Instance) -> Location | None:
    """The instance's ``latitude``/``longitude`` metadata as a location.

    Both keys must be present, finite and in range; otherwise None. Unlike the
    seed, an explicit ``0`` is a real coordinate (the Gulf of Guinea exists).
    """
    md = inst.metadata
    lat = _number(md, "latitude", math.nan)
    lon = _number(md, "longitude", math.nan)
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):  # NaN fails both
        return None
    return Location(latitude=lat, longitude=lon)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class Plan:
    """An immutable, client-independent balancing decision for one instance set.

    ``schedule`` is a cyclic sequence of "first" indexes into ``instances``
    consumed by a per-service counter; :meth:`order` expands a first index into
    the full answer order. ``ring`` is the ``ip_hash`` consistent-hash ring as
    ``(sorted hash points, instance index per point)``.
    """

    instances: tuple[Instance, ...]
    schedule: tuple[int, ...]
    rotate: bool
    ring: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    sticky: bool = False
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        index: dict[str, int] = {}
        for i, inst in enumerate(self.instances):
            index.setdefault(inst.id, i)
        object.__setattr__(self, "_index", MappingProxyType(index))

    def order(self, first: int) -> tuple[Instance, ...]:
        """All instances with ``instances[first]`` first.

        ``rotate`` -> ``instances[first:] + instances[:first]``; otherwise the
        others follow in base order. An empty plan gives ``()``.
        """
        n = len(self.instances)
        if n == 0:
            return ()
        if not 0 <= first < n:
            raise IndexError(f"first index {first} out of range for {n} instances")
        if self.rotate:
            return self.instances[first:] + self.instances[:first]
        return (self.instances[first], *self.instances[:first], *self.instances[first + 1 :])

    def index_of(self, instance_id: str) -> int | None:
        """Index of the instance with this id, or None (O(1))."""
        return self._index.get(instance_id)

    @property
    def client_dependent(self) -> bool:
        """True when the pick depends on who asks (hash ring or sticky sessions)."""
        return self.ring is not None or self.sticky


_EMPTY_PLAN_SCHEDULE: tuple[int, ...] = ()


def _rr_plan(instances: Sequence[Instance], sticky: bool) -> Plan:
    base = tuple(sorted(instances, key=lambda i: i.id))
    return Plan(base, tuple(range(len(base))), rotate=True, ring=None, sticky=sticky)


def _apportion(weights: Sequence[float], total_slots: int) -> list[int]:
    """Largest-remainder split of ``total_slots``: each share within 1 of exact."""
    total = math.fsum(weights)
    exact = [w * total_slots / total for w in weights]
    shares = [math.floor(x) for x in exact]
    missing = total_slots - sum(shares)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: max(0, missing)]:
        shares[i] += 1
    return shares


def _smooth_schedule(weights: Sequence[float]) -> tuple[int, ...]:
    """Smooth weighted round robin (nginx) over one cycle.

    Integral weights summing to at most 4096 run as they are, so each index
    appears exactly ``weight`` times per cycle. Otherwise the weights are first
    apportioned to integer shares of a 1000-long cycle (each within one pick of
    exact), which keeps the nginx guarantee of exact counts per cycle.
    """
    if not weights:
        return ()
    total = math.fsum(weights)
    if all(float(w).is_integer() for w in weights) and total <= WEIGHTED_MAX_EXACT_CYCLE:
        shares = [int(w) for w in weights]
    else:
        shares = _apportion(weights, WEIGHTED_DEFAULT_CYCLE)
    length = sum(shares)
    current = [0] * len(shares)
    schedule: list[int] = []
    for _ in range(length):
        best = 0
        for i, share in enumerate(shares):
            current[i] += share
            if current[i] > current[best]:
                best = i
        current[best] -= length
        schedule.append(best)
    return tuple(schedule)


def _weighted_plan(instances: Sequence[Instance], sticky: bool) -> Plan:
    keyed = sorted(((effective_weight(i), i) for i in instances), key=lambda p: (-p[0], p[1].id))
    base = tuple(inst for _, inst in keyed)
    schedule = _smooth_schedule([w for w, _ in keyed])
    return Plan(base, schedule, rotate=False, ring=None, sticky=sticky)


def _ties(sorted_keys: Sequence[float]) -> int:
    """How many leading entries share the minimum key (exact equality)."""
    first = sorted_keys[0]
    return sum(1 for _ in itertools.takewhile(lambda k: k == first, sorted_keys))


def _least_connections_plan(
    instances: Sequence[Instance], connections: Mapping[str, int] | None, sticky: bool
) -> Plan:
    counts = connections if connections is not None else {}
    keyed = sorted(((counts.get(i.id, 0), i) for i in instances), key=lambda p: (p[0], p[1].id))
    base = tuple(inst for _, inst in keyed)
    k = _ties([float(c) for c, _ in keyed])
    return Plan(base, tuple(range(k)), rotate=False, ring=None, sticky=sticky)


def _hash(text: str) -> int:
    """crc32 followed by the murmur3 32-bit finaliser.

    crc32 alone is linear: the points of ``id#0 .. id#63`` cluster, giving
    instances ring shares from 18% to 32% of four. The finaliser (a bijection)
    spreads them while staying cheap, stable across processes and runs.
    """
    h = zlib.crc32(text.encode())
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _ip_hash_plan(instances: Sequence[Instance], sticky: bool) -> Plan:
    base = tuple(sorted(instances, key=lambda i: i.id))
    points = sorted(
        (_hash(f"{inst.id}#{v}"), idx)
        for idx, inst in enumerate(base)
        for v in range(RING_POINTS_PER_INSTANCE)
    )
    ring = (tuple(p for p, _ in points), tuple(i for _, i in points))
    return Plan(base, tuple(range(len(base))), rotate=True, ring=ring, sticky=sticky)


def _geo_plan(instances: Sequence[Instance], location: Location, sticky: bool) -> Plan | None:
    keyed: list[tuple[float, Instance]] = []
    located = False
    for inst in instances:
        where = instance_location(inst)
        if where is None:
            keyed.append((math.inf, inst))
        else:
            located = True
            keyed.append((haversine_km(location, where), inst))
    if not located:
        return None
    keyed.sort(key=lambda p: (p[0], p[1].id))
    base = tuple(inst for _, inst in keyed)
    k = _ties([d for d, _ in keyed])
    return Plan(base, tuple(range(k)), rotate=False, ring=None, sticky=sticky)


def build_plan(
    instances: Sequence[Instance],
    policy: BalancePolicy,
    *,
    connections: Mapping[str, int] | None = None,
    location: Location | None = None,
) -> Plan:
    """The plan of ``policy.algorithm`` for already filtered, servable instances."""
    sticky = policy.sticky_session
    if not instances:
        return Plan((), _EMPTY_PLAN_SCHEDULE, rotate=True, ring=None, sticky=sticky)
    algorithm = policy.algorithm
    if algorithm is Algorithm.GEO_LOCATION:
        geo = _geo_plan(instances, location, sticky) if location is not None else None
        if geo is not None:
            return geo
        algorithm = policy.fallback
        if algorithm is Algorithm.GEO_LOCATION:
            algorithm = Algorithm.ROUND_ROBIN
    if algorithm is Algorithm.WEIGHTED:
        return _weighted_plan(instances, sticky)
    if algorithm is Algorithm.LEAST_CONNECTIONS:
        return _least_connections_plan(instances, connections, sticky)
    if algorithm is Algorithm.IP_HASH:
        return _ip_hash_plan(instances, sticky)
    return _rr_plan(instances, sticky)


def ring_pick(plan: Plan, address: str) -> int:
    """The instance index owning ``address`` on the plan's consistent-hash ring."""
    if plan.ring is None or not plan.ring[0]:
        raise ValueError("plan has no hash ring")
    points, owners = plan.ring
    pos = bisect.bisect_left(points, _hash(address))
    return owners[pos if pos < len(points) else 0]


# --------------------------------------------------------------------------- state


class StickySessions:
    """Session key -> instance id; a bounded LRU with a sliding TTL.

    The seed's ``sessionMap`` grew forever. Here a hit refreshes both recency
    and expiry, ``put`` evicts the least recently used entries beyond
    ``max_entries``, and expired entries are dropped lazily. Because every touch
    moves an entry to the end, recency order is also expiry order, so purging
    from the front is cheap.
    """

    __slots__ = ("_clock", "_entries", "_max_entries", "_ttl")

    def __init__(
        self, *, max_entries: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_entries = max(0, max_entries)
        self._ttl = ttl
        self._clock = clock
        # key -> (instance_id, last touched)
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @property
    def ttl(self) -> float:
        return self._ttl

    def reconfigure(self, *, max_entries: int, ttl: float) -> None:
        """Apply new limits without losing live sessions (beyond the new bound)."""
        self._max_entries = max(0, max_entries)
        self._ttl = ttl
        self._purge(self._clock())
        self._evict()

    def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now - entry[1] >= self._ttl:
            del self._entries[key]
            return None
        self._entries[key] = (entry[0], now)
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, instance_id: str) -> None:
        now = self._clock()
        self._purge(now)
        if self._max_entries == 0:
            return
        self._entries[key] = (instance_id, now)
        self._entries.move_to_end(key)
        self._evict()

    def retain(self, alive_ids: Collection[str]) -> int:
        """Drop sessions pinned to instances not in ``alive_ids``; return how many."""
        alive = alive_ids if isinstance(alive_ids, set | frozenset) else frozenset(alive_ids)
        dead = [key for key, (iid, _) in self._entries.items() if iid not in alive]
        for key in dead:
            del self._entries[key]
        return len(dead)

    def __len__(self) -> int:
        self._purge(self._clock())
        return len(self._entries)

    def _purge(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (_, touched) = next(iter(entries.items()))
            if now - touched < self._ttl:
                break
            del entries[key]

    def _evict(self) -> None:
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class ConnectionTracker:
    """Open connections per instance; least-connections reads it.

    Counts never go below zero and instances at zero are not stored, so the
    map only holds instances with live connections.
    """

    __slots__ = ("_counts", "_subscribers", "_view", "version")

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._view: Mapping[str, int] = MappingProxyType(self._counts)
        self._subscribers: list[Callable[[str], None]] = []
        # Bumped on every change, so derived data can tell it is out of date.
        self.version = 0

    def opened(self, instance_id: str, n: int = 1) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        if n == 0:
            return
        self._counts[instance_id] = self._counts.get(instance_id, 0) + n
        self._notify(instance_id)

    def closed(self, instance_id: str, n: int = 1) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        current = self._counts.get(instance_id, 0)
        if n == 0 or current == 0:
            return
        remaining = current - n
        if remaining > 0:
            self._counts[instance_id] = remaining
        else:
            del self._counts[instance_id]
        self._notify(instance_id)

    def count(self, instance_id: str) -> int:
        return self._counts.get(instance_id, 0)

    def counts(self) -> Mapping[str, int]:
        """A live, read-only view of the non-zero counts."""
        return self._view

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(instance_id)`` after each change; returns an unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            # Identity, not equality: the same callable may be subscribed twice.
            for i, cb in enumerate(self._subscribers):
                if cb is callback:
                    del self._subscribers[i]
                    return

        return unsubscribe

    def retain(self, alive_ids: Collection[str]) -> None:
        """Forget instances that left; subscribers hear about each one."""
        alive = alive_ids if isinstance(alive_ids, set | frozenset) else frozenset(alive_ids)
        gone = [iid for iid in self._counts if iid not in alive]
        for iid in gone:
            del self._counts[iid]
        for iid in gone:
            self._notify(iid)

    def _notify(self, instance_id: str) -> None:
        self.version += 1
        for callback in tuple(self._subscribers):
            try:
                callback(instance_id)
            except Exception:
                log.exception(
                    "balancing.tracker_subscriber_failed",
                    instance=instance_id,
                    subscriber=repr(callback),
                )


class Balancer:
    """Per-service state: a counter per service for schedules, a StickySessions per
    service (created from that service's policy)."""

    __slots__ = ("_clock", "_counters", "_sessions", "_tracker")

    def __init__(
        self, *, tracker: ConnectionTracker, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._tracker = tracker
        self._clock = clock
        self._counters: dict[str, Iterator[int]] = {}
        self._sessions: dict[str, StickySessions] = {}

    @property
    def tracker(self) -> ConnectionTracker:
        return self._tracker

    def plan(
        self,
        service: str,
        instances: Sequence[Instance],
        policy: BalancePolicy,
        *,
        location: Location | None = None,
    ) -> Plan:
        """``servable()`` then :func:`build_plan` with the tracker's counts."""
        return build_plan(
            servable(instances, policy),
            policy,
            connections=self._tracker.counts(),
            location=location,
        )

    def pick(
        self, service: str, plan: Plan, policy: BalancePolicy, ctx: ClientContext
    ) -> int | None:
        """The index into ``plan.instances`` to put first, or None for an empty plan."""
        if not plan.instances:
            return None
        key = (ctx.session_key or ctx.address) if plan.sticky else None
        sessions = self._sessions_for(service, policy) if key else None
        if sessions is not None and key:
            pinned = sessions.get(key)
            if pinned is not None:
                idx = plan.index_of(pinned)
                if idx is not None:
                    return idx
        if plan.ring is not None and ctx.address:
            idx = ring_pick(plan, ctx.address)
        elif plan.schedule:
            idx = plan.schedule[next(self.counter(service)) % len(plan.schedule)]
        else:
            idx = 0
        if sessions is not None and key:
            sessions.put(key, plan.instances[idx].id)
        return idx

    def order(
        self,
        service: str,
        instances: Sequence[Instance],
        policy: BalancePolicy,
        ctx: ClientContext,
    ) -> tuple[Instance, ...]:
        """The full answer order for one request; ``()`` when nothing is servable."""
        plan = self.plan(service, instances, policy, location=ctx.location)
        idx = self.pick(service, plan, policy, ctx)
        return () if idx is None else plan.order(idx)

    def retain(self, alive_ids: Collection[str]) -> None:
        """Sticky maps forget instances that left.

        Connection counts are not dropped here: they belong to the Report
        streams that opened them, which release them when they end; dropping
        them would let one stream's closes eat another's opens when an
        instance leaves and comes back.
        """
        alive = alive_ids if isinstance(alive_ids, set | frozenset) else frozenset(alive_ids)
        for sessions in self._sessions.values():
            sessions.retain(alive)

    def forget_service(self, service: str) -> None:
        self._counters.pop(service, None)
        self._sessions.pop(service, None)

    def counter(self, service: str) -> Iterator[int]:
        """The service's schedule position, shared by gRPC and every DNS answer
        of the service so one rotation spans all clients and question forms."""
        counter = self._counters.get(service)
        if counter is None:
            counter = self._counters[service] = itertools.count()
        return counter

    def _sessions_for(self, service: str, policy: BalancePolicy) -> StickySessions:
        sessions = self._sessions.get(service)
        if sessions is None:
            sessions = self._sessions[service] = StickySessions(
                max_entries=policy.sticky_max_entries, ttl=policy.sticky_ttl, clock=self._clock
            )
        elif (sessions.max_entries, sessions.ttl) != (
            max(0, policy.sticky_max_entries),
            policy.sticky_ttl,
        ):
            sessions.reconfigure(max_entries=policy.sticky_max_entries, ttl=policy.sticky_ttl)
        return sessions


@dataclass(slots=True)
class Outcome:
    successes: int = 0
    failures: int = 0
    average_latency_ms: float = 0.0


class OutcomeStats:
    """Call outcomes reported per instance (gRPC Report): counts and a moving
    average of latency. Bounded by the instances in the table (`retain`)."""

    ALPHA = 0.2

    def __init__(self) -> None:
        self._stats: dict[str, Outcome] = {}
        self.version = 0  # bumped on every record

    def record(self, instance_id: str, *, success: bool, latency_ms: float, count: int = 1) -> None:
        stats = self._stats.get(instance_id)
        if stats is None:
            stats = self._stats[instance_id] = Outcome(average_latency_ms=latency_ms)
        if success:
            stats.successes += count
        else:
            stats.failures += count
        stats.average_latency_ms += self.ALPHA * (latency_ms - stats.average_latency_ms)
        self.version += 1

    def get(self, instance_id: str) -> Outcome | None:
        return self._stats.get(instance_id)

    def retain(self, alive_ids: Collection[str]) -> None:
        for instance_id in [i for i in self._stats if i not in alive_ids]:
            del self._stats[instance_id]
