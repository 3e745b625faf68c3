"""The on-disk copy of provider snapshots: written atomically, restored at
start when young enough, marked stale until the backend answers."""

from __future__ import annotations

import json
from pathlib import Path

from resolverd import snapshot
from resolverd.model import Health, Instance
from resolverd.table import ServiceTable

PODS = (
    Instance(
        id="a",
        name="api",
        address="127.0.4.1",
        port=80,
        port_name="http",
        tags=("x",),
        metadata={"zone": "z1"},
        health=Health.UNHEALTHY,
        provider="k8s",
    ),
    Instance(
        id="b",
        name="api",
        address="127.0.4.2",
        port=53,
        port_name="dns",
        protocol="udp",
        provider="k8s",
    ),
)


def test_round_trip_keeps_every_field() -> None:
    saved = snapshot.decode(snapshot.encode({"k8s": (123.5, PODS)}))
    assert saved == {"k8s": (123.5, PODS)}
    assert saved["k8s"][1][0].metadata == {"zone": "z1"}


def test_writer_then_restore(tmp_path: Path) -> None:
    path = str(tmp_path / "snap.json")
    table = ServiceTable(order=("k8s", "static"))
    table.replace("k8s", PODS)
    table.replace("static", [Instance(id="s", name="web", address="127.0.0.9", port=1)])
    snapshot.SnapshotWriter(table, path, providers=["k8s"]).write()
    assert set(json.loads(Path(path).read_text())["providers"]) == {"k8s"}  # static is config

    fresh = ServiceTable(order=("k8s",))
    assert snapshot.restore(fresh, path, providers=["k8s"], max_age=60) == ["k8s"]
    assert fresh.view.instances("api") == PODS
    state = fresh.states()["k8s"]
    assert state.restored and state.stale and not state.synced and fresh.ready

    fresh.replace("k8s", PODS[:1])  # the backend answers: fresh again
    state = fresh.states()["k8s"]
    assert state.synced and not state.stale


def test_too_old_or_broken_copies_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "snap.json"
    path.write_bytes(snapshot.encode({"k8s": (1.0, PODS)}))  # 1970
    table = ServiceTable(order=("k8s",))
    assert snapshot.restore(table, str(path), providers=["k8s"], max_age=3600) == []
    assert table.view.instances("api") == ()
    for junk in (b"", b"{", b'{"version": 99}', b'{"version": 1, "providers": {"k8s": 3}}'):
        path.write_bytes(junk)
        assert snapshot.restore(table, str(path), providers=["k8s"], max_age=3600) == []
    assert snapshot.restore(table, str(tmp_path / "missing"), providers=["k8s"], max_age=3600) == []


def test_stale_provider_keeps_its_loss_time(tmp_path: Path) -> None:
    now = [1000.0]
    table = ServiceTable(order=("k8s",), clock=lambda: now[0])
    table.replace("k8s", PODS)
    now[0] = 1010.0
    table.mark_stale("k8s", "connection refused")
    path = str(tmp_path / "snap.json")
    snapshot.SnapshotWriter(table, path, providers=["k8s"]).write()
    assert json.loads(Path(path).read_text())["providers"]["k8s"]["saved_at"] == 1010.0
