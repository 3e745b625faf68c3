"""Runtime registrations: instances added through the gRPC Register API.

A provider like any other (it publishes snapshots to the table), whose state
is a JSON file written atomically (temp file, fsync, rename, fsync of the
folder) before the table changes, so an acknowledged registration survives a
crash or `kill -9`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import structlog

from resolverd.config import parse_instance
from resolverd.fileutil import atomic_write
from resolverd.model import Instance
from resolverd.table import ServiceTable

log = structlog.get_logger(__name__)

NAME = "registrations"
FORMAT_VERSION = 1


class RegistrationError(Exception):
    """`kind` is "invalid", "conflict" or "not_found"; str() is the reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class StateFileError(Exception):
    pass


class RegistrationsProvider:
    NAME = NAME

    def __init__(self, state_file: str) -> None:
        self.name = NAME
        self.state_file = state_file
        self._instances: dict[str, Instance] = {}
        self._table: ServiceTable | None = None

    # -- persistence ------------------------------------------------------------

    def load(self) -> None:
        """Read the state file; a missing file is an empty state."""
        try:
            with open(self.state_file, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise StateFileError(f"{self.state_file}: cannot read: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
            raise StateFileError(f"{self.state_file}: not a resolverd registrations file")
        instances: dict[str, Instance] = {}
        for i, item in enumerate(data["instances"]):
            try:
                inst = parse_instance(item, path=f"instances[{i}]", provider=NAME)
            except ValueError as exc:
                raise StateFileError(f"{self.state_file}: {exc}") from None
            instances[inst.id] = inst
        self._instances = instances
        log.info("registrations.loaded", file=self.state_file, instances=len(instances))

    def _write(self, instances: dict[str, Instance]) -> None:
        payload = {
            "version": FORMAT_VERSION,
            "instances": [_to_json(i) for i in sorted(instances.values(), key=lambda i: i.id)],
        }
        atomic_write(self.state_file, json.dumps(payload, indent=1, sort_keys=True).encode())

    # -- provider ---------------------------------------------------------------

    def publish(self, table: ServiceTable) -> None:
        now = time.time()
        table.replace(NAME, [replace(i, last_heartbeat=now) for i in self._instances.values()])

    async def run(self, table: ServiceTable) -> None:
        self._table = table
        self.publish(table)
        await asyncio.Event().wait()

    # -- API ----------------------------------------------------------------------

    def register(self, data: dict[str, Any], table: ServiceTable) -> tuple[int, bool]:
        """Validate, persist, publish. Returns (revision, created)."""
        try:
            inst = parse_instance(data, path="instance", provider=NAME)
        except ValueError as exc:
            raise RegistrationError("invalid", str(exc)) from None
        owner = table.view.by_id.get(inst.id)
        if owner is not None and owner.provider != NAME:
            raise RegistrationError(
                "conflict", f"instance.id: {inst.id!r} is owned by provider {owner.provider!r}"
            )
        created = inst.id not in self._instances
        instances = {**self._instances, inst.id: inst}
        self._write(instances)
        self._instances = instances
        self.publish(table)
        log.info("registrations.registered", id=inst.id, service=inst.name, created=created)
        return table.view.revision, created

    def deregister(self, instance_id: str, table: ServiceTable) -> int:
        if not instance_id:
            raise RegistrationError("invalid", "id: must not be empty")
        if instance_id not in self._instances:
            owner = table.view.by_id.get(instance_id)
            if owner is not None:
                raise RegistrationError(
                    "conflict",
                    f"id: {instance_id!r} is owned by provider {owner.provider!r}, "
                    "not by runtime registrations",
                )
            raise RegistrationError("not_found", f"id: no registered instance {instance_id!r}")
        instances = {k: v for k, v in self._instances.items() if k != instance_id}
        self._write(instances)
        self._instances = instances
        self.publish(table)
        log.info("registrations.deregistered", id=instance_id)
        return table.view.revision


def _to_json(inst: Instance) -> dict[str, Any]:
    return {
        "id": inst.id,
        "name": inst.name,
        "version": inst.version,
        "address": inst.address,
        "port": inst.port,
        "tags": list(inst.tags),
        "metadata": dict(inst.metadata),
        "health": inst.health.value,
    }
