"""Domain model shared by every layer: service instances and their health.

Instances are frozen so a snapshot handed to the table can never change under a
reader; a provider that learns something new builds a new instance and a new
snapshot.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class Health(StrEnum):
    """The seed's three health states."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    CRITICAL = "critical"


_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Instance:
    """One reachable endpoint of a service (the seed's ServiceInstance)."""

    id: str
    name: str
    address: str
    port: int
    version: str = "1.0.0"
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    health: Health = Health.HEALTHY
    # When the provider last heard of it; not part of equality, so a provider
    # that republishes an unchanged instance does not make a table change.
    last_heartbeat: float = field(default=0.0, compare=False)
    provider: str = ""
    # Named port (Kubernetes): SRV `_<port_name>._<protocol>.<service>`.
    port_name: str = ""
    protocol: str = "tcp"

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address as an IP, or None when it is a host name."""
        return parse_ip(self.address)


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NOT_LABEL_CHARS = re.compile(r"[^a-z0-9-]+")


def is_dns_label(text: str) -> bool:
    """True for an RFC 1123 host label (letters, digits, inner hyphens, <= 63)."""
    return bool(_LABEL_RE.match(text.lower()))


def label_for(text: str) -> str:
    """A stable DNS label for an arbitrary id.

    Ids that already are labels map to themselves (lowercased); others are
    sanitised and get a short checksum suffix so two ids never share a label.
    """
    low = text.lower()
    if _LABEL_RE.match(low):
        return low
    suffix = f"{zlib.crc32(text.encode()):08x}"
    base = _NOT_LABEL_CHARS.sub("-", low).strip("-")[: 63 - len(suffix) - 1]
    return f"{base}-{suffix}" if base else f"x{suffix}"


def version_label(version: str) -> str:
    """The label form of a version: dots become hyphens (``1.2.0`` -> ``1-2-0``)."""
    return _NOT_LABEL_CHARS.sub("-", version.lower())
