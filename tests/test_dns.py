"""The DNS server end to end: a real daemon on loopback, real clients."""

from __future__ import annotations

import collections
import socket
import struct
import subprocess
from collections.abc import Callable
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from resolverd.model import Health, Instance
from tests.conftest import DaemonThread, need

Start = Callable[[dict[str, Any]], DaemonThread]
D = "resolverd.internal."


def ask(
    d: DaemonThread,
    qname: str,
    rdtype: str = "A",
    *,
    tcp: bool = False,
    source: str | None = None,
    **make: Any,
) -> dns.message.Message:
    q = dns.message.make_query(qname, rdtype, **make)
    if tcp:
        return dns.query.tcp(q, d.tcp[0], port=d.tcp[1], timeout=5)
    return dns.query.udp(
        q, d.udp[0], port=d.udp[1], timeout=5, source=source, ignore_trailing=False
    )


def raw_udp(d: DaemonThread, packet: bytes, *, timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, d.udp)
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def addresses(msg: dns.message.Message) -> list[str]:
    return [rr.address for rrset in msg.answer for rr in rrset if hasattr(rr, "address")]


def srv_targets(msg: dns.message.Message) -> list[tuple[int, int, str]]:
    return [(rr.priority, rr.port, rr.target.to_text()) for rrset in msg.answer for rr in rrset]


def services(
    *instances: dict[str, Any],
    policy: dict[str, Any] | None = None,
    dns_cfg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "service_discovery": {
            "provider": "static",
            "static_services": list(instances),
            "load_balancer": policy or {"algorithm": "round_robin"},
        },
    }
    if dns_cfg:
        data["dns"] = dns_cfg
    return data


def inst(i: int, name: str = "web", **extra: Any) -> dict[str, Any]:
    return {"id": f"{name}-{i}", "name": name, "address": f"127.0.1.{i}", "port": 8000 + i, **extra}


# -- the seed's example, as `make run` serves it ---------------------------------


def test_dig_srv_bare_name(static_daemon: DaemonThread) -> None:
    """`dig SRV user-service` returns both instances with ports and target addresses."""
    out = subprocess.run(
        [
            need("dig"),
            "@127.0.0.1",
            "-p",
            str(static_daemon.udp[1]),
            "SRV",
            "user-service",
            "+noall",
            "+answer",
            "+additional",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    srv = [line.split() for line in out.splitlines() if "\tSRV\t" in line or " SRV " in line]
    assert sorted((r[-2], r[-1]) for r in srv) == [
        ("8080", f"user-service-1.user-service.instance.{D}"),
        ("8080", f"user-service-2.user-service.instance.{D}"),
    ]
    assert f"user-service-1.user-service.instance.{D}" in out and "10.0.1.10" in out
    assert f"user-service-2.user-service.instance.{D}" in out and "10.0.1.11" in out


def test_kdig_tcp_and_udp(static_daemon: DaemonThread) -> None:
    for proto, port in (("+notcp", static_daemon.udp[1]), ("+tcp", static_daemon.tcp[1])):
        out = subprocess.run(
            [
                need("kdig"),
                "@127.0.0.1",
                "-p",
                str(port),
                proto,
                "A",
                f"user-service.{D}",
                "+short",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        assert sorted(out.split()) == ["10.0.1.10", "10.0.1.11"], proto


def test_srv_additional_carries_target_addresses(static_daemon: DaemonThread) -> None:
    msg = ask(static_daemon, "user-service.", "SRV")
    targets = {t for _, _, t in srv_targets(msg)}
    glue = {rrset.name.to_text(): [rr.address for rr in rrset] for rrset in msg.additional}
    assert set(glue) == targets
    for target in targets:
        resolved = ask(static_daemon, target, "A")
        assert addresses(resolved) == glue[target]
        assert resolved.flags & dns.flags.AA


@pytest.mark.parametrize(
    ("qname", "rdtype", "expected"),
    [
        ("user-service.", "A", {"10.0.1.10", "10.0.1.11"}),
        (f"user-service.{D}", "A", {"10.0.1.10", "10.0.1.11"}),
        (f"user-service.service.{D}", "A", {"10.0.1.10", "10.0.1.11"}),
        (f"primary.user-service.service.{D}", "A", {"10.0.1.10"}),
        (f"secondary.user-service.service.dc1.{D}", "A", {"10.0.1.11"}),
        (f"v1-2-0.user-service.{D}", "A", {"10.0.1.10", "10.0.1.11"}),
        ("v1-2-0.user-service.", "A", {"10.0.1.10", "10.0.1.11"}),
        (f"_user-service._tcp.{D}", "SRV", {8080}),
        (f"_user-service._primary.service.{D}", "SRV", {8080}),
    ],
)
def test_name_forms(
    static_daemon: DaemonThread, qname: str, rdtype: str, expected: set[Any]
) -> None:
    msg = ask(static_daemon, qname, rdtype)
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.AA
    got = set(addresses(msg)) if rdtype == "A" else {p for _, p, _ in srv_targets(msg)}
    assert got == expected


def test_tag_filter_in_srv(static_daemon: DaemonThread) -> None:
    msg = ask(static_daemon, f"_user-service._secondary.{D}", "SRV")
    assert [t for _, _, t in srv_targets(msg)] == [f"user-service-2.user-service.instance.{D}"]


@pytest.mark.parametrize(
    "qname",
    [
        f"nope.{D}",
        f"v9-9-9.user-service.{D}",
        f"canary.user-service.service.{D}",
        f"user-service.service.dc9.{D}",
        f"nobody.user-service.instance.{D}",
        "extra.user-service.",
    ],
)
def test_nxdomain_with_soa(static_daemon: DaemonThread, qname: str) -> None:
    msg = ask(static_daemon, qname, "A")
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert msg.flags & dns.flags.AA
    assert not msg.answer
    assert [rrset.rdtype for rrset in msg.authority] == [dns.rdatatype.SOA]


@pytest.mark.parametrize(
    ("qname", "rdtype"),
    [
        ("user-service.", "MX"),
        (f"user-service.{D}", "TXT"),
        (f"user-service.{D}", "AAAA"),
        (D, "A"),
        (f"ns.dns.{D}", "AAAA"),
    ],
)
def test_nodata_is_noerror_with_soa(static_daemon: DaemonThread, qname: str, rdtype: str) -> None:
    msg = ask(static_daemon, qname, rdtype)
    assert msg.rcode() == dns.rcode.NOERROR
    assert not msg.answer
    soa = msg.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.ttl == soa[0].minimum  # RFC 2308: negative TTL


def test_soa_and_ns_at_apex(static_daemon: DaemonThread) -> None:
    soa = ask(static_daemon, D, "SOA")
    assert soa.answer[0][0].mname.to_text() == f"ns.dns.{D}"
    ns = ask(static_daemon, D, "NS")
    assert ns.answer[0][0].target.to_text() == f"ns.dns.{D}"
    assert addresses(ask(static_daemon, f"ns.dns.{D}", "A")) == ["127.0.0.1"]
    assert [rrset.name.to_text() for rrset in ns.additional] == [f"ns.dns.{D}"]
    bare = ask(static_daemon, "user-service.", "SOA")
    assert bare.answer[0].name.to_text() == "user-service."


def test_any_is_minimal(static_daemon: DaemonThread) -> None:
    msg = ask(static_daemon, f"user-service.{D}", "ANY")
    assert len(msg.answer) == 1 and msg.answer[0].rdtype == dns.rdatatype.HINFO
    assert msg.answer[0][0].cpu == b"RFC8482"


@pytest.mark.parametrize("qname", ["example.com.", "unknown-thing.", "com."])
def test_outside_zones_refused(static_daemon: DaemonThread, qname: str) -> None:
    msg = ask(static_daemon, qname, "A")
    assert msg.rcode() == dns.rcode.REFUSED
    assert not msg.flags & dns.flags.AA


def test_non_in_class_refused(static_daemon: DaemonThread) -> None:
    msg = ask(static_daemon, f"user-service.{D}", "A", rdclass=dns.rdataclass.CH)
    assert msg.rcode() == dns.rcode.REFUSED


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.UPDATE, dns.opcode.STATUS, 3])
def test_unknown_opcode_notimp(static_daemon: DaemonThread, opcode: int) -> None:
    q = dns.message.make_query(f"user-service.{D}", "A")
    q.set_opcode(opcode)
    reply = raw_udp(static_daemon, q.to_wire())
    assert reply is not None
    header = struct.unpack("!HHHHHH", reply[:12])
    assert header[0] == q.id
    assert header[1] & 0xF == dns.rcode.NOTIMP
    assert (header[1] >> 11) & 0xF == opcode


def test_flags(static_daemon: DaemonThread) -> None:
    for rd in (True, False):
        q = dns.message.make_query(f"user-service.{D}", "A")
        q.flags = (dns.flags.RD if rd else 0) | dns.flags.CD | dns.flags.AD
        reply = dns.query.udp(q, static_daemon.udp[0], port=static_daemon.udp[1], timeout=5)
        assert bool(reply.flags & dns.flags.RD) == rd
        assert reply.flags & dns.flags.QR and reply.flags & dns.flags.AA
        assert reply.flags & dns.flags.CD
        assert not reply.flags & dns.flags.RA
        assert not reply.flags & dns.flags.AD
    # Z bit set in the query is not echoed.
    q = dns.message.make_query(f"user-service.{D}", "A")
    wire = bytearray(q.to_wire())
    wire[3] |= 0x40
    reply = raw_udp(static_daemon, bytes(wire))
    assert reply is not None and not reply[3] & 0x40


# -- EDNS -------------------------------------------------------------------------


def test_opt_only_when_asked(static_daemon: DaemonThread) -> None:
    plain = ask(static_daemon, f"user-service.{D}", "A")
    assert plain.edns == -1
    edns = ask(static_daemon, f"user-service.{D}", "A", use_edns=0, payload=4096)
    assert edns.edns == 0 and edns.payload == 1232


def test_do_copied_unknown_edns_flags_not(static_daemon: DaemonThread) -> None:
    reply = ask(
        static_daemon, f"user-service.{D}", "A", use_edns=0, ednsflags=dns.flags.DO | 0x0001
    )
    assert reply.ednsflags & dns.flags.DO
    assert not reply.ednsflags & 0x0001


def test_badvers(static_daemon: DaemonThread) -> None:
    reply = ask(static_daemon, f"user-service.{D}", "A", use_edns=1)
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0 and not reply.answer


def test_ecs_echoed(static_daemon: DaemonThread) -> None:
    ecs = dns.edns.ECSOption("192.0.2.0", 24)
    reply = ask(static_daemon, f"user-service.{D}", "A", use_edns=0, options=[ecs])
    echoed = [o for o in reply.options if isinstance(o, dns.edns.ECSOption)]
    assert len(echoed) == 1 and echoed[0].address == "192.0.2.0" and echoed[0].srclen == 24


def test_bad_ecs_formerr(static_daemon: DaemonThread) -> None:
    bad = dns.edns.GenericOption(8, b"\x00\x01\x18\x00\xc0\x00")  # /24 with 2 address bytes
    reply = ask(static_daemon, f"user-service.{D}", "A", use_edns=0, options=[bad])
    assert reply.rcode() == dns.rcode.FORMERR


# -- case, truncation, limits -----------------------------------------------------


def test_0x20_case_preserved(static_daemon: DaemonThread) -> None:
    qname = "UsEr-SeRvIcE.ReSoLvErD.InTeRnAl."
    for _ in range(2):  # the second one is answered from the cache
        reply = ask(static_daemon, qname, "A")
        assert reply.question[0].name.to_text() == qname
        assert {rrset.name.to_text() for rrset in reply.answer} == {qname}
        assert sorted(addresses(reply)) == ["10.0.1.10", "10.0.1.11"]
    lower = ask(static_daemon, qname.lower(), "A")
    assert lower.question[0].name.to_text() == qname.lower()


def test_truncation_then_tcp(start_daemon: Start) -> None:
    d = start_daemon(services(*(inst(i, "big") for i in range(1, 61))))
    udp = ask(d, f"big.{D}", "SRV")
    assert udp.flags & dns.flags.TC and not udp.answer
    edns = ask(d, f"big.{D}", "SRV", use_edns=0, payload=1232)
    assert edns.flags & dns.flags.TC and edns.edns == 0
    full = ask(d, f"big.{D}", "SRV", tcp=True)
    assert not full.flags & dns.flags.TC
    assert len(full.answer[0]) == 60 and len(full.additional) == 60
    # dig retries over TCP by itself on TC=1, on the same port number.
    assert d.udp[1] == d.tcp[1]
    out = subprocess.run(
        [
            need("dig"),
            "@127.0.0.1",
            "-p",
            str(d.udp[1]),
            "+notcp",
            "+noedns",
            "SRV",
            f"big.{D}",
            "+short",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert len(out.splitlines()) == 60
    a = ask(d, f"big.{D}", "A", use_edns=0, payload=4096)
    assert len(addresses(a)) == 60 and not a.flags & dns.flags.TC


def test_answer_limit(start_daemon: Start) -> None:
    d = start_daemon(services(*(inst(i) for i in range(1, 6)), dns_cfg={"answer_limit": 2}))
    assert len(addresses(ask(d, f"web.{D}", "A"))) == 2
    assert len(ask(d, f"web.{D}", "SRV").answer[0]) == 2


# -- ordering ---------------------------------------------------------------------


def test_round_robin_rotates(start_daemon: Start) -> None:
    d = start_daemon(services(*(inst(i) for i in (1, 2, 3))))
    firsts = [addresses(ask(d, f"web.{D}", "A"))[0] for _ in range(6)]
    assert firsts[:3] == firsts[3:]
    assert sorted(firsts[:3]) == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    order = addresses(ask(d, f"web.{D}", "A"))
    i = order.index(order[0])
    assert order == order[i:] + order[:i]  # rotations


def test_srv_priority_agrees_with_order(start_daemon: Start) -> None:
    d = start_daemon(services(*(inst(i) for i in (1, 2, 3))))
    for _ in range(3):
        msg = ask(d, f"web.{D}", "SRV")
        records = list(msg.answer[0])
        best = min(records, key=lambda r: r.priority)
        # dnspython may reorder rdatas in a set; the wire order is checked via A below.
        assert sorted(r.priority for r in records) == [1, 2, 3]
        assert best.port in (8001, 8002, 8003)


def test_srv_wire_order_is_priority_order(start_daemon: Start) -> None:
    d = start_daemon(services(*(inst(i) for i in (1, 2, 3))))
    q = dns.message.make_query(f"web.{D}", "SRV")
    reply = raw_udp(d, q.to_wire())
    assert reply is not None
    # Parse SRV rdata in wire order: priorities must be 1, 2, 3.
    msg = dns.message.from_wire(reply)
    offs = []
    for rr in msg.answer[0]:
        offs.append(reply.find(struct.pack("!HHH", rr.priority, rr.weight, rr.port)))
    prio_by_offset = [
        p for _, p in sorted(zip(offs, [r.priority for r in msg.answer[0]], strict=True))
    ]
    assert prio_by_offset == [1, 2, 3]


def test_weighted_proportions(start_daemon: Start) -> None:
    d = start_daemon(
        services(
            inst(1, metadata={"weight": "30"}),
            inst(2, metadata={"weight": "10"}),
            policy={"algorithm": "weighted"},
        )
    )
    firsts = collections.Counter(addresses(ask(d, f"web.{D}", "A"))[0] for _ in range(400))
    assert firsts["127.0.1.1"] == 300 and firsts["127.0.1.2"] == 100


def test_ip_hash_by_source_and_ecs(start_daemon: Start) -> None:
    d = start_daemon(services(*(inst(i) for i in range(1, 5)), policy={"algorithm": "ip_hash"}))
    picks = {}
    for n in range(2, 30):
        src = f"127.0.0.{n}"
        first = {addresses(ask(d, f"web.{D}", "A", source=src))[0] for _ in range(3)}
        assert len(first) == 1, src  # stable per client
        picks[src] = first.pop()
    assert len(set(picks.values())) >= 3  # spread across clients
    ecs_picks = set()
    for n in range(30):
        ecs = dns.edns.ECSOption(f"198.51.{n}.0", 24)
        reply = ask(d, f"web.{D}", "A", use_edns=0, options=[ecs])
        echoed = next(o for o in reply.options if isinstance(o, dns.edns.ECSOption))
        assert echoed.scopelen == 24
        again = ask(d, f"web.{D}", "A", use_edns=0, options=[ecs], source="127.0.0.9")
        assert addresses(again)[0] == addresses(reply)[0]
        ecs_picks.add(addresses(reply)[0])
    assert len(ecs_picks) >= 3


def test_least_connections_follows_tracker(start_daemon: Start) -> None:
    d = start_daemon(
        services(*(inst(i) for i in (1, 2, 3)), policy={"algorithm": "least_connections"})
    )
    tracker = d.daemon.tracker
    d.call(lambda: tracker.opened("web-1", 5))
    d.call(lambda: tracker.opened("web-2", 1))
    d.call(lambda: tracker.opened("web-3", 3))
    for _ in range(3):
        assert addresses(ask(d, f"web.{D}", "A")) == ["127.0.1.2", "127.0.1.3", "127.0.1.1"]
    d.call(lambda: tracker.opened("web-2", 9))
    assert addresses(ask(d, f"web.{D}", "A"))[0] == "127.0.1.3"
    d.call(lambda: tracker.closed("web-1", 5))
    assert addresses(ask(d, f"web.{D}", "A"))[0] == "127.0.1.1"


def test_geo_uses_client_location(start_daemon: Start) -> None:
    d = start_daemon(
        services(
            inst(1, metadata={"latitude": "35.68", "longitude": "139.69"}),  # Tokyo
            inst(2, metadata={"latitude": "38.9", "longitude": "-77.0"}),  # Washington
            inst(3, metadata={"latitude": "51.5", "longitude": "-0.12"}),  # London
            policy={"algorithm": "geo_location"},
            dns_cfg={"client_location": {"latitude": 40.7, "longitude": -74.0}},  # New York
        )
    )
    for _ in range(3):
        assert addresses(ask(d, f"web.{D}", "A")) == ["127.0.1.2", "127.0.1.3", "127.0.1.1"]


def test_sticky_per_client(start_daemon: Start) -> None:
    d = start_daemon(
        services(
            *(inst(i) for i in (1, 2, 3)),
            policy={"algorithm": "round_robin", "sticky_session": True},
        )
    )
    for src in ("127.0.0.2", "127.0.0.3"):
        first = {addresses(ask(d, f"web.{D}", "A", source=src))[0] for _ in range(4)}
        assert len(first) == 1


# -- the table drives the answers -------------------------------------------------


def test_table_changes_reach_answers(start_daemon: Start) -> None:
    d = start_daemon(services(inst(1)))
    assert addresses(ask(d, f"web.{D}", "A")) == ["127.0.1.1"]
    added = Instance(id="web-9", name="web", address="127.0.1.9", port=9)
    d.call(lambda: d.daemon.table.replace("runtime", [added]))
    assert sorted(addresses(ask(d, f"web.{D}", "A"))) == ["127.0.1.1", "127.0.1.9"]
    assert ask(d, "web.", "A").rcode() == dns.rcode.NOERROR
    d.call(lambda: d.daemon.table.replace("runtime", []))
    assert addresses(ask(d, f"web.{D}", "A")) == ["127.0.1.1"]


def test_unhealthy_not_served(start_daemon: Start) -> None:
    d = start_daemon(services(inst(1), inst(2, health="critical"), inst(3, health="unhealthy")))
    assert addresses(ask(d, f"web.{D}", "A")) == ["127.0.1.1"]
    d.call(
        lambda: d.daemon.table.replace(
            "static",
            [Instance(id="web-1", name="web", address="127.0.1.1", port=1, health=Health.CRITICAL)],
        )
    )
    nodata = ask(d, f"web.{D}", "A")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer


def test_health_check_disabled_serves_all(start_daemon: Start) -> None:
    d = start_daemon(
        services(
            inst(1),
            inst(2, health="critical"),
            policy={"algorithm": "round_robin", "health_check_enabled": False},
        )
    )
    assert sorted(addresses(ask(d, f"web.{D}", "A"))) == ["127.0.1.1", "127.0.1.2"]


def test_ipv6_instances(start_daemon: Start) -> None:
    d = start_daemon(services({"id": "v6", "name": "six", "address": "::1", "port": 1}))
    assert addresses(ask(d, f"six.{D}", "AAAA")) == ["::1"]
    assert not ask(d, f"six.{D}", "A").answer
    srv = ask(d, f"six.{D}", "SRV")
    assert [rrset.rdtype for rrset in srv.additional] == [dns.rdatatype.AAAA]


# -- TCP framing --------------------------------------------------------------------


def test_tcp_pipelined(static_daemon: DaemonThread) -> None:
    queries = [dns.message.make_query(f"user-service.{D}", t) for t in ("A", "SRV", "MX")]
    with socket.create_connection(static_daemon.tcp, timeout=5) as s:
        s.sendall(b"".join(len(w).to_bytes(2, "big") + w for w in (q.to_wire() for q in queries)))
        replies = []
        buf = b""
        while len(replies) < 3:
            buf += s.recv(65535)
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                n = int.from_bytes(buf[:2], "big")
                replies.append(dns.message.from_wire(buf[2 : 2 + n]))
                buf = buf[2 + n :]
    assert [r.id for r in replies] == [q.id for q in queries]


def test_named_ports_srv_and_deduplicated_a(start_daemon: Start) -> None:
    d = start_daemon(services(inst(1)))
    pods = [
        Instance(
            id=f"pod-{n}-{port}",
            name="api",
            address=f"127.0.4.{n}",
            port=number,
            port_name=port,
            protocol=proto,
        )
        for n in (1, 2)
        for port, number, proto in (("http", 8080, "tcp"), ("dns", 53, "udp"))
    ]
    d.call(lambda: d.daemon.table.replace("kubernetes", pods))
    http = ask(d, f"_http._tcp.api.{D}", "SRV")
    assert sorted(p for _, p, _ in srv_targets(http)) == [8080, 8080]
    udp = ask(d, f"_dns._udp.api.service.{D}", "SRV")
    assert sorted(p for _, p, _ in srv_targets(udp)) == [53, 53]
    assert ask(d, f"_dns._tcp.api.{D}", "SRV").rcode() == dns.rcode.NXDOMAIN
    assert sorted(addresses(ask(d, f"api.{D}", "A"))) == ["127.0.4.1", "127.0.4.2"]
