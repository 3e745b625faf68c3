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


def merge_service(
    groups: Sequence[tuple[Instance, ...]],
    checked: Mapping[tuple[str, str], Health] | None = None,
) -> tuple[Instance, ...]:
    """One service's instances from its providers' groups (in provider order):
    the same address, port and port name from two providers is one instance,
    the first provider's; the health overlay applied; sorted by (id, provider)."""
    seen: set[tuple[str, int, str]] = set()
    merged: list[Instance] = []
    for group in groups:
        for inst in group:
            endpoint = (inst.address, inst.port, inst.port_name)
            if endpoint in seen:
                continue
            seen.add(endpoint)
            if checked:
                probe = checked.get((inst.provider, inst.id))
                if probe is not None and worst(inst.health, probe) is not inst.health:
                    inst = replace(inst, health=probe)
            merged.append(inst)
    merged.sort(key=lambda i: (i.id, i.provider))
    return tuple(merged)


def group_by_service(snapshot: Iterable[Instance]) -> dict[str, tuple[Instance, ...]]:
    groups: dict[str, list[Instance]] = {}
    for inst in snapshot:
        groups.setdefault(inst.name, []).append(inst)
    return {name: tuple(insts) for name, insts in groups.items()}


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
    ranked = _ranked(snapshots, order)
    groups = {provider: group_by_service(snapshots[provider]) for provider in ranked}
    names = sorted({name for g in groups.values() for name in g})
    services: dict[str, tuple[Instance, ...]] = {}
    by_id: dict[str, Instance] = {}
    for name in names:
        merged = merge_service([groups[p].get(name, ()) for p in ranked], checked)
        services[name] = merged
        for inst in merged:
            by_id.setdefault(inst.id, inst)
    return View(
        revision=revision,
        services=MappingProxyType(services),
        by_id=MappingProxyType(by_id),
    )


def _ranked(providers: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    return sorted(providers, key=lambda p: (rank.get(p, len(rank)), p))


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
        # Per provider: its snapshot grouped by service, and each id's service,
        # so a change rebuilds only the services it touched.
        self._groups: dict[str, dict[str, tuple[Instance, ...]]] = {}
        self._service_of: dict[str, dict[str, list[str]]] = {}

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
        touched = {
            service
            for provider, instance_id in results
            for service in self._service_of.get(provider, {}).get(instance_id, ())
        }
        self._checked = checked
        return self._commit(touched)

    def set_order(self, order: Sequence[str]) -> None:
        """A reloaded config's providers: new ones start unsynced; applies to
        the next change (ties between providers resolve in this order)."""
        self._order = tuple(order)
        for name in order:
            self._states.setdefault(name, ProviderState(name))

    def clear_checked_health(self) -> Change | None:
        """Forget every active health result (the checker was replaced)."""
        return self.set_checked_health({key: None for key in self._checked})

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

    @property
    def settled(self) -> bool:
        """Every known provider has synced, been restored, or reported its
        backend unreachable: start-up is over, one way or the other."""
        return all(s.synced or s.restored or s.stale for s in self._states.values())

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
        if provider in self._snapshots and self._snapshots[provider] == snapshot:
            return None
        groups = group_by_service(snapshot)
        old = self._groups.get(provider, {})
        touched = {n for n in groups.keys() | old.keys() if groups.get(n) != old.get(n)}
        self._snapshots = {**self._snapshots, provider: snapshot}
        self._groups[provider] = groups
        service_of: dict[str, list[str]] = {}
        for inst in snapshot:
            service_of.setdefault(inst.id, []).append(inst.name)
        self._service_of[provider] = service_of
        return self._commit(touched)

    def remove_provider(self, provider: str) -> Change | None:
        if provider not in self._snapshots:
            return None
        touched = set(self._groups.pop(provider, {}))
        self._service_of.pop(provider, None)
        self._snapshots = {k: v for k, v in self._snapshots.items() if k != provider}
        self._states.pop(provider, None)
        return self._commit(touched)

    def _commit(self, touched: set[str]) -> Change | None:
        """Rebuild the touched services only, then publish a new view."""
        old = self._view
        services = dict(old.services)
        by_id: dict[str, Instance]
        ranked = _ranked(self._groups, self._order)
        registered: list[Instance] = []
        deregistered: list[Instance] = []
        updated: list[Instance] = []
        changed: set[str] = set()
        for name in touched:
            before_insts = old.services.get(name, ())
            after_insts = merge_service(
                [self._groups[p].get(name, ()) for p in ranked], self._checked
            )
            if before_insts == after_insts:
                continue
            changed.add(name)
            if after_insts:
                services[name] = after_insts
            else:
                services.pop(name, None)
            before = {_key(i): i for i in before_insts}
            after = {_key(i): i for i in after_insts}
            registered += [i for k, i in after.items() if k not in before]
            deregistered += [i for k, i in before.items() if k not in after]
            updated += [i for k, i in after.items() if k in before and before[k] != i]
        if not changed:
            # Same content (e.g. reordered): keep the revision, caches stay valid.
            return None
        if services.keys() != old.services.keys():
            services = dict(sorted(services.items()))
        # Ids held twice resolve the same way as in a full merge: first by
        # service name, then provider order. A linear pass, no merging.
        by_id = {}
        for insts in services.values():
            for inst in insts:
                by_id.setdefault(inst.id, inst)
        new = View(
            revision=old.revision + 1,
            services=MappingProxyType(services),
            by_id=MappingProxyType(by_id),
        )
        change = Change(
            new.revision, tuple(registered), tuple(deregistered), tuple(updated), frozenset(changed)
        )
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
