"""Forwarding through resolverd to a real upstream on loopback: UDP and TCP,
truncation, the cache, negative caching, failures, coalescing, access control."""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from resolverd.dns.forward import resolv_conf_upstreams
from tests.conftest import DaemonThread, load_example
from tests.test_dns import addresses, ask
from tests.upstream import Upstream

Start = Callable[[dict[str, Any]], DaemonThread]
WWW = "www.example.test."


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream("127.0.0.1")
    up.add(f"{WWW} 300 IN A 192.0.2.10")
    up.add(f"{WWW} 300 IN AAAA 2001:db8::10")
    for i in range(25):  # too big for 512 bytes, fits in 1232
        up.add(f'big.example.test. 300 IN TXT "{"x" * 30} {i}"')
    up.nxdomain.add("nope.example.test.")
    yield up
    up.close()


def forwarding(up: Upstream | list[Upstream], **forward: Any) -> dict[str, Any]:
    ups = up if isinstance(up, list) else [up]
    data = load_example("static.yaml")
    data["dns"]["forward"] = {"upstreams": [u.address for u in ups], "timeout": "300ms", **forward}
    return data


def test_forwards_udp_and_tcp(start_daemon: Start, upstream: Upstream) -> None:
    d = start_daemon(forwarding(upstream))
    udp = ask(d, WWW, "A")
    assert addresses(udp) == ["192.0.2.10"]
    assert udp.flags & dns.flags.RA and not udp.flags & dns.flags.AA
    tcp = ask(d, WWW, "AAAA", tcp=True)
    assert addresses(tcp) == ["2001:db8::10"]
    assert upstream.queries[(WWW, "AAAA", "tcp")] == 1  # a TCP client is forwarded over TCP
    # Services are still ours.
    assert sorted(addresses(ask(d, "user-service.", "A"))) == ["10.0.1.10", "10.0.1.11"]


def test_cache_hit_and_ttl_countdown(start_daemon: Start, upstream: Upstream) -> None:
    d = start_daemon(forwarding(upstream))
    now = [1000.0]
    d.daemon.forwarder._clock = lambda: now[0]
    first = ask(d, WWW, "A")
    second = ask(d, WWW, "A")
    assert upstream.count(WWW) == 1
    assert first.answer[0].ttl == second.answer[0].ttl == 300
    now[0] += 100.4
    assert ask(d, WWW, "A").answer[0].ttl == 200
    assert ask(d, "WwW.ExAmPlE.TeSt.", "A").question[0].name.to_text() == "WwW.ExAmPlE.TeSt."
    assert upstream.count(WWW) == 1
    now[0] += 200.0  # expired: asks again
    assert ask(d, WWW, "A").answer[0].ttl == 300
    assert upstream.count(WWW) == 2


def test_negative_caching(start_daemon: Start, upstream: Upstream) -> None:
    d = start_daemon(forwarding(upstream))
    for _ in range(3):
        reply = ask(d, "nope.example.test.", "A")
        assert reply.rcode() == dns.rcode.NXDOMAIN
        nodata = ask(d, WWW, "MX")
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert upstream.count("nope.example.test.") == 1
    assert upstream.count(WWW, "MX") == 1
    # RFC 2308: the negative TTL is the SOA's MINIMUM (60) when below its TTL (120).
    assert ask(d, "nope.example.test.", "A").authority[0].ttl <= 60


def test_truncation_from_upstream_retries_over_tcp(start_daemon: Start, upstream: Upstream) -> None:
    upstream.truncate_udp.add(WWW)
    d = start_daemon(forwarding(upstream))
    assert addresses(ask(d, WWW, "A")) == ["192.0.2.10"]
    assert upstream.queries[(WWW, "A", "udp")] == 1
    assert upstream.queries[(WWW, "A", "tcp")] == 1


def test_big_answers_truncate_to_the_client(start_daemon: Start, upstream: Upstream) -> None:
    d = start_daemon(forwarding(upstream))
    small = ask(d, "big.example.test.", "TXT")
    assert small.flags & dns.flags.TC and not small.answer and small.edns == -1
    edns = ask(d, "big.example.test.", "TXT", use_edns=0, payload=4096)
    assert not edns.flags & dns.flags.TC and len(edns.answer[0]) == 25
    assert edns.payload == 1232
    full = ask(d, "big.example.test.", "TXT", tcp=True)
    assert len(full.answer[0]) == 25


def test_upstream_down_servfail_in_bounded_time(start_daemon: Start, upstream: Upstream) -> None:
    d = start_daemon(forwarding(upstream))
    upstream.stop()
    started = time.monotonic()
    reply = ask(d, WWW, "A")
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 2.0


def test_serve_stale_when_every_upstream_fails(start_daemon: Start, upstream: Upstream) -> None:
    d = start_daemon(forwarding(upstream, serve_stale=True))
    now = [1000.0]
    d.daemon.forwarder._clock = lambda: now[0]
    assert addresses(ask(d, WWW, "A")) == ["192.0.2.10"]
    upstream.servfail = True
    now[0] += 400  # expired
    stale = ask(d, WWW, "A")
    assert addresses(stale) == ["192.0.2.10"] and stale.answer[0].ttl == 30
    assert upstream.count(WWW) == 2  # it did try the upstream first
    now[0] += 90_000  # past stale_max_age (1 day)
    assert ask(d, WWW, "A").rcode() == dns.rcode.SERVFAIL


def test_failover_and_round_robin(start_daemon: Start, upstream: Upstream) -> None:
    dead = Upstream("127.0.0.3")
    try:
        dead.stop()
        d = start_daemon(forwarding([dead, upstream], cache_size=0))
        assert addresses(ask(d, WWW, "A")) == ["192.0.2.10"]  # sequential: the second answers
        second = Upstream("127.0.0.4")
        try:
            second.add(f"{WWW} 300 IN A 192.0.2.10")
            d2 = start_daemon(forwarding([upstream, second], cache_size=0, policy="round_robin"))
            for _ in range(4):
                ask(d2, WWW, "A")
            assert second.count(WWW) == 2
        finally:
            second.close()
    finally:
        dead.close()


def test_coalescing_identical_questions(start_daemon: Start, upstream: Upstream) -> None:
    upstream.delay = 0.3
    d = start_daemon(forwarding(upstream, timeout="2s"))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: ask(d, WWW, "A"), range(8)))
    assert all(addresses(r) == ["192.0.2.10"] for r in replies)
    assert upstream.count(WWW) == 1


def test_refused_for_clients_not_allowed(start_daemon: Start, upstream: Upstream) -> None:
    d = start_daemon(forwarding(upstream, allow=["127.0.0.1/32"]))
    assert addresses(ask(d, WWW, "A")) == ["192.0.2.10"]  # warms the cache too
    other = ask(d, WWW, "A", source="127.0.0.2")
    assert other.rcode() == dns.rcode.REFUSED and not other.answer
    # Our own zones answer everyone.
    service = ask(d, "user-service.", "A", source="127.0.0.2")
    assert service.rcode() == dns.rcode.NOERROR and service.answer
    assert upstream.count(WWW) == 1


def test_default_allow_is_loopback_only(start_daemon: Start, upstream: Upstream) -> None:
    d = start_daemon(forwarding(upstream))
    assert d.daemon.forwarder.allowed("127.0.0.9")
    assert d.daemon.forwarder.allowed("::1")
    assert not d.daemon.forwarder.allowed("192.0.2.1")


def test_any_is_minimal_and_not_forwarded(start_daemon: Start, upstream: Upstream) -> None:
    d = start_daemon(forwarding(upstream))
    reply = ask(d, WWW, "ANY")
    assert [rrset.rdtype for rrset in reply.answer] == [dns.rdatatype.HINFO]
    assert upstream.count(WWW, "ANY") == 0


def test_forwarding_off_refuses(start_daemon: Start, upstream: Upstream) -> None:
    d = start_daemon(load_example("static.yaml"))
    assert ask(d, WWW, "A").rcode() == dns.rcode.REFUSED
    assert upstream.count(WWW) == 0


def test_concurrency_cap(start_daemon: Start, upstream: Upstream) -> None:
    upstream.delay = 0.4
    d = start_daemon(forwarding(upstream, max_concurrent=1, cache_size=0, timeout="2s"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(ask, d, WWW, "A")
        time.sleep(0.1)  # let the first one take the only slot (not synchronisation of results)
        capped = ask(d, "other.example.test.", "A")
        assert capped.rcode() == dns.rcode.SERVFAIL
        assert addresses(slow.result()) == ["192.0.2.10"]


def test_resolv_conf_excludes_own_addresses(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# comment\nsearch svc.cluster.local\nnameserver 127.0.0.1\nnameserver 192.0.2.53 # x\n"
        "nameserver fe80::1%eth0\noptions ndots:5\nnameserver 192.0.2.53\n"
    )
    assert resolv_conf_upstreams(str(conf), exclude=["127.0.0.1"]) == (
        ("192.0.2.53", 53),
        ("fe80::1", 53),
    )
    assert resolv_conf_upstreams(str(tmp_path / "missing")) == ()


def test_malformed_upstream_reply_is_a_failure(start_daemon: Start) -> None:
    """An upstream answering garbage is skipped like a dead one."""
    junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    junk.bind(("127.0.0.5", 0))
    junk.settimeout(5)
    try:
        data = load_example("static.yaml")
        data["dns"]["forward"] = {
            "upstreams": [f"127.0.0.5:{junk.getsockname()[1]}"],
            "timeout": "300ms",
        }
        d = start_daemon(data)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reply = pool.submit(ask, d, WWW, "A")
            query, addr = junk.recvfrom(512)
            junk.sendto(query[:2] + b"\x81\x80" + b"\x00\x01\x00\x05" + b"\xff" * 10, addr)
            assert reply.result().rcode() == dns.rcode.SERVFAIL
    finally:
        junk.close()


def test_upstream_query_is_validated(upstream: Upstream) -> None:
    """Plain dnspython sanity check of the fake upstream itself."""
    q = dns.message.make_query(WWW, "A")
    reply = dns.query.udp(q, upstream.host, port=upstream.port, timeout=2)
    assert addresses(reply) == ["192.0.2.10"]
