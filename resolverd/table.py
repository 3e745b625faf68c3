"""The service table: one immutable snapshot per provider, merged into one view.

Providers hand over complete snapshots; the table swaps a provider's snapshot
whole, rebuilds the merged view, bumps the revision and tells subscribers what
changed (the seed's serviceRegistered / serviceDeregistered / servicesUpdated).
Readers hold a `View` and never see half an update.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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


_SEVERITY = {Health.HEALTHY: 0, Health.UNHEALTHY: 1, Health.CRITICAL: 2}


def worst(a: Health, b: Health) -> Health:
    """Combined health: an instance is up only when every source says so."""
    return a if _SEVERITY[a] >= _SEVERITY[b] else b


def merge(
    snapshots: Mapping[str, tuple[Instance, ...]],
    revision: int,
    order: Sequence[str] = (),
    checked: Mapping[tuple[str, str], Health] | None = None,
) -> View:
    """Union the providers' snapshots into a view, services sorted by name and
    instances by (id, provider) so the view does not depend on arrival order.

    Providers are taken in `order` (the config's), then by name. The same
    service at the same address, port and port name from two providers is one
    instance: the first provider's. An id held by two providers belongs to the
    first one in `by_id`.

    `checked` is the active health checker's overlay, by (provider, id): the
    view's health is the worse of the provider's and the checker's.
    """
    grouped: dict[str, list[Instance]] = {}
    by_id: dict[str, Instance] = {}
    seen: set[tuple[str, str, int, str]] = set()
    rank = {name: i for i, name in enumerate(order)}
    for provider in sorted(snapshots, key=lambda p: (rank.get(p, len(rank)), p)):
        for inst in snapshots[provider]:
            endpoint = (inst.name, inst.address, inst.port, inst.port_name)
            if endpoint in seen:
                continue
            seen.add(endpoint)
            if checked:
                probe = checked.get((inst.provider, inst.id))
                if probe is not None and worst(inst.health, probe) is not inst.health:
                    inst = replace(inst, health=probe)
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


@dataclass(frozen=True, slots=True)
class ProviderState:
    """How fresh a provider's snapshot is. A provider that answered "empty" is
    synced with 0 instances; one that cannot reach its backend is stale and
    keeps its last snapshot."""

    name: str
    synced: bool = False  # has published from its backend since start
    last_sync: float | None = None  # wall time of the last successful sync
    stale_since: float | None = None  # wall time the backend became unreachable
    error: str | None = None
    instances: int = 0
    restored: bool = False  # the snapshot came from the on-disk copy

    @property
    def stale(self) -> bool:
        return self.stale_since is not None

    def age(self, now: float) -> float | None:
        """Seconds since the snapshot was last known good: 0 while the backend is
        reachable, the time since it was lost while stale, None if never known."""
        if self.stale_since is not None:
            return max(0.0, now - self.stale_since)
        return None if self.last_sync is None else 0.0


class ServiceTable:
    def __init__(
        self, *, order: Sequence[str] = (), clock: Callable[[], float] = time.time
    ) -> None:
        self._snapshots: dict[str, tuple[Instance, ...]] = {}
        self._view = View(revision=0, services=MappingProxyType({}))
        self._subscribers: list[Subscriber] = []
        self._order = tuple(order)
        self._clock = clock
        self._states: dict[str, ProviderState] = {name: ProviderState(name) for name in order}
        self._checked: dict[tuple[str, str], Health] = {}

    def provider_instances(self) -> tuple[Instance, ...]:
        """Every instance as its provider reported it (before the health overlay)."""
        return tuple(i for snapshot in self._snapshots.values() for i in snapshot)

    def set_checked_health(self, results: Mapping[tuple[str, str], Health | None]) -> Change | None:
        """Apply active health check results, by (provider, instance id); None
        forgets a result. One table change for the whole batch."""
        checked = dict(self._checked)
        for key, health in results.items():
            if health is None:
                checked.pop(key, None)
            else:
                checked[key] = health
        if checked == self._checked:
            return None
        self._checked = checked
        return self._commit(dict(self._snapshots))

    def states(self) -> dict[str, ProviderState]:
        return dict(self._states)

    def snapshots(self) -> dict[str, tuple[Instance, ...]]:
        return dict(self._snapshots)

    @property
    def synced(self) -> bool:
        """Every known provider has published from its backend at least once."""
        return all(state.synced for state in self._states.values())

    @property
    def ready(self) -> bool:
        """Every known provider has something to serve: synced, or restored from disk."""
        return all(state.synced or state.restored for state in self._states.values())

    def mark_stale(self, provider: str, error: str) -> None:
        """The provider lost its backend: keep serving its last snapshot."""
        state = self._states.get(provider, ProviderState(provider))
        if state.stale_since is None:
            state = replace(state, stale_since=self._clock(), error=error)
            age = state.age(self._clock())
            log.warning(
                "provider.stale",
                provider=provider,
                error=error,
                instances=state.instances,
                age_seconds=None if age is None else round(age, 1),
            )
        else:
            state = replace(state, error=error)
        self._states[provider] = state

    def restore(self, provider: str, instances: Iterable[Instance], saved_at: float) -> None:
        """Load a snapshot saved on disk; stale until the provider syncs."""
        self._install(provider, instances)
        state = self._states.get(provider, ProviderState(provider))
        self._states[provider] = replace(
            state,
            last_sync=saved_at,
            stale_since=saved_at,
            restored=True,
            error="restored from the on-disk snapshot",
            instances=len(self._snapshots.get(provider, ())),
        )

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
        """Swap `provider`'s snapshot whole; the provider is synced and fresh.
        Returns the change, or None if the snapshot equals the one held."""
        change = self._install(provider, instances)
        state = self._states.get(provider, ProviderState(provider))
        if state.stale_since is not None:
            log.info(
                "provider.recovered", provider=provider, instances=len(self._snapshots[provider])
            )
        self._states[provider] = ProviderState(
            provider,
            synced=True,
            last_sync=self._clock(),
            instances=len(self._snapshots[provider]),
        )
        return change

    def _install(self, provider: str, instances: Iterable[Instance]) -> Change | None:
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
        self._states.pop(provider, None)
        return self._commit(snapshots)

    def _commit(self, snapshots: dict[str, tuple[Instance, ...]]) -> Change | None:
        new = merge(snapshots, self._view.revision + 1, self._order, self._checked)
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
