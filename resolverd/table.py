"""The service table: one immutable snapshot per provider, merged into one view.

Providers hand over complete snapshots; the table swaps a provider's snapshot
whole, rebuilds the merged view, bumps the revision and tells subscribers what
changed (the seed's serviceRegistered / serviceDeregistered / servicesUpdated).
Readers hold a `View` and never see half an update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TypedDict

import structlog

from resolverd.model import Health, Instance

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class View:
    """The merged, read-only state of every provider at one revision."""

    revision: int
    services: Mapping[str, tuple[Instance, ...]]
    by_id: Mapping[str, Instance] = field(default_factory=lambda: MappingProxyType({}))

    def instances(self, service: str) -> tuple[Instance, ...]:
        return self.services.get(service, ())


@dataclass(frozen=True, slots=True)
class Change:
    """What one table update did, in the seed's event vocabulary."""

    revision: int
    registered: tuple[Instance, ...]
    deregistered: tuple[Instance, ...]
    updated: tuple[Instance, ...]
    services: frozenset[str]  # names whose instance set changed in any way


Subscriber = Callable[[View, Change], None]


def _key(inst: Instance) -> tuple[str, str]:
    return (inst.provider, inst.id)


def merge(snapshots: Mapping[str, tuple[Instance, ...]], revision: int) -> View:
    """Union the providers' snapshots into a view, services sorted by name and
    instances by (id, provider) so the view does not depend on arrival order."""
    grouped: dict[str, list[Instance]] = {}
    by_id: dict[str, Instance] = {}
    for provider in sorted(snapshots):
        for inst in snapshots[provider]:
            grouped.setdefault(inst.name, []).append(inst)
            by_id.setdefault(inst.id, inst)
    services = {
        name: tuple(sorted(insts, key=lambda i: (i.id, i.provider)))
        for name, insts in sorted(grouped.items())
    }
    return View(
        revision=revision,
        services=MappingProxyType(services),
        by_id=MappingProxyType(by_id),
    )


def diff(old: View, new: View) -> Change:
    before = {_key(i): i for insts in old.services.values() for i in insts}
    after = {_key(i): i for insts in new.services.values() for i in insts}
    registered = tuple(i for k, i in after.items() if k not in before)
    deregistered = tuple(i for k, i in before.items() if k not in after)
    updated = tuple(i for k, i in after.items() if k in before and before[k] != i)
    services = frozenset(i.name for i in (*registered, *deregistered, *updated))
    services |= frozenset(before[_key(i)].name for i in updated)
    return Change(new.revision, registered, deregistered, updated, services)


class ServiceTable:
    def __init__(self) -> None:
        self._snapshots: dict[str, tuple[Instance, ...]] = {}
        self._view = View(revision=0, services=MappingProxyType({}))
        self._subscribers: list[Subscriber] = []

    @property
    def view(self) -> View:
        return self._view

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(sorted(self._snapshots))

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def replace(self, provider: str, instances: Iterable[Instance]) -> Change | None:
        """Swap `provider`'s snapshot whole. Returns the change, or None if
        the snapshot is identical to the one already held."""
        snapshot = tuple(
            i if i.provider == provider else _with_provider(i, provider) for i in instances
        )
        if self._snapshots.get(provider) == snapshot and provider in self._snapshots:
            return None
        snapshots = dict(self._snapshots)
        snapshots[provider] = snapshot
        return self._commit(snapshots)

    def remove_provider(self, provider: str) -> Change | None:
        if provider not in self._snapshots:
            return None
        snapshots = dict(self._snapshots)
        del snapshots[provider]
        return self._commit(snapshots)

    def _commit(self, snapshots: dict[str, tuple[Instance, ...]]) -> Change | None:
        new = merge(snapshots, self._view.revision + 1)
        change = diff(self._view, new)
        self._snapshots = snapshots
        if not change.services:
            # Same content (e.g. reordered): keep the revision, caches stay valid.
            return None
        self._view = new
        for callback in tuple(self._subscribers):
            try:
                callback(new, change)
            except Exception:
                log.exception("table.subscriber_failed", subscriber=repr(callback))
        return change


def _with_provider(inst: Instance, provider: str) -> Instance:
    return replace(inst, provider=provider)


class ServiceHealth(TypedDict):
    total: int
    healthy: int
    unhealthy: int
    critical: int


def health_status(view: View) -> dict[str, ServiceHealth]:
    """The seed's getHealthStatus: per service, total and count per state."""
    status: dict[str, ServiceHealth] = {}
    for name, insts in view.services.items():
        counts = {h: 0 for h in Health}
        for inst in insts:
            counts[inst.health] += 1
        status[name] = ServiceHealth(
            total=len(insts),
            healthy=counts[Health.HEALTHY],
            unhealthy=counts[Health.UNHEALTHY],
            critical=counts[Health.CRITICAL],
        )
    return status
