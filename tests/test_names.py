"""The name grammar, table-driven."""

from __future__ import annotations

import pytest

from resolverd.dns.names import Kind, Name, parse_name, split_labels

DOMAINS = (split_labels("resolverd.internal"), split_labels("consul"))
SERVICES = {"user-service", "payment-service"}
D = split_labels("resolverd.internal")


def parse(name: str) -> Name | None:
    return parse_name(split_labels(name), domains=DOMAINS, datacenter="dc1", services=SERVICES)


@pytest.mark.parametrize(
    ("qname", "kind", "service", "tag", "version"),
    [
        ("user-service.", Kind.SERVICE, "user-service", None, None),
        ("v1-2-0.user-service.", Kind.SERVICE, "user-service", None, "1-2-0"),
        ("user-service.resolverd.internal.", Kind.SERVICE, "user-service", None, None),
        ("v2.user-service.resolverd.internal.", Kind.SERVICE, "user-service", None, "2"),
        ("user-service.service.resolverd.internal.", Kind.SERVICE, "user-service", None, None),
        (
            "primary.user-service.service.resolverd.internal.",
            Kind.SERVICE,
            "user-service",
            "primary",
            None,
        ),
        (
            "primary.user-service.service.dc1.resolverd.internal.",
            Kind.SERVICE,
            "user-service",
            "primary",
            None,
        ),
        ("user-service.service.consul.", Kind.SERVICE, "user-service", None, None),
        ("_user-service._tcp.resolverd.internal.", Kind.SERVICE, "user-service", None, None),
        (
            "_user-service._udp.service.resolverd.internal.",
            Kind.SERVICE,
            "user-service",
            None,
            None,
        ),
        (
            "_user-service._primary.resolverd.internal.",
            Kind.SERVICE,
            "user-service",
            "primary",
            None,
        ),
        ("unknown-service.resolverd.internal.", Kind.SERVICE, "unknown-service", None, None),
        ("resolverd.internal.", Kind.APEX, None, None, None),
        ("ns.dns.resolverd.internal.", Kind.NAMESERVER, None, None, None),
        ("user-service.service.dc2.resolverd.internal.", Kind.NXDOMAIN, None, None, None),
        ("a.b.c.resolverd.internal.", Kind.NXDOMAIN, None, None, None),
        ("_x.resolverd.internal.", Kind.NXDOMAIN, None, None, None),
        ("tagonly.user-service.resolverd.internal.", Kind.NXDOMAIN, None, None, None),
        ("other.user-service.", Kind.NXDOMAIN, None, None, None),
    ],
)
def test_grammar(
    qname: str, kind: Kind, service: str | None, tag: str | None, version: str | None
) -> None:
    name = parse(qname)
    assert name is not None
    assert (name.kind, name.service, name.tag, name.version) == (kind, service, tag, version)


def test_named_port_form() -> None:
    name = parse("_http._tcp.web.resolverd.internal.")
    assert name is not None and name.kind is Kind.SERVICE
    assert (name.service, name.port_name, name.protocol) == ("web", "http", "tcp")
    with_keyword = parse("_grpc._udp.web.service.resolverd.internal.")
    assert with_keyword is not None and with_keyword.port_name == "grpc"


def test_instance_names() -> None:
    name = parse("user-service-1.user-service.instance.resolverd.internal.")
    assert name == Name(Kind.INSTANCE, D, D, service="user-service", instance="user-service-1")


@pytest.mark.parametrize(
    "qname", ["example.com.", "unknown.", ".", "_user-service._tcp.", "user-service.example."]
)
def test_outside_zones(qname: str) -> None:
    assert parse(qname) is None


def test_longest_domain_wins() -> None:
    domains = (split_labels("internal"), split_labels("resolverd.internal"))
    name = parse_name(
        split_labels("x.resolverd.internal"), domains=domains, datacenter="dc1", services=()
    )
    assert name is not None and name.zone == split_labels("resolverd.internal")


def test_bare_zone_is_the_service() -> None:
    name = parse("user-service.")
    assert name is not None and name.zone == ("user-service",) and name.domain is None
