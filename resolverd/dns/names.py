"""The name grammar: which owner names resolverd answers and what they mean.

Pure functions from a lowercased label tuple to a `Name`. Relative to each
served domain D (default ``resolverd.internal``)::

    D                                        zone apex (SOA, NS)
    ns.dns.D                                 the name server itself
    <service>.D                              all instances of a service
    v<version>.<service>.D                   one version (dots written as '-')
    [<tag>.]<service>.service[.<dc>].D       Consul's form
    _<service>._<tag|tcp|udp>[.service].D    RFC 2782 form (_tcp/_udp: no tag filter)
    _<port>._<proto>.<service>[.service].D   a named port (Kubernetes), as CoreDNS
    <instance>.<service>.instance.D          one instance (SRV targets)

and with no domain at all, for a known service: ``<service>.`` and
``v<version>.<service>.`` (so ``dig SRV user-service`` works). Everything
else is outside the served zones.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    APEX = "apex"
    NAMESERVER = "nameserver"
    SERVICE = "service"
    INSTANCE = "instance"
    NXDOMAIN = "nxdomain"


@dataclass(frozen=True, slots=True)
class Name:
    kind: Kind
    zone: tuple[str, ...]  # labels of the zone apex (the domain, or the bare service)
    domain: tuple[str, ...] | None  # the served domain matched, None for bare names
    service: str | None = None
    tag: str | None = None
    version: str | None = None  # label form, e.g. "1-2-0"
    instance: str | None = None  # instance label
    port_name: str | None = None  # named port (with protocol)
    protocol: str | None = None


def split_labels(domain: str) -> tuple[str, ...]:
    return tuple(label for label in domain.lower().strip(".").split(".") if label)


def _version(label: str) -> str | None:
    if len(label) > 1 and label[0] == "v" and label[1].isdigit():
        return label[1:]
    return None


def parse_name(
    labels: tuple[str, ...],
    *,
    domains: Sequence[tuple[str, ...]],
    datacenter: str,
    services: Container[str],
) -> Name | None:
    """Classify a lowercased name. None means outside every served zone."""
    best: tuple[str, ...] | None = None
    for domain in domains:
        n = len(domain)
        matches = len(labels) >= n and labels[len(labels) - n :] == domain
        if matches and (best is None or n > len(best)):
            best = domain
    if best is None:
        return _parse_bare(labels, services)
    rel = labels[: len(labels) - len(best)]
    return _parse_relative(rel, best, datacenter)


def _parse_bare(labels: tuple[str, ...], services: Container[str]) -> Name | None:
    if not labels:
        return None
    service = labels[-1]
    if service.startswith("_") or service not in services:
        return None
    zone = (service,)
    if len(labels) == 1:
        return Name(Kind.SERVICE, zone, None, service=service)
    if len(labels) == 2 and (version := _version(labels[0])) is not None:
        return Name(Kind.SERVICE, zone, None, service=service, version=version)
    return Name(Kind.NXDOMAIN, zone, None)


def _parse_relative(rel: tuple[str, ...], domain: tuple[str, ...], datacenter: str) -> Name:
    nx = Name(Kind.NXDOMAIN, domain, domain)
    if not rel:
        return Name(Kind.APEX, domain, domain)
    if rel == ("ns", "dns"):
        return Name(Kind.NAMESERVER, domain, domain)
    if rel[-1] == "instance":
        if len(rel) == 3:
            return Name(Kind.INSTANCE, domain, domain, service=rel[1], instance=rel[0])
        return nx
    consul = False
    if rel[-1] == "service":
        rel, consul = rel[:-1], True
    elif len(rel) >= 2 and rel[-2] == "service":
        if rel[-1] != datacenter:
            return nx
        rel, consul = rel[:-2], True
    if len(rel) == 2 and rel[0].startswith("_") and rel[1].startswith("_"):
        service, tag = rel[0][1:], rel[1][1:]
        if not service or not tag:
            return nx
        return Name(
            Kind.SERVICE,
            domain,
            domain,
            service=service,
            tag=None if tag in ("tcp", "udp") else tag,
        )
    if len(rel) == 3 and rel[0].startswith("_") and rel[1].startswith("_"):
        port, proto = rel[0][1:], rel[1][1:]
        if not port or not proto or rel[2].startswith("_"):
            return nx
        return Name(Kind.SERVICE, domain, domain, service=rel[2], port_name=port, protocol=proto)
    if not rel or any(label.startswith("_") for label in rel):
        return nx
    if len(rel) == 1:
        return Name(Kind.SERVICE, domain, domain, service=rel[0])
    if len(rel) == 2:
        if consul:
            return Name(Kind.SERVICE, domain, domain, service=rel[1], tag=rel[0])
        version = _version(rel[0])
        if version is not None:
            return Name(Kind.SERVICE, domain, domain, service=rel[1], version=version)
    return nx
