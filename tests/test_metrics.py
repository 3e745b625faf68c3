"""Metrics and status over HTTP: a real daemon, real DNS and gRPC clients, real
HTTP GETs, and /metrics parsed with prometheus_client's own parsers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import dns.message
import dns.opcode
import dns.query
import dns.rcode
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from resolverd.api.v1 import resolver_pb2 as pb
from resolverd.config import ConfigError, MetricsConfig, parse_config
from resolverd.dns.forward import Forwarder
from resolverd.metrics import MetricsServer
from resolverd.model import Instance
from resolverd.table import health_status
from tests.conftest import DaemonThread, config_from, load_example
from tests.test_dns import ask, inst, raw_udp
from tests.test_rpc import code_of, stub
from tests.upstream import Upstream

T = TypeVar("T")
Start = Callable[[dict[str, Any]], DaemonThread]
Serve = Callable[[dict[str, Any]], tuple[DaemonThread, MetricsServer]]
D = "resolverd.internal."
Z = "resolverd.internal."  # the zone label of names under the default domain
WWW = "www.example.test."


# -- helpers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eventually(check: Callable[[], T], *, timeout: float = 5.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what} (last: {result!r})")
        time.sleep(0.02)


def get(
    server: MetricsServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    assert server.address is not None
    host, port = server.address
    request = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


Labels = tuple[tuple[str, str], ...]


class Scrape:
    """One /metrics page, parsed by prometheus_client: samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                self.samples.setdefault(sample.name, {})[labels] = sample.value

    def series(self, name: str, *drop: str) -> dict[Labels, float]:
        """Every sample of `name` (without the `drop` labels, summed over them)."""
        out: dict[Labels, float] = {}
        for labels, value in self.samples.get(name, {}).items():
            kept = tuple((k, v) for k, v in labels if k not in drop)
            out[kept] = out.get(kept, 0.0) + value
        return out

    def value(self, name: str, **labels: str) -> float:
        return self.samples[name][tuple(sorted(labels.items()))]


def scrape(server: MetricsServer) -> Scrape:
    status, content_type, body = get(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return Scrape(body)


def L(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


@pytest.fixture
def serve(start_daemon: Start) -> Iterator[Serve]:
    """A daemon, and a MetricsServer around its components on 127.0.0.1:0,
    started on the daemon's loop as the daemon starts its own."""
    started: list[tuple[DaemonThread, MetricsServer]] = []

    def start(data: dict[str, Any]) -> tuple[DaemonThread, MetricsServer]:
        d = start_daemon({**data, "metrics": {"listen": "127.0.0.1:0"}})
        daemon = d.daemon
        server = d.call(
            lambda: MetricsServer(
                config=daemon.config,
                table=daemon.table,
                answerer=daemon.answerer,
                forwarder=daemon.forwarder,
                tracker=daemon.tracker,
                health=daemon.health,
                grpc=daemon.rpc.metrics,
            )
        )
        d.run(server.start())
        started.append((d, server))
        return d, server

    yield start
    for d, server in started:
        if not d.loop.is_closed():
            d.run(server.stop())


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream("127.0.0.1")
    up.add(f"{WWW} 300 IN A 192.0.2.10")
    up.nxdomain.add("nope.example.test.")
    yield up
    up.close()


def zones(up: Upstream) -> dict[str, Any]:
    """web (round robin: the transport's inlined path), sticky (ip_hash: a
    variant per client), forwarding to `up` for 127.0.0.1 only."""
    return {
        "service_discovery": {
            "provider": "static",
            "static_services": [inst(1), inst(2), inst(1, "sticky"), inst(2, "sticky")],
            "load_balancer": {"algorithm": "round_robin"},
        },
        "load_balancing": {"strategies": {"sticky": {"algorithm": "ip_hash"}}},
        "dns": {"forward": {"upstreams": [up.address], "allow": ["127.0.0.1/32"], "timeout": "2s"}},
    }


def query_mix(d: DaemonThread) -> None:
    """24 queries over every way resolverd answers (tallied in test_dns_counts_exact)."""
    for _ in range(3):
        assert ask(d, f"web.{D}").rcode() == dns.rcode.NOERROR
    assert ask(d, f"WEB.{D}").rcode() == dns.rcode.NOERROR  # cached, other letter case
    for _ in range(2):
        assert ask(d, f"_web._tcp.{D}", "SRV").rcode() == dns.rcode.NOERROR
        assert ask(d, f"nope.{D}").rcode() == dns.rcode.NXDOMAIN
        assert ask(d, f"sticky.{D}").rcode() == dns.rcode.NOERROR
        assert ask(d, f"web.{D}", tcp=True).rcode() == dns.rcode.NOERROR
        assert ask(d, f"web.{D}", rdclass="CH").rcode() == dns.rcode.REFUSED  # cached
    two_questions = b"\x12\x34\x01\x00\x00\x02" + bytes(6) + b"\x00\x00\x01\x00\x01" * 2
    assert raw_udp(d, two_questions) is not None  # FORMERR
    assert raw_udp(d, b"\x12\x35\x01\x00\x00\x01" + bytes(6) + b"\x05ab") is not None  # FORMERR
    status = dns.message.make_query(f"web.{D}", "A")
    status.set_opcode(dns.opcode.STATUS)
    reply = raw_udp(d, status.to_wire())
    assert reply is not None and reply[3] & 0xF == dns.rcode.NOTIMP
    for _ in range(3):
        assert ask(d, WWW).rcode() == dns.rcode.NOERROR  # forwarded, then the cache
    assert ask(d, WWW, tcp=True).rcode() == dns.rcode.NOERROR  # the cache, over TCP
    assert ask(d, "nope.example.test.").rcode() == dns.rcode.NXDOMAIN  # forwarded
    assert ask(d, WWW, "ANY").rcode() == dns.rcode.NOERROR  # RFC 8482 HINFO, not forwarded
    # Not allowed to recurse: refused without asking upstream.
    assert ask(d, WWW, source="127.0.0.2").rcode() == dns.rcode.REFUSED


# -- DNS ------------------------------------------------------------------------------


def test_dns_counts_exact(serve: Serve, upstream: Upstream) -> None:
    d, server = serve(zones(upstream))
    query_mix(d)
    m = scrape(server)
    assert m.series("resolverd_dns_requests_total") == {
        L(proto="udp", type="A", zone=Z): 10,  # web 3+1, nope 2, sticky 2, class CH 2
        L(proto="udp", type="SRV", zone=Z): 2,
        L(proto="tcp", type="A", zone=Z): 2,
        L(proto="udp", type="other", zone="dropped"): 3,  # FORMERR 2, NOTIMP 1
        L(proto="udp", type="A", zone="."): 5,  # www 3, nope.example.test 1, refused 1
        L(proto="tcp", type="A", zone="."): 1,
        L(proto="udp", type="ANY", zone="."): 1,
    }
    assert m.series("resolverd_dns_responses_total") == {
        L(rcode="NOERROR", zone=Z): 10,
        L(rcode="NXDOMAIN", zone=Z): 2,
        L(rcode="REFUSED", zone=Z): 2,
        L(rcode="FORMERR", zone="dropped"): 2,
        L(rcode="NOTIMP", zone="dropped"): 1,
        L(rcode="NOERROR", zone="."): 5,
        L(rcode="NXDOMAIN", zone="."): 1,
        L(rcode="REFUSED", zone="."): 1,
    }
    assert m.series("resolverd_cache_hits_total") == {
        L(cache="answer", type="success"): 6,  # web 2+1 (case), SRV 1, sticky 1, TCP 1
        L(cache="answer", type="denial"): 1,
        L(cache="answer", type="error"): 1,  # class CH: REFUSED, cached
        L(cache="forward", type="success"): 3,  # www 2 over UDP, 1 over TCP
        L(cache="forward", type="denial"): 0,
        L(cache="forward", type="error"): 0,
    }
    assert m.series("resolverd_cache_misses_total") == {
        L(cache="answer"): 6,
        L(cache="forward"): 2,
    }
    # hits + misses + replies made without a cache lookup = every query.
    assert sum(m.series("resolverd_dns_requests_total").values()) == 24 == 11 + 8 + 5
    assert m.series("resolverd_dns_request_duration_seconds_count") == {
        L(path="build"): 6,
        L(path="direct"): 5,  # FORMERR 2, NOTIMP 1, HINFO 1, REFUSED 1
        L(path="forward"): 2,
    }
    buckets = m.samples["resolverd_dns_request_duration_seconds_bucket"]
    inf = {labels: v for labels, v in buckets.items() if ("le", "+Inf") in labels}
    assert sorted(inf.values()) == [2, 5, 6]
    assert m.value("resolverd_dns_request_duration_seconds_sum", path="forward") > 0

    to = upstream.address
    assert m.series("resolverd_forward_requests_total") == {L(to=to): 2}
    assert m.series("resolverd_forward_responses_total") == {
        L(to=to, rcode="NOERROR"): 1,
        L(to=to, rcode="NXDOMAIN"): 1,
    }
    assert m.series("resolverd_forward_failures_total") == {}
    assert m.value("resolverd_forward_request_duration_seconds_count", to=to) == 2
    entries = m.series("resolverd_cache_entries")
    assert entries == {L(cache="answer"): 6, L(cache="forward"): 2}
    assert m.types["resolverd_dns_requests"] == "counter"
    assert m.types["resolverd_cache_entries"] == "gauge"
    assert m.types["resolverd_dns_request_duration_seconds"] == "histogram"


def test_counts_survive_cache_drops(serve: Serve, upstream: Upstream) -> None:
    d, server = serve(zones(upstream))
    query_mix(d)
    before = scrape(server)
    daemon = d.daemon

    # A table change drops the answer caches whole; a least-connections
    # change drops one service; the forwarding cache drops entries one by one.
    d.call(
        lambda: daemon.table.replace(
            "runtime", [Instance(id="api-1", name="api", address="127.0.2.1", port=1)]
        )
    )
    d.call(lambda: daemon.answerer.invalidate_service("web"))
    d.call(lambda: [daemon.forwarder.drop(key) for key in list(daemon.forwarder.cache)])
    after = scrape(server)
    for name in (
        "resolverd_dns_requests_total",
        "resolverd_dns_responses_total",
        "resolverd_cache_hits_total",
        "resolverd_cache_misses_total",
        "resolverd_forward_requests_total",
    ):
        assert after.series(name) == before.series(name), name
    assert after.series("resolverd_cache_entries") == {L(cache="answer"): 0, L(cache="forward"): 0}

    # Counting goes on from there: a rebuilt answer is a miss, then hits.
    for _ in range(3):
        ask(d, f"web.{D}")
    again = scrape(server)
    key = dict(proto="udp", type="A", zone=Z)
    assert again.value("resolverd_dns_requests_total", **key) == (
        before.value("resolverd_dns_requests_total", **key) + 3
    )
    assert again.value("resolverd_cache_misses_total", cache="answer") == 7
    assert again.value("resolverd_cache_hits_total", cache="answer", type="success") == 8


def test_counters_survive_a_reload(serve: Serve, upstream: Upstream) -> None:
    """A reload builds a new forwarder and may rebind: counters never go back."""
    d, server = serve(zones(upstream))
    query_mix(d)
    before = scrape(server)
    config = d.daemon.config
    fresh = Forwarder(
        config.dns.forward,
        upstreams=[(upstream.host, upstream.port)],
        allow=["127.0.0.1/32"],
        max_udp_size=1232,
    )
    port = free_port()
    moved = config_from({**zones(upstream), "metrics": {"listen": f"127.0.0.1:{port}"}})
    old_address = server.address
    d.run(server.reconfigure(config=moved, forwarder=fresh, health=None))
    assert server.address == ("127.0.0.1", port)
    after = scrape(server)
    for name in ("resolverd_forward_requests_total", "resolverd_cache_hits_total"):
        assert after.series(name) == before.series(name), name
    assert after.value("resolverd_cache_entries", cache="forward") == 0
    # The old address was let go.
    assert old_address is not None
    with pytest.raises(OSError), socket.create_connection(old_address, timeout=2):
        pass
    site = server._site
    d.run(server.reconfigure(config=moved, forwarder=fresh, health=None))
    assert server._site is site  # the same address: kept, not rebound
    off = config_from({**zones(upstream), "metrics": {"enabled": False}})
    d.run(server.reconfigure(config=off, forwarder=fresh, health=None))
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_unknown_types_share_one_series(serve: Serve) -> None:
    """Clients choose the QTYPE: all but the named ones count as "other", so
    the counters stay as small as the label set whatever is sent."""
    d, server = serve(load_example("static.yaml"))
    for qtype in range(65280, 65300):  # private use
        ask(d, f"user-service.{D}", qtype)
    m = scrape(server)
    assert m.series("resolverd_dns_requests_total") == {L(proto="udp", type="other", zone=Z): 20}
    assert m.series("resolverd_cache_misses_total")[L(cache="answer")] == 20
    assert len(d.daemon.answerer.stat_ids.keys) == 1


def test_openmetrics_when_asked(serve: Serve) -> None:
    d, server = serve(load_example("static.yaml"))
    ask(d, "user-service.", "SRV")
    status, content_type, body = get(
        server, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(body)}
    assert {"resolverd_dns_requests", "resolverd_provider_synced"} <= names


# -- table, health, connections --------------------------------------------------------


def test_provider_and_service_gauges(serve: Serve) -> None:
    d, server = serve(load_example("static.yaml"))
    table = d.daemon.table
    m = scrape(server)
    assert m.series("resolverd_provider_synced") == {
        L(provider="static", type="static"): 1,
        L(provider="registrations", type="registrations"): 1,
    }
    assert m.series("resolverd_provider_stale") == {
        L(provider="static"): 0,
        L(provider="registrations"): 0,
    }
    assert set(m.series("resolverd_provider_stale_age_seconds").values()) == {0}
    assert m.value("resolverd_provider_instances", provider="static") == len(
        table.snapshots()["static"]
    )
    assert m.value("resolverd_ready") == 1
    assert m.value("resolverd_table_revision") == table.view.revision
    status = health_status(table.view)
    want: dict[Labels, float] = {}
    for service, counts in status.items():
        want[L(service=service, health="healthy")] = counts["healthy"]
        want[L(service=service, health="unhealthy")] = counts["unhealthy"]
        want[L(service=service, health="critical")] = counts["critical"]
    assert m.series("resolverd_service_instances") == want
    assert m.value("resolverd_health_checked_instances") == 0

    d.call(lambda: table.mark_stale("static", "backend gone"))
    time.sleep(0.05)  # a measurable age; wall time, as the table's clock is
    m = scrape(server)
    assert m.value("resolverd_provider_stale", provider="static") == 1
    assert m.value("resolverd_provider_stale_age_seconds", provider="static") > 0
    assert m.value("resolverd_provider_synced", provider="static", type="static") == 1


def test_connections_open_only_for_instances_in_the_table(serve: Serve) -> None:
    d, server = serve({"service_discovery": {"provider": "static", "static_services": [inst(1)]}})
    tracker = d.daemon.tracker
    d.call(lambda: [tracker.opened("web-1") for _ in range(3)])
    d.call(lambda: tracker.opened("gone-instance"))
    m = scrape(server)
    assert m.series("resolverd_connections_open") == {L(service="web", instance="web-1"): 3}


def test_health_services_healthz_readyz(serve: Serve) -> None:
    d, server = serve(load_example("static.yaml"))
    status, content_type, body = get(server, "/health/services")
    assert status == 200 and content_type.startswith("application/json")
    assert json.loads(body) == health_status(d.daemon.table.view)
    assert json.loads(body)["user-service"] == {
        "total": 2,
        "healthy": 2,
        "unhealthy": 0,
        "critical": 0,
    }
    assert get(server, "/healthz")[::2] == (200, "OK")
    assert get(server, "/readyz")[::2] == (200, "OK")
    assert get(server, "/nothing-here")[0] == 404


def test_readyz_until_every_provider_synced(serve: Serve) -> None:
    """An etcd provider whose server is not there: not ready, and /readyz says
    which provider; once it has synced, ready."""
    d, server = serve(
        {
            "service_discovery": {
                "provider": "etcd",
                "etcd": {"endpoints": [f"127.0.0.1:{free_port()}"], "reconnect_max": "500ms"},
            }
        }
    )
    status, _, body = get(server, "/readyz")
    assert status == 503 and "etcd: not synced" in body
    assert get(server, "/healthz")[0] == 200  # alive all the same
    m = eventually(
        lambda: (s := scrape(server)).value("resolverd_provider_stale", provider="etcd") == 1 and s,
        what="etcd reported unreachable",
    )
    assert m.value("resolverd_provider_synced", provider="etcd", type="etcd") == 0
    assert m.value("resolverd_ready") == 0
    assert m.value("resolverd_provider_stale_age_seconds", provider="etcd") >= 0

    d.call(lambda: d.daemon.table.replace("etcd", []))  # as a first sync does
    assert get(server, "/readyz")[::2] == (200, "OK")
    m = scrape(server)
    assert m.value("resolverd_provider_synced", provider="etcd", type="etcd") == 1
    assert m.value("resolverd_ready") == 1


# -- gRPC -------------------------------------------------------------------------------

RESOLVER = "resolverd.api.v1.Resolver"


async def test_grpc_counters(serve: Serve) -> None:
    d, server = serve(load_example("static.yaml"))
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        resolver = stub(d, channel)
        await resolver.Resolve(pb.ResolveRequest(service="user-service"))
        code, _ = await code_of(resolver.Resolve(pb.ResolveRequest(service="nope")))
        assert code == grpc.StatusCode.NOT_FOUND
        code, _ = await code_of(resolver.Resolve(pb.ResolveRequest(service="")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(service=""))
        watch = resolver.Watch(pb.WatchRequest(service="user-service"))
        await watch.read()
        watch.cancel()

    def handled() -> dict[Labels, float]:
        return scrape(server).series("resolverd_grpc_server_handled_total")

    unary = dict(grpc_type="unary", grpc_service=RESOLVER, grpc_method="Resolve")
    want = {
        L(**unary, grpc_code="OK"): 1,
        L(**unary, grpc_code="NotFound"): 1,
        L(**unary, grpc_code="InvalidArgument"): 1,
        L(
            grpc_type="unary",
            grpc_service="grpc.health.v1.Health",
            grpc_method="Check",
            grpc_code="OK",
        ): 1,
        L(
            grpc_type="server_stream",
            grpc_service=RESOLVER,
            grpc_method="Watch",
            grpc_code="Canceled",
        ): 1,
    }
    await asyncio.to_thread(
        eventually, lambda: handled() == want, what="the cancelled Watch counted"
    )
    m = scrape(server)
    assert m.value("resolverd_grpc_server_started_total", **unary) == 3
    assert m.value("resolverd_grpc_server_handling_seconds_count", **unary) == 3


async def test_grpc_unknown_methods_are_not_counted(serve: Serve) -> None:
    d, server = serve(load_example("static.yaml"))
    async with grpc.aio.insecure_channel(d.daemon.rpc.address) as channel:
        call = channel.unary_unary(f"/{RESOLVER}/NoSuchMethod")(b"")
        code, _ = await code_of(call)
        assert code == grpc.StatusCode.UNIMPLEMENTED
    assert scrape(server).series("resolverd_grpc_server_started_total") == {}


# -- config and binding -----------------------------------------------------------------

BASE: dict[str, Any] = {"service_discovery": {"provider": "static"}}


@pytest.mark.parametrize(
    ("metrics", "listen"),
    [
        (None, ("127.0.0.1", 9153)),
        ({}, ("127.0.0.1", 9153)),
        ({"listen": "127.0.0.1:9999"}, ("127.0.0.1", 9999)),
        ({"listen": "[::1]"}, ("::1", 9153)),
        ({"listen": "0.0.0.0:9153"}, ("0.0.0.0", 9153)),
        ({"listen": None}, None),
        ({"enabled": False}, None),
        ({"enabled": False, "listen": "127.0.0.1:9999"}, None),
        ({"enabled": True}, ("127.0.0.1", 9153)),
    ],
)
def test_metrics_config(metrics: Any, listen: tuple[str, int] | None) -> None:
    data = dict(BASE) if metrics is None else {**BASE, "metrics": metrics}
    assert parse_config(data, file="x.yaml").metrics == MetricsConfig(listen=listen)


@pytest.mark.parametrize(
    ("metrics", "extra", "message"),
    [
        ({"port": 9153}, {}, "x.yaml: metrics.port: unknown key"),
        ("127.0.0.1:9153", {}, "x.yaml: metrics: expected a mapping, got '127.0.0.1:9153'"),
        ({"listen": "localhost:9153"}, {}, "x.yaml: metrics.listen: host 'localhost' in"),
        ({"listen": "127.0.0.1:99999"}, {}, "x.yaml: metrics.listen: port 99999 in"),
        ({"listen": 9153}, {}, "x.yaml: metrics.listen: expected a string, got 9153"),
        ({"enabled": "yes"}, {}, "x.yaml: metrics.enabled: expected true or false, got 'yes'"),
        (
            {"enabled": True, "listen": None},
            {},
            "x.yaml: metrics.listen: null turns metrics off, but enabled is true",
        ),
        (
            {"listen": "127.0.0.1:50051"},
            {},
            "x.yaml: metrics.listen: 127.0.0.1:50051 is also api.listen",
        ),
        (
            {"listen": "127.0.0.1:5354"},
            {"dns": {"listen": "127.0.0.1:5354"}},
            "x.yaml: metrics.listen: 127.0.0.1:5354 is also dns.listen_tcp",
        ),
    ],
)
def test_metrics_config_errors_are_located(
    metrics: Any, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **extra, "metrics": metrics}, file="x.yaml")
    assert str(info.value).startswith(message)


def test_bind_error_is_a_clear_oserror(start_daemon: Start) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = start_daemon({**load_example("static.yaml"), "metrics": {"listen": "127.0.0.1:0"}})
        config = config_from(
            {**load_example("static.yaml"), "metrics": {"listen": f"127.0.0.1:{port}"}}
        )
        server = d.call(
            lambda: MetricsServer(
                config=config,
                table=d.daemon.table,
                answerer=d.daemon.answerer,
                forwarder=d.daemon.forwarder,
                tracker=d.daemon.tracker,
                health=None,
            )
        )
        with pytest.raises(OSError, match=f"metrics cannot listen on 127.0.0.1:{port}: "):
            d.run(server.start())
        assert server.address is None


def test_disabled_serves_nothing(start_daemon: Start) -> None:
    d = start_daemon({**load_example("static.yaml"), "metrics": {"enabled": False}})
    server = d.call(
        lambda: MetricsServer(
            config=d.daemon.config,
            table=d.daemon.table,
            answerer=d.daemon.answerer,
            forwarder=d.daemon.forwarder,
            tracker=d.daemon.tracker,
            health=None,
        )
    )
    d.run(server.start())
    assert server.address is None
    d.run(server.stop())
