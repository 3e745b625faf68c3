"""Providers turn a registry's state into snapshots of instances for the table.

A provider knows nothing of DNS or balancing: it runs until cancelled and calls
`table.replace(self.name, instances)` with a complete snapshot whenever its
source changes. One provider per module; `create_provider` maps a config entry
to its class.
"""

from __future__ import annotations

from typing import Protocol

from resolverd.config import ProviderConfig
from resolverd.table import ServiceTable


class ProviderUnavailableError(Exception):
    """The configured provider type is not available in this build."""


class Provider(Protocol):
    """What the daemon runs. `run` lives until cancelled and never raises for
    backend trouble: while the backend is unreachable it calls
    `table.mark_stale(name, reason)` (the last snapshot keeps being served) and
    retries with `Backoff`; each complete, successful read of the backend ends
    in `table.replace(name, instances)`, even when it is empty."""

    name: str

    async def run(self, table: ServiceTable) -> None: ...


def create_provider(config: ProviderConfig) -> Provider:
    """The provider for a config entry. Imports lazily: a daemon with only
    static services never loads the Consul, etcd or Kubernetes clients."""
    if config.type == "static":
        from resolverd.providers.static import StaticProvider

        return StaticProvider(config)
    if config.type == "etcd":
        from resolverd.providers.etcd import EtcdProvider

        return EtcdProvider(config)
    if config.type == "consul":
        from resolverd.providers.consul import ConsulProvider

        return ConsulProvider(config)
    if config.type == "kubernetes":
        from resolverd.providers.kubernetes import KubernetesProvider

        return KubernetesProvider(config)
    raise ProviderUnavailableError(
        f"service_discovery: provider {config.type!r} ({config.name}) is not available"
    )
