"""The service table: snapshots swapped whole, revisions, change events, status."""

from __future__ import annotations

from resolverd.model import Health, Instance
from resolverd.table import Change, ServiceTable, View, health_status


def inst(i: str, name: str = "web", **kw: object) -> Instance:
    return Instance(id=i, name=name, address="127.0.0.1", port=80, **kw)  # type: ignore[arg-type]


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
