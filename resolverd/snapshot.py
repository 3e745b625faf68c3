"""The optional on-disk copy of the providers' snapshots.

When a backend is down at start, the daemon would answer nothing for its
services until it comes back. With `snapshot.file` set, the table's provider
snapshots are written (atomically, at most once a second, after changes) and
read back at start when younger than `snapshot.max_age`: those instances are
served, marked stale and restored, until the provider reads its backend.
Static services and runtime registrations have their own sources and are not
copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Any

import structlog

from resolverd.fileutil import atomic_write
from resolverd.model import Health, Instance
from resolverd.table import Change, ServiceTable, View

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
MIN_INTERVAL = 1.0
REFRESH = 60.0  # rewrite this often even without changes: the copy's time is "known good"


Saved = dict[str, tuple[float, tuple[Instance, ...]]]  # provider -> (known good at, instances)


def encode(saved: Mapping[str, tuple[float, tuple[Instance, ...]]]) -> bytes:
    providers = {
        name: {"saved_at": at, "instances": [_instance_to_json(i) for i in instances]}
        for name, (at, instances) in saved.items()
    }
    return json.dumps({"version": FORMAT_VERSION, "providers": providers}, sort_keys=True).encode()


def decode(data: bytes) -> Saved:
    """Raises ValueError for anything that is not a snapshot this version wrote."""
    payload = json.loads(data)
    if not isinstance(payload, dict) or payload.get("version") != FORMAT_VERSION:
        raise ValueError("not a resolverd snapshot of a known version")
    saved: Saved = {}
    for name, entry in dict(payload["providers"]).items():
        instances = tuple(_instance_from_json(item, str(name)) for item in entry["instances"])
        saved[str(name)] = (float(entry["saved_at"]), instances)
    return saved


def _instance_to_json(inst: Instance) -> dict[str, Any]:
    data = {f.name: getattr(inst, f.name) for f in dataclasses.fields(inst)}
    data["tags"] = list(inst.tags)
    data["metadata"] = dict(inst.metadata)
    data["health"] = inst.health.value
    return data


def _instance_from_json(item: Any, provider: str) -> Instance:
    if not isinstance(item, dict):
        raise ValueError("instance is not an object")
    fields = {f.name for f in dataclasses.fields(Instance)}
    unknown = set(item) - fields
    if unknown:
        raise ValueError(f"unknown instance fields {sorted(unknown)}")
    data = dict(item)
    data["tags"] = tuple(str(t) for t in data.get("tags", ()))
    data["metadata"] = MappingProxyType(
        {str(k): str(v) for k, v in dict(data.get("metadata", {})).items()}
    )
    data["health"] = Health(data.get("health", "healthy"))
    data["port"] = int(data["port"])
    data["provider"] = provider
    return Instance(**data)


def restore(
    table: ServiceTable, path: str, *, providers: Collection[str], max_age: float
) -> list[str]:
    """Load the copy into the table for the named providers; returns those restored."""
    try:
        with open(path, "rb") as fh:
            saved = decode(fh.read())
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("snapshot.unreadable", file=path, error=str(exc))
        return []
    now = time.time()
    restored = []
    for name in providers:
        if name not in saved:
            continue
        saved_at, instances = saved[name]
        age = now - saved_at
        if age > max_age:
            log.info("snapshot.too_old", provider=name, age_seconds=round(age, 1))
            continue
        table.restore(name, instances, saved_at)
        restored.append(name)
        log.info(
            "snapshot.restored", provider=name, instances=len(instances), age_seconds=round(age, 1)
        )
    return restored


class SnapshotWriter:
    """Writes the persisted providers' snapshots after table changes."""

    def __init__(self, table: ServiceTable, path: str, *, providers: Collection[str]) -> None:
        self._table = table
        self._path = path
        self._providers = frozenset(providers)
        self._dirty = asyncio.Event()

    def on_change(self, view: View, change: Change) -> None:
        self._dirty.set()

    def flush(self) -> None:
        """At shutdown: write now if anything changed since the last write."""
        if self._dirty.is_set():
            self.write()

    def write(self) -> None:
        states = self._table.states()
        now = time.time()
        saved: Saved = {}
        for name, instances in self._table.snapshots().items():
            state = states.get(name)
            if name not in self._providers or state is None or state.last_sync is None:
                continue
            # Known good now, or until the backend was lost (a restored copy
            # keeps its original time).
            saved[name] = (state.stale_since or now, instances)
        if saved:
            atomic_write(self._path, encode(saved))

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), REFRESH)
            self._dirty.clear()
            try:
                await asyncio.to_thread(self.write)
            except OSError as exc:
                log.warning("snapshot.write_failed", file=self._path, error=str(exc))
            await asyncio.sleep(MIN_INTERVAL)
