"""No packet, however malformed, stops the server or leaks an exception."""

from __future__ import annotations

import socket
import struct

import dns.message
import dns.query
import dns.rcode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resolverd.balancing import Balancer, ConnectionTracker
from resolverd.dns.answers import Answerer
from resolverd.model import Instance
from resolverd.table import ServiceTable
from tests.conftest import DaemonThread, config_from, load_example


def make_answerer() -> Answerer:
    config = config_from(load_example("static.yaml"))
    table = ServiceTable()
    table.replace("static", config.providers[0].static_services)
    table.replace("extra", [Instance(id="v6", name="six", address="::1", port=1)])
    return Answerer(
        config=config.dns,
        balancer=Balancer(tracker=ConnectionTracker()),
        policy_for=config.policy_for,
        view=table.view,
    )


ANSWERER = make_answerer()
GOOD = [
    dns.message.make_query(name, rdtype, use_edns=edns).to_wire()
    for name in (
        "user-service.",
        "_user-service._tcp.resolverd.internal.",
        "six.resolverd.internal.",
        "resolverd.internal.",
        "example.com.",
    )
    for rdtype in ("A", "AAAA", "SRV", "SOA", "ANY")
    for edns in (-1, 0)
]


def check(packet: bytes, *, tcp: bool) -> None:
    reply = ANSWERER.respond(packet, "127.0.0.1", tcp=tcp)
    if reply is None:
        return
    assert reply[:2] == packet[:2]
    flags = struct.unpack("!H", reply[2:4])[0]
    assert flags & 0x8000
    assert flags & 0xF != dns.rcode.SERVFAIL  # SERVFAIL here means an internal error
    dns.message.from_wire(reply, ignore_trailing=False, question_only=flags & 0xF != 0)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes(packet: bytes, tcp: bool) -> None:
    check(packet, tcp=tcp)


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(GOOD),
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=6),
    st.integers(0, 600),
    st.booleans(),
)
def test_mutated_queries(base: bytes, flips: list[tuple[int, int]], cut: int, tcp: bool) -> None:
    packet = bytearray(base)
    for pos, value in flips:
        if pos < len(packet):
            packet[pos] = value
    check(bytes(packet[: max(cut, 2)]) if cut < len(packet) else bytes(packet), tcp=tcp)


def test_server_survives_garbage(static_daemon: DaemonThread) -> None:
    """Over real sockets: garbage on UDP and TCP, then a good query still answers."""
    garbage = [
        b"",
        b"\x00",
        b"\xff" * 11,
        b"\x12\x34" + b"\xff" * 40,
        bytes(range(256)) * 2,
        b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for g in garbage:
            s.sendto(g, static_daemon.udp)
    for g in garbage:
        with socket.create_connection(static_daemon.tcp, timeout=5) as c:
            c.sendall(len(g).to_bytes(2, "big") + g + b"\x00\x05ab")
    q = dns.message.make_query("user-service.resolverd.internal.", "A")
    for _ in range(2):
        reply = dns.query.udp(q, static_daemon.udp[0], port=static_daemon.udp[1], timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer
        reply = dns.query.tcp(q, static_daemon.tcp[0], port=static_daemon.tcp[1], timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer


def test_formerr_for_bad_question_count() -> None:
    q = bytearray(dns.message.make_query("user-service.", "A").to_wire())
    for qdcount in (0, 2):
        q[4:6] = qdcount.to_bytes(2, "big")
        reply = ANSWERER.respond(bytes(q), "127.0.0.1", tcp=False)
        assert reply is not None and reply[3] & 0xF == dns.rcode.FORMERR


def test_responses_are_never_answered() -> None:
    q = bytearray(dns.message.make_query("user-service.", "A").to_wire())
    q[2] |= 0x80
    assert ANSWERER.respond(bytes(q), "127.0.0.1", tcp=False) is None
