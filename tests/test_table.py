"""The service table: snapshots swapped whole, revisions, change events, status."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from resolverd.model import Health, Instance
from resolverd.table import Change, ServiceTable, View, health_status, merge


def inst(i: str, name: str = "web", **kw: object) -> Instance:
    port = 1000 + sum(map(ord, i))  # a distinct endpoint per id
    return Instance(id=i, name=name, address="127.0.0.1", port=port, **kw)  # type: ignore[arg-type]


def test_replace_bumps_revision_and_reports_events() -> None:
    table = ServiceTable()
    seen: list[tuple[View, Change]] = []
    table.subscribe(lambda view, change: seen.append((view, change)))
    table.replace("static", [inst("a"), inst("b")])
    assert table.view.revision == 1
    assert {i.id for i in seen[-1][1].registered} == {"a", "b"}

    table.replace("static", [inst("a", health=Health.CRITICAL), inst("c", name="api")])
    change = seen[-1][1]
    assert table.view.revision == 2
    assert [i.id for i in change.registered] == ["c"]
    assert [i.id for i in change.deregistered] == ["b"]
    assert [i.id for i in change.updated] == ["a"]
    assert change.services == {"web", "api"}
    assert seen[-1][0] is table.view


def test_identical_snapshot_is_not_a_change() -> None:
    table = ServiceTable()
    table.replace("static", [inst("a"), inst("b")])
    assert table.replace("static", [inst("b"), inst("a")]) is None
    assert table.view.revision == 1


def test_views_are_immutable_snapshots() -> None:
    table = ServiceTable()
    table.replace("static", [inst("a")])
    old = table.view
    table.replace("static", [inst("a"), inst("b")])
    assert [i.id for i in old.instances("web")] == ["a"]
    assert [i.id for i in table.view.instances("web")] == ["a", "b"]


def test_providers_are_merged_and_removed() -> None:
    table = ServiceTable()
    table.replace("one", [inst("a")])
    table.replace("two", [inst("b"), inst("x", name="api")])
    assert [i.provider for i in table.view.instances("web")] == ["one", "two"]
    assert table.providers == ("one", "two")
    table.remove_provider("two")
    assert [i.id for i in table.view.instances("web")] == ["a"]
    assert "api" not in table.view.services


def test_health_status_is_the_seeds_summary() -> None:
    table = ServiceTable()
    table.replace(
        "static",
        [
            inst("a"),
            inst("b", health=Health.UNHEALTHY),
            inst("c", health=Health.CRITICAL),
            inst("d", health=Health.CRITICAL),
            inst("e", name="api"),
        ],
    )
    assert health_status(table.view) == {
        "api": {"total": 1, "healthy": 1, "unhealthy": 0, "critical": 0},
        "web": {"total": 4, "healthy": 1, "unhealthy": 1, "critical": 2},
    }


def test_failing_subscriber_does_not_stop_others() -> None:
    table = ServiceTable()
    calls: list[int] = []

    def bad(view: View, change: Change) -> None:
        raise RuntimeError("boom")

    table.subscribe(bad)
    unsubscribe = table.subscribe(lambda view, change: calls.append(view.revision))
    table.replace("static", [inst("a")])
    unsubscribe()
    table.replace("static", [inst("b")])
    assert calls == [1]


def test_same_endpoint_from_two_providers_is_one_instance_first_provider_wins() -> None:
    table = ServiceTable(order=("consul", "static"))
    shared = dict(name="web", address="127.0.0.5", port=80)
    table.replace("static", [Instance(id="s-1", **shared)])  # type: ignore[arg-type]
    table.replace("consul", [Instance(id="c-1", **shared)])  # type: ignore[arg-type]
    assert [(i.id, i.provider) for i in table.view.instances("web")] == [("c-1", "consul")]
    table.remove_provider("consul")
    assert [i.id for i in table.view.instances("web")] == ["s-1"]


def test_heartbeat_alone_is_not_a_change() -> None:
    table = ServiceTable()
    table.replace("static", [inst("a", last_heartbeat=1.0)])
    assert table.replace("static", [inst("a", last_heartbeat=2.0)]) is None


def test_provider_states_stale_and_recovery() -> None:
    now = [100.0]
    table = ServiceTable(order=("etcd",), clock=lambda: now[0])
    assert not table.synced and not table.states()["etcd"].synced
    table.replace("etcd", [inst("a")])
    assert table.synced
    now[0] = 130.0
    table.mark_stale("etcd", "connection refused")
    state = table.states()["etcd"]
    assert state.stale and state.stale_since == 130.0 and state.error == "connection refused"
    assert state.age(160.0) == 30.0  # known good until it went stale at 130
    assert [i.id for i in table.view.instances("web")] == ["a"]  # still served
    table.replace("etcd", [])  # reachable and empty is not stale
    state = table.states()["etcd"]
    assert not state.stale and state.instances == 0 and state.synced
    assert table.view.instances("web") == ()


def test_restore_is_stale_until_synced() -> None:
    table = ServiceTable(order=("etcd",), clock=lambda: 500.0)
    table.restore("etcd", [inst("a")], saved_at=400.0)
    state = table.states()["etcd"]
    assert state.restored and state.stale and not state.synced and state.age(500.0) == 100.0
    assert [i.id for i in table.view.instances("web")] == ["a"]


def test_health_overlay_is_the_worse_of_provider_and_checker() -> None:
    table = ServiceTable()
    table.replace("static", [inst("a"), inst("b", health=Health.UNHEALTHY)])
    change = table.set_checked_health(
        {("static", "a"): Health.CRITICAL, ("static", "b"): Health.HEALTHY}
    )
    assert change is not None and {i.id for i in change.updated} == {"a"}
    assert [i.health for i in table.view.instances("web")] == [Health.CRITICAL, Health.UNHEALTHY]
    assert table.set_checked_health({("static", "a"): Health.CRITICAL}) is None  # no news
    table.set_checked_health({("static", "a"): None})
    assert table.view.instances("web")[0].health is Health.HEALTHY
    # The provider's own view is untouched by the overlay.
    assert {i.health for i in table.provider_instances()} == {Health.HEALTHY, Health.UNHEALTHY}


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["etcd", "consul", "static"]),
            st.lists(
                st.tuples(
                    st.sampled_from("abcdef"),  # id
                    st.sampled_from(["web", "api", "db"]),  # service
                    st.integers(1, 4),  # port: collisions across providers are likely
                    st.sampled_from(list(Health)),
                ),
                max_size=8,
            ),
        ),
        max_size=12,
    )
)
def test_incremental_view_equals_a_full_merge(steps: list[tuple[str, list[Any]]]) -> None:
    """The table rebuilds only touched services; the result must be what
    merging everything from scratch gives."""
    table = ServiceTable(order=("consul", "etcd"))
    for provider, items in steps:
        snapshot = [
            Instance(id=i, name=svc, address="127.0.0.1", port=port, health=h)
            for i, svc, port, h in items
        ]
        table.replace(provider, snapshot)
        full = merge(table.snapshots(), table.view.revision, ("consul", "etcd"))
        assert dict(table.view.services) == dict(full.services)
        assert list(table.view.services) == sorted(table.view.services)
        assert {k: v for k, v in table.view.by_id.items()} == dict(full.by_id)
