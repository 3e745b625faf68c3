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
    name: str

    async def run(self, table: ServiceTable) -> None:
        """Publish snapshots until cancelled. Must publish at least once."""
        ...


def create_provider(config: ProviderConfig) -> Provider:
    if config.type == "static":
        from resolverd.providers.static import StaticProvider

        return StaticProvider(config)
    raise ProviderUnavailableError(
        f"service_discovery: provider {config.type!r} ({config.name}) is not available yet"
    )
