"""Tests for resolverd.balancing: plans, picks and the small bounded state."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from types import MappingProxyType

import pytest

from resolverd.balancing import (
    Balancer,
    ClientContext,
    ConnectionTracker,
    Plan,
    StickySessions,
    build_plan,
    effective_weight,
    haversine_km,
    instance_location,
    ring_pick,
    servable,
)
from resolverd.config import Algorithm, BalancePolicy, Location
from resolverd.model import Health, Instance

SVC = "svc"
NO_CLIENT = ClientContext()


def inst(iid: str, *, health: Health = Health.HEALTHY, **metadata: str) -> Instance:
    return with_md(iid, metadata, health=health)


def with_md(iid: str, metadata: dict[str, str], *, health: Health = Health.HEALTHY) -> Instance:
    return Instance(
        id=iid,
        name=SVC,
        address="10.0.0.1",
        port=80,
        metadata=MappingProxyType(dict(metadata)),
        health=health,
    )


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def policy(algorithm: Algorithm = Algorithm.ROUND_ROBIN, **kwargs: object) -> BalancePolicy:
    return BalancePolicy(algorithm=algorithm, **kwargs)  # type: ignore[arg-type]


def balancer(clock: FakeClock | None = None) -> Balancer:
    return Balancer(tracker=ConnectionTracker(), clock=clock or FakeClock())


def picks(
    b: Balancer,
    instances: list[Instance],
    pol: BalancePolicy,
    n: int,
    ctx: ClientContext = NO_CLIENT,
) -> list[str]:
    plan = b.plan(SVC, instances, pol, location=ctx.location)
    out = []
    for _ in range(n):
        idx = b.pick(SVC, plan, pol, ctx)
        assert idx is not None
        out.append(plan.instances[idx].id)
    return out


def max_run(seq: list[str]) -> int:
    return max(len(list(group)) for _, group in itertools.groupby(seq))


# --------------------------------------------------------------------------- servable


@pytest.mark.parametrize(
    ("health_check", "expected"),
    [(True, ["a", "c"]), (False, ["a", "b", "c", "d"])],
)
def test_servable(health_check: bool, expected: list[str]) -> None:
    instances = [
        inst("a"),
        inst("b", health=Health.UNHEALTHY),
        inst("c"),
        inst("d", health=Health.CRITICAL),
    ]
    got = servable(instances, policy(health_check_enabled=health_check))
    assert [i.id for i in got] == expected


def test_plan_skips_unhealthy_instances() -> None:
    b = balancer()
    instances = [inst("a"), inst("b", health=Health.CRITICAL), inst("c")]
    assert set(picks(b, instances, policy(), 6)) == {"a", "c"}


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({}, 1.0),
        ({"weight": "10"}, 10.0),
        ({"weight": "5"}, 5.0),
        ({"weight": "2.5"}, 2.5),
        ({"weight": "10", "currentLoad": "50"}, 5.0),
        ({"weight": "10", "currentLoad": "50", "capacity": "200"}, 7.5),
        ({"weight": "10", "currentLoad": "100"}, 1.0),  # fully loaded: floor of 1
        ({"weight": "10", "currentLoad": "300"}, 1.0),  # overloaded
        ({"weight": "10", "currentLoad": "50", "capacity": "0"}, 10.0),
        ({"weight": "10", "currentLoad": "50", "capacity": "-5"}, 10.0),
        ({"weight": "10", "currentLoad": "-50"}, 10.0),  # negative load does not inflate
        ({"weight": "-10", "currentLoad": "300"}, 1.0),  # nor flip a negative weight
        ({"weight": "0"}, 1.0),
        ({"weight": "abc"}, 1.0),
        ({"weight": "nan"}, 1.0),
        ({"weight": "10", "capacity": "lots", "currentLoad": "50"}, 5.0),
        ({"weight": "10", "currentLoad": "?"}, 10.0),
    ],
)
def test_effective_weight(metadata: dict[str, str], expected: float) -> None:
    assert effective_weight(with_md("x", metadata)) == pytest.approx(expected)


NEW_YORK = Location(40.7128, -74.0060)
LONDON = Location(51.5074, -0.1278)


def test_haversine_km() -> None:
    assert haversine_km(NEW_YORK, NEW_YORK) == 0.0
    assert haversine_km(NEW_YORK, LONDON) == pytest.approx(5570, rel=0.01)
    assert haversine_km(LONDON, NEW_YORK) == pytest.approx(haversine_km(NEW_YORK, LONDON))
    # Antipodes: half the circumference, no domain error from rounding.
    assert haversine_km(Location(0, 0), Location(0, 180)) == pytest.approx(math.pi * 6371)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({}, None),
        ({"latitude": "51.5"}, None),
        ({"longitude": "-0.12"}, None),
        ({"latitude": "0", "longitude": "0"}, Location(0.0, 0.0)),  # seed treated this as none
        ({"latitude": "51.5", "longitude": "-0.12"}, Location(51.5, -0.12)),
        ({"latitude": "north", "longitude": "-0.12"}, None),
        ({"latitude": "91", "longitude": "0"}, None),
        ({"latitude": "0", "longitude": "181"}, None),
        ({"latitude": "inf", "longitude": "0"}, None),
    ],
)
def test_instance_location(metadata: dict[str, str], expected: Location | None) -> None:
    assert instance_location(with_md("x", metadata)) == expected


# --------------------------------------------------------------------------- plan


def test_plan_basics() -> None:
    plan = build_plan([inst("b"), inst("a"), inst("c")], policy())
    assert [i.id for i in plan.instances] == ["a", "b", "c"]
    assert plan.index_of("c") == 2
    assert plan.index_of("zz") is None
    assert not plan.client_dependent
    assert [i.id for i in plan.order(1)] == ["b", "c", "a"]
    with pytest.raises(IndexError):
        plan.order(3)
    assert build_plan([inst("a")], policy(sticky_session=True)).client_dependent
    assert build_plan([inst("a")], policy(Algorithm.IP_HASH)).client_dependent


def test_non_rotating_order_keeps_base_order_after_first() -> None:
    plan = Plan(tuple(inst(i) for i in "abcd"), (0, 1, 2, 3), rotate=False, ring=None, sticky=False)
    assert [i.id for i in plan.order(2)] == ["c", "a", "b", "d"]
    assert [i.id for i in plan.order(0)] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_empty_plan(algorithm: Algorithm) -> None:
    plan = build_plan([], policy(algorithm), location=NEW_YORK)
    assert plan.instances == ()
    assert plan.schedule == ()
    assert plan.order(0) == ()
    b = balancer()
    assert b.pick(SVC, plan, policy(algorithm), ClientContext(address="10.1.1.1")) is None
    unhealthy = [inst("a", health=Health.UNHEALTHY)]
    assert b.order(SVC, unhealthy, policy(algorithm), NO_CLIENT) == ()


# --------------------------------------------------------------------------- round robin


@pytest.mark.parametrize("ids", list(itertools.permutations("abc")))
def test_round_robin_exact_cycle(ids: tuple[str, ...]) -> None:
    b = balancer()
    instances = [inst(i) for i in ids]
    assert picks(b, instances, policy(), 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_order_rotates() -> None:
    b = balancer()
    instances = [inst("c"), inst("a"), inst("b")]
    orders = [[i.id for i in b.order(SVC, instances, policy(), NO_CLIENT)] for _ in range(4)]
    assert orders == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_counters_are_per_service_and_forgettable() -> None:
    b = balancer()
    instances = [inst("a"), inst("b"), inst("c")]
    plan = b.plan(SVC, instances, policy())
    assert [b.pick(SVC, plan, policy(), NO_CLIENT) for _ in range(2)] == [0, 1]
    assert b.pick("other", plan, policy(), NO_CLIENT) == 0
    b.forget_service(SVC)
    assert b.pick(SVC, plan, policy(), NO_CLIENT) == 0


# --------------------------------------------------------------------------- weighted


def test_weighted_seed_example_schedule() -> None:
    plan = build_plan(
        [inst("small", weight="5"), inst("big", weight="10")], policy(Algorithm.WEIGHTED)
    )
    assert [i.id for i in plan.instances] == ["big", "small"]
    assert not plan.rotate
    assert len(plan.schedule) == 15
    assert Counter(plan.schedule) == {0: 10, 1: 5}


@pytest.mark.parametrize(
    "weights",
    [
        {"big": "10", "small": "5"},
        {"a": "3", "b": "2", "c": "1"},
        {"a": "2.5", "b": "1", "c": "3.3"},  # non-integral: 1000-long cycle
        {"a": "3000", "b": "2000"},  # sum beyond 4096: 1000-long cycle
    ],
)
def test_weighted_proportions(weights: dict[str, str]) -> None:
    b = balancer()
    instances = [inst(i, weight=w) for i, w in weights.items()]
    n = 10_000
    counts = Counter(picks(b, instances, policy(Algorithm.WEIGHTED), n))
    total = sum(float(w) for w in weights.values())
    for iid, w in weights.items():
        assert counts[iid] / n == pytest.approx(float(w) / total, abs=0.01)


@pytest.mark.parametrize(
    ("weights", "cycle"),
    [
        ([2.5, 1.0, 3.3], 1000),
        ([1.5, 1.5], 1000),
        ([3000.0, 2000.0], 1000),
        ([7.0, 3.0, 1.0], 11),
        ([1.0, 1.0, 1.0], 3),
    ],
)
def test_weighted_cycle_within_one_pick_of_exact(weights: list[float], cycle: int) -> None:
    instances = [inst(f"i{n}", weight=str(w)) for n, w in enumerate(weights)]
    plan = build_plan(instances, policy(Algorithm.WEIGHTED))
    assert len(plan.schedule) == cycle
    counts = Counter(plan.instances[i].id for i in plan.schedule)
    total = sum(weights)
    for n, w in enumerate(weights):
        assert abs(counts[f"i{n}"] - cycle * w / total) < 1


def test_weighted_uses_effective_weight() -> None:
    # 10 * (1 - 50/100) = 5 vs plain 5: equal shares.
    instances = [inst("a", weight="10", currentLoad="50"), inst("b", weight="5")]
    plan = build_plan(instances, policy(Algorithm.WEIGHTED))
    assert Counter(plan.schedule) == {0: 5, 1: 5}


@pytest.mark.parametrize(("heavy", "light"), [("2", "1"), ("3", "1"), ("5", "2")])
def test_weighted_is_smooth(heavy: str, light: str) -> None:
    b = balancer()
    instances = [inst("h", weight=heavy), inst("l", weight=light)]
    seq = picks(b, instances, policy(Algorithm.WEIGHTED), 300)
    assert max_run(seq) <= math.ceil(float(heavy) / float(light))
    # The light instance is never picked twice in a row.
    assert all(not (x == y == "l") for x, y in itertools.pairwise(seq))


# --------------------------------------------------------------------------- least connections


def test_least_connections_picks_least() -> None:
    tracker = ConnectionTracker()
    b = Balancer(tracker=tracker, clock=FakeClock())
    tracker.opened("a", 3)
    tracker.opened("b", 1)
    tracker.opened("c", 2)
    instances = [inst("a"), inst("b"), inst("c")]
    pol = policy(Algorithm.LEAST_CONNECTIONS)
    assert picks(b, instances, pol, 3) == ["b", "b", "b"]
    order = b.order(SVC, instances, pol, NO_CLIENT)
    assert [i.id for i in order] == ["b", "c", "a"]


def test_least_connections_ties_rotate() -> None:
    tracker = ConnectionTracker()
    b = Balancer(tracker=tracker, clock=FakeClock())
    tracker.opened("c", 5)
    instances = [inst("c"), inst("b"), inst("a")]
    assert picks(b, instances, policy(Algorithm.LEAST_CONNECTIONS), 4) == ["a", "b", "a", "b"]


def test_least_connections_follows_tracker() -> None:
    tracker = ConnectionTracker()
    b = Balancer(tracker=tracker, clock=FakeClock())
    instances = [inst("a"), inst("b")]
    pol = policy(Algorithm.LEAST_CONNECTIONS)
    tracker.opened("a")
    assert picks(b, instances, pol, 2) == ["b", "b"]
    tracker.opened("b", 2)
    assert picks(b, instances, pol, 2) == ["a", "a"]
    tracker.closed("b", 2)
    assert picks(b, instances, pol, 2) == ["b", "b"]


def test_connection_tracker_counts() -> None:
    tracker = ConnectionTracker()
    tracker.closed("a")  # never below zero
    assert tracker.count("a") == 0
    tracker.opened("a", 2)
    tracker.closed("a", 5)
    assert tracker.count("a") == 0
    assert "a" not in tracker.counts()  # entries at zero are removed
    tracker.opened("b", 3)
    tracker.closed("b")
    view = tracker.counts()
    assert dict(view) == {"b": 2}
    with pytest.raises(TypeError):
        view["b"] = 9  # type: ignore[index]
    tracker.opened("c")
    assert dict(view) == {"b": 2, "c": 1}  # live view
    tracker.retain({"c"})
    assert dict(tracker.counts()) == {"c": 1}
    with pytest.raises(ValueError):
        tracker.opened("c", -1)


def test_connection_tracker_subscribe() -> None:
    tracker = ConnectionTracker()
    seen: list[str] = []
    unsubscribe = tracker.subscribe(seen.append)

    def broken(_: str) -> None:
        raise RuntimeError("boom")

    tracker.subscribe(broken)  # a failing subscriber does not break the tracker
    tracker.opened("a")
    tracker.opened("b", 2)
    tracker.closed("b")
    tracker.closed("zz")  # no change: no callback
    tracker.retain({"b"})
    assert seen == ["a", "b", "b", "a"]
    unsubscribe()
    unsubscribe()  # idempotent
    tracker.opened("a")
    assert seen == ["a", "b", "b", "a"]


# --------------------------------------------------------------------------- ip hash


def addresses(n: int) -> list[str]:
    return [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(n)]


def test_ip_hash_same_address_same_instance() -> None:
    b = balancer()
    instances = [inst(i) for i in "abcd"]
    pol = policy(Algorithm.IP_HASH)
    for address in addresses(20):
        got = set(picks(b, instances, pol, 25, ClientContext(address=address)))
        assert len(got) == 1


def test_ip_hash_spreads_clients() -> None:
    b = balancer()
    instances = [inst(f"node-{i}") for i in range(4)]
    pol = policy(Algorithm.IP_HASH)
    plan = b.plan(SVC, instances, pol)
    counts = Counter(
        plan.instances[b.pick(SVC, plan, pol, ClientContext(address=a)) or 0].id
        for a in addresses(1000)
    )
    assert len(counts) == 4
    assert min(counts.values()) >= 150


def test_ip_hash_is_consistent() -> None:
    instances = [inst(f"node-{i}") for i in range(4)]
    pol = policy(Algorithm.IP_HASH)
    before_plan = build_plan(instances, pol)
    after_plan = build_plan(instances[:2] + instances[3:], pol)
    removed = "node-2"
    moved = 0
    for address in addresses(1000):
        before = before_plan.instances[ring_pick(before_plan, address)].id
        after = after_plan.instances[ring_pick(after_plan, address)].id
        assert after != removed
        if before != removed:
            assert after == before
        else:
            moved += 1
    assert moved > 0


def test_ip_hash_without_address_round_robins() -> None:
    b = balancer()
    instances = [inst(i) for i in "cab"]
    got = picks(b, instances, policy(Algorithm.IP_HASH), 6)
    assert got == ["a", "b", "c", "a", "b", "c"]
    plan = build_plan(instances, policy(Algorithm.IP_HASH))
    assert plan.rotate
    assert plan.ring is not None
    assert len(plan.ring[0]) == len(plan.ring[1]) == 3 * 64
    assert list(plan.ring[0]) == sorted(plan.ring[0])


def test_ring_pick_requires_ring() -> None:
    with pytest.raises(ValueError):
        ring_pick(build_plan([inst("a")], policy()), "10.0.0.1")


# --------------------------------------------------------------------------- geo location

VIRGINIA = {"latitude": "38.9", "longitude": "-77.4"}
LONDON_MD = {"latitude": "51.5", "longitude": "-0.13"}
TOKYO = {"latitude": "35.68", "longitude": "139.69"}


def geo_instances() -> list[Instance]:
    # ids sort opposite to distance from New York
    return [
        with_md("a-tokyo", TOKYO),
        with_md("c-virginia", VIRGINIA),
        with_md("b-london", LONDON_MD),
    ]


def test_geo_nearest_first() -> None:
    b = balancer()
    pol = policy(Algorithm.GEO_LOCATION)
    for _ in range(3):
        order = b.order(SVC, geo_instances(), pol, ClientContext(location=NEW_YORK))
        assert [i.id for i in order] == ["c-virginia", "b-london", "a-tokyo"]
    tokyo_client = ClientContext(location=Location(35.0, 135.0))
    assert b.order(SVC, geo_instances(), pol, tokyo_client)[0].id == "a-tokyo"


def test_geo_instances_without_location_go_last() -> None:
    b = balancer()
    instances = [inst("a-nowhere"), *geo_instances(), inst("b-bad", latitude="x", longitude="1")]
    order = b.order(SVC, instances, policy(Algorithm.GEO_LOCATION), ClientContext(location=LONDON))
    assert [i.id for i in order] == ["b-london", "c-virginia", "a-tokyo", "a-nowhere", "b-bad"]


def test_geo_ties_rotate() -> None:
    b = balancer()
    instances = [with_md("b", LONDON_MD), with_md("a", LONDON_MD), with_md("c", TOKYO)]
    ctx = ClientContext(location=NEW_YORK)
    assert picks(b, instances, policy(Algorithm.GEO_LOCATION), 4, ctx) == ["a", "b", "a", "b"]


@pytest.mark.parametrize(
    ("fallback", "expected"),
    [
        (Algorithm.ROUND_ROBIN, ["a-tokyo", "b-london", "c-virginia", "a-tokyo"]),
        (Algorithm.GEO_LOCATION, ["a-tokyo", "b-london", "c-virginia", "a-tokyo"]),
        (Algorithm.LEAST_CONNECTIONS, ["a-tokyo", "c-virginia", "a-tokyo", "c-virginia"]),
    ],
)
def test_geo_without_client_location_falls_back(fallback: Algorithm, expected: list[str]) -> None:
    tracker = ConnectionTracker()
    tracker.opened("b-london")
    b = Balancer(tracker=tracker, clock=FakeClock())
    pol = policy(Algorithm.GEO_LOCATION, fallback=fallback)
    assert picks(b, geo_instances(), pol, 4) == expected


def test_geo_without_instance_locations_falls_back() -> None:
    b = balancer()
    instances = [inst("b"), inst("a"), inst("c")]
    ctx = ClientContext(location=NEW_YORK)
    assert picks(b, instances, policy(Algorithm.GEO_LOCATION), 4, ctx) == ["a", "b", "c", "a"]


# --------------------------------------------------------------------------- sticky sessions


def test_sticky_session_keeps_instance() -> None:
    b = balancer()
    instances = [inst(i) for i in "abc"]
    pol = policy(sticky_session=True)
    plan = b.plan(SVC, instances, pol)
    alice = ClientContext(session_key="alice", address="10.0.0.9")
    bob = ClientContext(session_key="bob", address="10.0.0.9")
    first = b.pick(SVC, plan, pol, alice)
    second = b.pick(SVC, plan, pol, bob)
    assert first != second
    assert all(b.pick(SVC, plan, pol, alice) == first for _ in range(10))
    assert all(b.pick(SVC, plan, pol, bob) == second for _ in range(10))
    # Without any key sticky falls back to the schedule.
    assert len({b.pick(SVC, plan, pol, NO_CLIENT) for _ in range(3)}) == 3


def test_sticky_uses_address_when_no_session_key() -> None:
    b = balancer()
    pol = policy(sticky_session=True)
    got = picks(b, [inst(i) for i in "abc"], pol, 5, ClientContext(address="192.0.2.7"))
    assert got == ["a"] * 5


def test_sticky_expires_after_ttl() -> None:
    clock = FakeClock()
    b = balancer(clock)
    pol = policy(sticky_session=True, sticky_ttl=60.0)
    plan = b.plan(SVC, [inst(i) for i in "abc"], pol)
    ctx = ClientContext(session_key="k")
    assert b.pick(SVC, plan, pol, ctx) == 0
    clock.now += 59  # sliding: a hit refreshes the expiry
    assert b.pick(SVC, plan, pol, ctx) == 0
    clock.now += 59
    assert b.pick(SVC, plan, pol, ctx) == 0
    clock.now += 60  # expired: re-picked from the schedule
    assert b.pick(SVC, plan, pol, ctx) == 1


def test_sticky_sessions_ttl_and_sliding() -> None:
    clock = FakeClock()
    s = StickySessions(max_entries=10, ttl=10.0, clock=clock)
    s.put("k", "a")
    s.put("j", "b")
    clock.now += 9
    assert s.get("k") == "a"
    clock.now += 9
    assert s.get("k") == "a"  # refreshed at +9
    assert s.get("j") is None  # expired at +10
    assert len(s) == 1
    clock.now += 10
    assert len(s) == 0
    assert s.get("k") is None


def test_sticky_sessions_lru_bound() -> None:
    clock = FakeClock()
    s = StickySessions(max_entries=2, ttl=100.0, clock=clock)
    s.put("k1", "a")
    s.put("k2", "b")
    assert s.get("k1") == "a"  # k2 is now least recently used
    s.put("k3", "c")
    assert len(s) == 2
    assert s.get("k2") is None
    assert s.get("k1") == "a"
    assert s.get("k3") == "c"
    for i in range(100):
        s.put(f"x{i}", "a")
    assert len(s) == 2


def test_sticky_sessions_retain() -> None:
    s = StickySessions(max_entries=10, ttl=100.0, clock=FakeClock())
    s.put("k1", "a")
    s.put("k2", "b")
    s.put("k3", "a")
    assert s.retain(["b", "c"]) == 2
    assert len(s) == 1
    assert s.get("k2") == "b"
    assert s.retain({"b"}) == 0


def test_sticky_instance_not_in_plan_is_repicked() -> None:
    b = balancer()
    pol = policy(sticky_session=True)
    ctx = ClientContext(session_key="k")
    healthy = [inst("a"), inst("b"), inst("c")]
    assert b.order(SVC, healthy, pol, ctx)[0].id == "a"
    sick = [inst("a", health=Health.UNHEALTHY), inst("b"), inst("c")]
    repicked = b.order(SVC, sick, pol, ctx)[0].id
    assert repicked != "a"
    # The new pick is recorded and sticks, even after "a" recovers.
    assert all(b.order(SVC, healthy, pol, ctx)[0].id == repicked for _ in range(5))


def test_sticky_with_ip_hash_keeps_first_pick() -> None:
    b = balancer()
    pol = policy(Algorithm.IP_HASH, sticky_session=True)
    instances = [inst(f"node-{i}") for i in range(4)]
    ctx = ClientContext(session_key="s", address="10.9.8.7")
    first = b.order(SVC, instances, pol, ctx)[0].id
    # Even after the ring changes (instance added), the session stays put.
    more = [*instances, *(inst(f"node-{i}") for i in range(4, 40))]
    assert all(b.order(SVC, more, pol, ctx)[0].id == first for _ in range(5))


def test_balancer_retain_forgets_departed() -> None:
    tracker = ConnectionTracker()
    b = Balancer(tracker=tracker, clock=FakeClock())
    pol = policy(sticky_session=True)
    ctx = ClientContext(session_key="k")
    instances = [inst("a"), inst("b")]
    assert b.order(SVC, instances, pol, ctx)[0].id == "a"
    tracker.opened("a")
    b.retain({"b"})
    assert tracker.count("a") == 1  # counts belong to the Report streams that opened them
    # Session dropped: the next pick follows the schedule again (counter at 1 -> "b").
    assert b.order(SVC, instances, pol, ctx)[0].id == "b"
    assert b.order(SVC, instances, pol, ctx)[0].id == "b"


def test_sticky_policy_limits_apply() -> None:
    clock = FakeClock()
    b = balancer(clock)
    instances = [inst(i) for i in "abc"]
    pol = policy(sticky_session=True, sticky_max_entries=1)
    plan = b.plan(SVC, instances, pol)
    assert b.pick(SVC, plan, pol, ClientContext(session_key="k1")) == 0
    assert b.pick(SVC, plan, pol, ClientContext(session_key="k2")) == 1
    # k1 was evicted by k2 (bound of one): re-picked from the schedule.
    assert b.pick(SVC, plan, pol, ClientContext(session_key="k1")) == 2
