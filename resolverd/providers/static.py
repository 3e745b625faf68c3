"""The static provider: the instances listed in the config, published once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from resolverd.config import ProviderConfig
from resolverd.table import ServiceTable


class StaticProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self._instances = config.static_services

    def publish(self, table: ServiceTable) -> None:
        now = time.time()
        table.replace(self.name, (replace(i, last_heartbeat=now) for i in self._instances))

    async def run(self, table: ServiceTable) -> None:
        self.publish(table)
        await asyncio.Event().wait()
