"""The Kubernetes provider end to end: a real daemon whose provider drives the
official client against the fake API server (tests/fake_kubernetes.py), and
answers read back over DNS with dnspython and dig. Plus the pure parts
(conditions, parsing, the join) table-driven, and the fake itself checked
against the typed client."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

import resolverd.providers.kubernetes as k8s
from resolverd.model import Health, Instance
from resolverd.table import Change, ProviderState, View
from tests.conftest import DaemonThread, load_example, need
from tests.fake_kubernetes import (
    FakeKubernetes,
    Obj,
    endpoint,
    endpoint_slice,
    port,
    service,
)
from tests.test_dns import addresses, ask, srv_targets

Start = Callable[[dict[str, Any]], DaemonThread]
T = TypeVar("T")
NS = "production"
D = "resolverd.internal."


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def fake() -> Iterator[FakeKubernetes]:
    f = FakeKubernetes()
    yield f
    f.close()


def k8s_config_for(fake: FakeKubernetes, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    section: dict[str, Any] = {
        "provider": "kubernetes",
        "namespace": NS,
        "kubeconfig": str(kubeconfig),
        "in_cluster": False,
        "reconnect_max": "300ms",
        "watch_timeout": "5s",
    }
    if "namespaces" in extra:
        del section["namespace"]
    section.update(extra)
    return {"service_discovery": section}


def eventually(check: Callable[[], T], timeout: float = 5.0) -> T:
    """Poll `check` until it stops failing an assertion (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def a(d: DaemonThread, name: str) -> list[str]:
    return sorted(addresses(ask(d, f"{name}.{D}", "A")))


def expect_a(d: DaemonThread, name: str, want: list[str]) -> None:
    def check() -> None:
        assert a(d, name) == sorted(want)

    eventually(check)


def snapshot(d: DaemonThread) -> set[tuple[str, str, int, str, str]]:
    """The provider's snapshot as (service, address, port, port name, health)."""
    return d.call(
        lambda: {
            (i.name, i.address, i.port, i.port_name, i.health.value)
            for i in d.daemon.table.snapshots().get("kubernetes", ())
        }
    )


def instances(d: DaemonThread, name: str) -> tuple[Instance, ...]:
    return d.call(lambda: d.daemon.table.view.instances(name))


def provider_state(d: DaemonThread) -> ProviderState:
    return d.call(lambda: d.daemon.table.states()["kubernetes"])


def provider(d: DaemonThread) -> k8s.KubernetesProvider:
    found = [p for p in d.daemon.providers if isinstance(p, k8s.KubernetesProvider)]
    assert len(found) == 1
    return found[0]


def put_web(
    fake: FakeKubernetes,
    *addrs: str,
    name: str = "web",
    namespace: str = NS,
    annotations: dict[str, str] | None = None,
    ports: list[Obj] | None = None,
) -> None:
    fake.put_service(namespace, service(name, annotations=annotations))
    fake.put_slice(
        namespace,
        endpoint_slice(
            f"{name}-abcde",
            name,
            endpoints=[endpoint(x) for x in addrs],
            ports=ports or [port("http", 8080)],
        ),
    )


class Sampler:
    """Asks DNS for a name over and over on a thread; every answer must
    contain `required`. Proves the table is not emptied during a restart."""

    def __init__(self, d: DaemonThread, name: str, required: str) -> None:
        self.d, self.name, self.required = d, name, required
        self.answers: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.answers.append(a(self.d, self.name))

    def stop(self) -> list[list[str]]:
        self._stop.set()
        self._thread.join(timeout=10)
        assert self.answers, "no DNS answers sampled"
        missing = [x for x in self.answers if self.required not in x]
        assert not missing, f"{self.required} missing from {len(missing)} answers: {missing[:3]}"
        return self.answers


def record_changes(d: DaemonThread) -> list[Change]:
    changes: list[Change] = []

    def on_change(view: View, change: Change) -> None:
        changes.append(change)

    d.call(lambda: d.daemon.table.subscribe(on_change))
    return changes


def lists_since(fake: FakeKubernetes, since: int) -> list[str]:
    return [r.resource for r in fake.requests()[since:] if not r.watch]


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("conditions", "health"),
    [
        ({"ready": True, "serving": True, "terminating": False}, Health.HEALTHY),
        ({}, Health.HEALTHY),  # unknown is ready, says the API
        ({"serving": True}, Health.HEALTHY),
        ({"ready": False, "serving": True, "terminating": False}, Health.UNHEALTHY),
        ({"ready": False, "serving": False, "terminating": False}, Health.UNHEALTHY),
        ({"ready": False, "serving": True, "terminating": True}, None),
        ({"ready": False, "serving": False, "terminating": True}, None),
    ],
)
def test_endpoint_health(conditions: dict[str, bool], health: Health | None) -> None:
    assert k8s.endpoint_health(conditions) is health


def test_endpoint_health_rejects_non_booleans() -> None:
    with pytest.raises(ValueError, match=r"conditions\.ready"):
        k8s.endpoint_health({"ready": "yes"})


def test_parse_slice_skips_only_the_malformed_parts() -> None:
    raw = endpoint_slice(
        "web-1",
        "web",
        endpoints=[
            endpoint("127.0.1.1", zone="z1", node="n1", pod="web-0"),
            {"addresses": []},
            {"addresses": ["127.0.1.3"], "conditions": {"ready": "yes"}},
            "nonsense",
        ],
        ports=[port("http", 8080), port("zero", 0), port("none", None), port("x", 1, "ICMP")],
    )
    parsed = k8s.parse_slice(NS, raw)
    assert parsed == k8s.Slice(
        NS,
        "web-1",
        "web",
        (k8s.Endpoint("127.0.1.1", Health.HEALTHY, zone="z1", node="n1", pod="web-0"),),
        (k8s.Port("http", 8080, "tcp"),),
    )
    assert k8s.parse_slice(NS, {"metadata": {}}) is None
    broken = k8s.parse_slice(NS, {"metadata": {"name": "b"}, "addressType": "IPv4", "ports": 3})
    assert broken == k8s.Slice(NS, "b", None)


def test_parse_service_annotations() -> None:
    names = {"version": "app.version", "weight": "w", "region": "r", "tags": "t"}
    raw = service("web", annotations={"app.version": "2.0.0", "w": " 5 ", "t": "a, b,,c", "r": ""})
    assert k8s.parse_service(NS, raw, names) == k8s.Service(
        NS, "web", version="2.0.0", weight="5", region=None, tags=("a", "b", "c")
    )
    assert k8s.parse_service(NS, service("web"), names) == k8s.Service(NS, "web")


def test_build_instances_join() -> None:
    svc = k8s.Service(NS, "web", version="2.0.0", weight="3", region="eu", tags=("canary",))
    ep = k8s.Endpoint("127.0.1.1", Health.HEALTHY, zone="eu-1a")
    gone = k8s.Endpoint("127.0.1.2", None)
    ports = (k8s.Port("http", 8080, "tcp"), k8s.Port("dns", 53, "udp"))
    slices = [
        k8s.Slice(NS, "web-a", "web", (ep, gone), ports),
        k8s.Slice(NS, "web-b", "web", (ep,), ports),  # the same endpoint while it moves
        k8s.Slice(NS, "other-a", "other", (ep,), ports),  # no such Service
        k8s.Slice("staging", "web-a", "web", (ep,), ports),  # other namespace's web
    ]
    built, problems = k8s.build_instances([svc], slices, provider="kubernetes")
    assert problems == set()
    assert [(i.id, i.port, i.port_name, i.protocol) for i in built] == [
        ("production/web/127.0.1.1/http", 8080, "http", "tcp"),
        ("production/web/127.0.1.1/dns", 53, "dns", "udp"),
    ]
    first = built[0]
    assert (first.version, first.tags, first.health) == ("2.0.0", ("canary",), Health.HEALTHY)
    assert dict(first.metadata) == {
        "namespace": NS,
        "slice": "web-a",
        "weight": "3",
        "region": "eu",
        "zone": "eu-1a",
    }
    bad = k8s.Service(NS, "not_a_label")
    built, problems = k8s.build_instances(
        [bad], [k8s.Slice(NS, "s", "not_a_label", (ep,), ports[:1])], provider="kubernetes"
    )
    assert built == [] and len(problems) == 1 and "production/not_a_label" in problems.pop()


# ----------------------------------------------------------------- the fake, by the real client


def test_fake_speaks_the_client_protocol(fake: FakeKubernetes, tmp_path: Path) -> None:
    """The fake's objects deserialize into the client's models, pages chain by
    continue, watches stream typed events and bookmarks, and 410 comes both ways."""
    for i in range(5):
        fake.put_service(NS, service(f"svc{i}"))
    put_web(fake, "127.0.1.1")
    configuration = k8s_client.Configuration()
    k8s_config.load_kube_config(
        config_file=str(fake.write_kubeconfig(tmp_path / "kc")),
        client_configuration=configuration,
    )
    api = k8s_client.ApiClient(configuration)
    core, discovery = k8s_client.CoreV1Api(api), k8s_client.DiscoveryV1Api(api)
    page = core.list_namespaced_service(NS, limit=2)
    names = [s.metadata.name for s in page.items]
    first_rv = page.metadata.resource_version
    fake.put_service(NS, service("late"))  # not in the paged list's snapshot
    while page.metadata._continue:
        page = core.list_namespaced_service(NS, limit=2, _continue=page.metadata._continue)
        assert page.metadata.resource_version == first_rv
        names += [s.metadata.name for s in page.items]
    assert names == ["svc0", "svc1", "svc2", "svc3", "svc4", "web"]
    slices = discovery.list_namespaced_endpoint_slice(NS)
    assert slices.items[0].endpoints[0].conditions.ready is True
    assert slices.items[0].ports[0].port == 8080

    expired = core.list_namespaced_service(NS, limit=2)
    fake.call(fake.state.expire_continue_tokens)
    with pytest.raises(ApiException) as gone:
        core.list_namespaced_service(NS, limit=2, _continue=expired.metadata._continue)
    assert gone.value.status == 410

    fake.call(lambda: setattr(fake.state, "bookmark_interval", 0.1))
    rv = slices.metadata.resource_version
    fake.delete_slice(NS, "web-abcde")
    seen = [
        (e["type"], type(e["object"]).__name__)
        for e in k8s_watch.Watch().stream(
            discovery.list_namespaced_endpoint_slice,
            NS,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=1,
        )
    ]
    assert seen[0] == ("DELETED", "V1EndpointSlice")
    assert ("BOOKMARK", "dict") in seen
    fake.call(fake.state.compact)
    for mode in ("http", "event"):
        fake.call(lambda m=mode: setattr(fake.state, "gone_mode", m))
        with pytest.raises(ApiException) as gone:
            for _ in k8s_watch.Watch().stream(
                discovery.list_namespaced_endpoint_slice, NS, resource_version=rv, timeout_seconds=1
            ):
                pass
        assert gone.value.status == 410
    api.close()


# --------------------------------------------------------------------------- end to end


def test_initial_sync_paged(
    fake: FakeKubernetes, start_daemon: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(k8s, "PAGE_SIZE", 2)
    for i in range(1, 6):
        put_web(fake, f"127.0.1.{i}", name=f"svc{i}")
    d = start_daemon(k8s_config_for(fake, tmp_path))
    for i in range(1, 6):
        expect_a(d, f"svc{i}", [f"127.0.1.{i}"])
    assert provider_state(d).synced and not provider_state(d).stale
    lists = [r for r in fake.requests() if not r.watch]
    assert {r.query.get("limit") for r in lists} == {"2"}
    assert sum("continue" in r.query for r in lists) == 4  # 3 pages for each of the two kinds
    watches = [r for r in fake.requests() if r.watch]
    assert watches and all(r.query["allowWatchBookmarks"] == "true" for r in watches)
    assert all(r.query["timeoutSeconds"] == "5" for r in watches)


def test_add_change_remove(fake: FakeKubernetes, start_daemon: Start, tmp_path: Path) -> None:
    put_web(fake, "127.0.1.1")
    d = start_daemon(k8s_config_for(fake, tmp_path))
    expect_a(d, "web", ["127.0.1.1"])
    put_web(fake, "127.0.2.1", name="api")  # add
    expect_a(d, "api", ["127.0.2.1"])
    put_web(fake, "127.0.1.1", "127.0.1.2")  # change: one more endpoint
    expect_a(d, "web", ["127.0.1.1", "127.0.1.2"])
    put_web(fake, "127.0.1.2", annotations={"app.version": "2.0.0"})  # change
    expect_a(d, "v2-0-0.web", ["127.0.1.2"])
    assert a(d, "web") == ["127.0.1.2"]
    fake.delete_slice(NS, "api-abcde")  # remove: a Service without slices has no instances
    expect_a(d, "api", [])
    assert ask(d, f"api.{D}", "A").rcode() == 3  # NXDOMAIN
    fake.delete_service(NS, "web")
    expect_a(d, "web", [])
    assert snapshot(d) == set()
    assert provider_state(d).synced and not provider_state(d).stale


def test_endpoint_conditions(fake: FakeKubernetes, start_daemon: Start, tmp_path: Path) -> None:
    fake.put_service(NS, service("web"))
    fake.put_slice(
        NS,
        endpoint_slice(
            "web-abcde",
            "web",
            endpoints=[
                endpoint("127.0.1.1"),  # ready
                endpoint("127.0.1.2", ready=False, serving=True),  # serving, not ready
                endpoint("127.0.1.3", ready=False),  # neither
                endpoint("127.0.1.4", ready=False, serving=True, terminating=True),  # leaving
                {"addresses": ["127.0.1.5"], "conditions": {}},  # unknown: ready
            ],
            ports=[port("http", 8080)],
        ),
    )
    d = start_daemon(k8s_config_for(fake, tmp_path))
    expect_a(d, "web", ["127.0.1.1", "127.0.1.5"])
    health = {i.address: i.health for i in instances(d, "web")}
    assert health == {
        "127.0.1.1": Health.HEALTHY,
        "127.0.1.2": Health.UNHEALTHY,
        "127.0.1.3": Health.UNHEALTHY,
        "127.0.1.5": Health.HEALTHY,
    }
    # The ready one starts terminating: it leaves the table, not just DNS.
    fake.put_slice(
        NS,
        endpoint_slice(
            "web-abcde",
            "web",
            endpoints=[
                endpoint("127.0.1.1", ready=False, serving=True, terminating=True),
                endpoint("127.0.1.2"),
            ],
            ports=[port("http", 8080)],
        ),
    )
    expect_a(d, "web", ["127.0.1.2"])
    assert [i.address for i in instances(d, "web")] == ["127.0.1.2"]


def test_named_ports_srv_with_dig(
    fake: FakeKubernetes, start_daemon: Start, tmp_path: Path
) -> None:
    put_web(
        fake,
        "127.0.1.1",
        "127.0.1.2",
        ports=[port("http", 8080), port("dns", 53, "UDP"), port("metrics", 9090)],
    )
    d = start_daemon(k8s_config_for(fake, tmp_path))
    expect_a(d, "web", ["127.0.1.1", "127.0.1.2"])
    out = subprocess.run(
        [need("dig"), "@127.0.0.1", "-p", str(d.udp[1]), "SRV", f"_http._tcp.web.{D}", "+short"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert sorted(int(r[2]) for r in rows) == [8080, 8080], out
    assert all(r[3].endswith(f".web.instance.{D}") for r in rows), out
    udp = srv_targets(ask(d, f"_dns._udp.web.{D}", "SRV"))
    assert sorted(p for _, p, _ in udp) == [53, 53]
    assert ask(d, f"_dns._tcp.web.{D}", "SRV").rcode() == 3
    assert sorted(p for _, p, _ in srv_targets(ask(d, f"_metrics._tcp.web.{D}", "SRV"))) == [
        9090,
        9090,
    ]


def test_annotations_and_zone(fake: FakeKubernetes, start_daemon: Start, tmp_path: Path) -> None:
    fake.put_service(
        NS,
        service(
            "web",
            annotations={
                "app.version": "2.1.0",
                "gateway.weight": "5",
                "gateway.region": "eu-west",
                "gateway.tags": "canary, blue",
            },
        ),
    )
    fake.put_slice(
        NS,
        endpoint_slice(
            "web-abcde",
            "web",
            endpoints=[endpoint("127.0.1.1", zone="eu-west-1a", node="node-1", pod="web-0")],
            ports=[port("http", 8080)],
        ),
    )
    put_web(fake, "127.0.2.1", name="plain")
    config = k8s_config_for(fake, tmp_path, annotations={"tags": "gateway.tags"})
    d = start_daemon(config)
    expect_a(d, "v2-1-0.web", ["127.0.1.1"])
    assert a(d, "v1-0-0.web") == []
    assert a(d, "canary.web.service") == ["127.0.1.1"]
    assert a(d, "v1-0-0.plain") == ["127.0.2.1"]  # no annotation: the default version
    (inst,) = instances(d, "web")
    assert (inst.version, inst.tags) == ("2.1.0", ("canary", "blue"))
    assert dict(inst.metadata) == {
        "namespace": NS,
        "slice": "web-abcde",
        "weight": "5",
        "region": "eu-west",
        "zone": "eu-west-1a",
        "node": "node-1",
        "pod": "web-0",
    }
    # An annotation change on the Service alone reaches every instance.
    fake.put_service(NS, service("web", annotations={"app.version": "3.0.0"}))
    expect_a(d, "v3-0-0.web", ["127.0.1.1"])
    (inst,) = instances(d, "web")
    assert inst.tags == () and "weight" not in inst.metadata


def test_bookmark_moves_the_resume_point(
    fake: FakeKubernetes, start_daemon: Start, tmp_path: Path
) -> None:
    """After a bookmark the provider resumes from the bookmark's resourceVersion:
    even with the history up to it compacted, no 410 and no list follow."""
    put_web(fake, "127.0.1.1")
    fake.call(lambda: setattr(fake.state, "bookmark_interval", None))
    d = start_daemon(k8s_config_for(fake, tmp_path))
    expect_a(d, "web", ["127.0.1.1"])
    eventually(lambda: _assert(fake.watchers() == 2))
    for i in range(5):  # writes the production watches never see
        fake.call(lambda i=i: fake.state.put("services", "elsewhere", service(f"x{i}")))

    def step() -> tuple[int, int]:
        since = len(fake.state.requests)
        mark = fake.state.bookmark()
        fake.state.close_watches()
        fake.state.compact()
        return since, mark

    since, mark = fake.call(step)

    def rewatched() -> None:
        new = fake.requests()[since:]
        assert {(r.resource, r.query.get("resourceVersion")) for r in new if r.watch} == {
            ("services", str(mark)),
            ("endpointslices", str(mark)),
        }

    eventually(rewatched)
    assert lists_since(fake, since) == []
    assert set(provider(d).resource_versions().values()) == {str(mark)}
    assert a(d, "web") == ["127.0.1.1"]


def _assert(condition: bool) -> None:
    assert condition


@pytest.mark.parametrize("gone_mode", ["http", "event"])
def test_410_relists_and_keeps_serving(
    fake: FakeKubernetes, start_daemon: Start, tmp_path: Path, gone_mode: str
) -> None:
    """410 as the HTTP status of a re-watch, or as an ERROR event in the open
    stream: the provider lists again and converges, and `web` stays
    answerable throughout (the table is never dropped)."""
    put_web(fake, "127.0.1.1", "127.0.1.2")
    d = start_daemon(k8s_config_for(fake, tmp_path))
    expect_a(d, "web", ["127.0.1.1", "127.0.1.2"])
    eventually(lambda: _assert(fake.watchers() == 2))
    changes = record_changes(d)
    sampler = Sampler(d, "web", "127.0.1.1")

    def step() -> int:
        state = fake.state
        since = len(state.requests)
        state.gone_mode = "http" if gone_mode == "http" else "event"
        state.list_delay = 0.3  # a slow list, while DNS is being asked
        if gone_mode == "http":
            state.close_watches()  # the re-watch from the old resourceVersion gets HTTP 410
        else:
            state.send_error(410)  # ERROR event in the open stream
        # Changed while the watch is down, and the history compacted: only a
        # new list can see it.
        state.put(
            "endpointslices",
            NS,
            endpoint_slice(
                "web-abcde",
                "web",
                endpoints=[endpoint("127.0.1.1"), endpoint("127.0.1.3")],
                ports=[port("http", 8080)],
            ),
        )
        state.compact()
        return since

    since = fake.call(step)
    expect_a(d, "web", ["127.0.1.1", "127.0.1.3"])
    sampler.stop()
    assert "endpointslices" in lists_since(fake, since)
    if gone_mode == "http":
        assert any(r.watch for r in fake.requests()[since:])
    for change in changes:
        assert "127.0.1.1" not in {i.address for i in change.deregistered}
    state = provider_state(d)
    assert state.synced and not state.stale
    assert snapshot(d) == {
        ("web", "127.0.1.1", 8080, "http", "healthy"),
        ("web", "127.0.1.3", 8080, "http", "healthy"),
    }


def test_api_server_down_stale_then_converges(
    fake: FakeKubernetes, start_daemon: Start, tmp_path: Path
) -> None:
    put_web(fake, "127.0.1.1", "127.0.1.2")
    put_web(fake, "127.0.2.1", name="api")
    d = start_daemon(k8s_config_for(fake, tmp_path))
    expect_a(d, "web", ["127.0.1.1", "127.0.1.2"])
    expect_a(d, "api", ["127.0.2.1"])

    fake.stop()
    eventually(lambda: _assert(provider_state(d).stale))
    assert provider_state(d).error
    # The backend is gone: the last snapshot keeps being served.
    for _ in range(5):
        assert a(d, "web") == ["127.0.1.1", "127.0.1.2"]
        assert a(d, "api") == ["127.0.2.1"]
    # Changes while it is away.
    fake.call(
        lambda: fake.state.put(
            "endpointslices",
            NS,
            endpoint_slice(
                "web-abcde",
                "web",
                endpoints=[endpoint("127.0.1.1"), endpoint("127.0.1.3", ready=False)],
                ports=[port("http", 8080)],
            ),
        )
    )
    fake.delete_service(NS, "api")
    fake.call(fake.state.compact)
    put_web(fake, "127.0.3.1", name="db")
    assert a(d, "web") == ["127.0.1.1", "127.0.1.2"]

    fake.start()
    expect_a(d, "web", ["127.0.1.1"])
    expect_a(d, "db", ["127.0.3.1"])
    assert a(d, "api") == []
    assert snapshot(d) == {
        ("web", "127.0.1.1", 8080, "http", "healthy"),
        ("web", "127.0.1.3", 8080, "http", "unhealthy"),
        ("db", "127.0.3.1", 8080, "http", "healthy"),
    }
    eventually(lambda: _assert(not provider_state(d).stale))


def test_malformed_data_skipped(fake: FakeKubernetes, start_daemon: Start, tmp_path: Path) -> None:
    fake.put_service(NS, service("web"))
    fake.put_slice(
        NS,
        endpoint_slice(
            "web-abcde",
            "web",
            endpoints=[
                endpoint("127.0.1.1"),
                {"addresses": [], "conditions": {"ready": True}},
                {"addresses": ["127.0.1.8"], "conditions": {"ready": "yes"}},
                endpoint("not an address!"),
            ],
            ports=[port("http", 8080), port("zero", 0), port("none", None)],
        ),
    )
    broken = endpoint_slice("web-broken", "web", endpoints=[], ports=[])
    broken["endpoints"] = "nonsense"
    fake.put_slice(NS, broken)
    fake.put_slice(  # no kubernetes.io/service-name label: belongs to no Service
        NS, endpoint_slice("loose", None, endpoints=[endpoint("127.0.1.9")], ports=[port("h", 1)])
    )
    fake.put_service(NS, {"metadata": {"name": "bad_name"}, "spec": {}})
    fake.put_slice(
        NS,
        endpoint_slice(
            "bad-1", "bad_name", endpoints=[endpoint("127.0.1.7")], ports=[port("http", 80)]
        ),
    )
    put_web(fake, "127.0.2.1", name="api")
    with structlog.testing.capture_logs() as logs:
        d = start_daemon(k8s_config_for(fake, tmp_path))
        expect_a(d, "web", ["127.0.1.1"])
        expect_a(d, "api", ["127.0.2.1"])
        assert snapshot(d) == {
            ("web", "127.0.1.1", 8080, "http", "healthy"),
            ("api", "127.0.2.1", 8080, "http", "healthy"),
        }
        # Malformed data by watch is skipped the same way; good data still flows.
        fake.put_slice(
            NS,
            endpoint_slice(
                "api-abcde",
                "api",
                endpoints=[endpoint("127.0.2.1"), {"addresses": None}],
                ports=[port("http", 8080)],
            ),
        )
        put_web(fake, "127.0.3.1", name="db")
        expect_a(d, "db", ["127.0.3.1"])
        assert a(d, "api") == ["127.0.2.1"]
    skipped = [e for e in logs if e["event"] == "kubernetes.skipped"]
    assert any(e.get("object") == f"{NS}/web-broken" for e in skipped)
    assert any(e.get("object") == f"{NS}/web-abcde" for e in skipped)
    assert any(e.get("object") == f"{NS}/api-abcde" for e in skipped)
    problems = [e for e in logs if e["event"] == "kubernetes.instance_skipped"]
    assert any("production/bad_name" in e["problem"] for e in problems)
    assert any("not an address!" in e["problem"] for e in problems)
    assert not provider_state(d).stale


def test_two_namespaces(fake: FakeKubernetes, start_daemon: Start, tmp_path: Path) -> None:
    put_web(fake, "127.0.1.1")
    put_web(fake, "127.0.1.2", namespace="staging")
    put_web(fake, "127.0.9.9", namespace="ignored")
    d = start_daemon(k8s_config_for(fake, tmp_path, namespaces=[NS, "staging"]))
    expect_a(d, "web", ["127.0.1.1", "127.0.1.2"])
    by_namespace = {i.metadata["namespace"]: i.address for i in instances(d, "web")}
    assert by_namespace == {NS: "127.0.1.1", "staging": "127.0.1.2"}
    assert len({i.id for i in instances(d, "web")}) == 2
    fake.delete_slice("staging", "web-abcde")
    expect_a(d, "web", ["127.0.1.1"])
    assert {r.namespace for r in fake.requests()} == {NS, "staging"}


def test_empty_is_synced_unreachable_is_stale(
    fake: FakeKubernetes, start_daemon: Start, tmp_path: Path
) -> None:
    d = start_daemon(k8s_config_for(fake, tmp_path))
    eventually(lambda: _assert(provider_state(d).synced))
    state = provider_state(d)
    assert not state.stale and state.instances == 0
    assert d.call(lambda: d.daemon.table.snapshots()["kubernetes"]) == ()

    fake.stop()
    other = tmp_path / "other"
    other.mkdir()
    d2 = start_daemon(k8s_config_for(fake, other))
    eventually(lambda: _assert(provider_state(d2).stale))
    assert not provider_state(d2).synced
    fake.start()
    eventually(lambda: _assert(provider_state(d2).synced and not provider_state(d2).stale))


def test_stop_ends_the_client_threads(
    fake: FakeKubernetes, start_daemon: Start, tmp_path: Path
) -> None:
    put_web(fake, "127.0.1.1")
    d = start_daemon(k8s_config_for(fake, tmp_path, watch_timeout="1m"))
    expect_a(d, "web", ["127.0.1.1"])
    eventually(lambda: _assert(fake.watchers() == 2))
    d.close()

    def gone() -> None:
        alive = [t.name for t in threading.enumerate() if t.name.startswith("resolverd-k8s")]
        assert alive == []
        assert fake.watchers() == 0

    eventually(gone, timeout=3)


def test_local_example_runs(
    fake: FakeKubernetes, start_daemon: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/kubernetes-local.yaml as written: ~/.kube/config, namespace
    default, the seed's annotations plus gateway.tags."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".kube").mkdir()
    fake.write_kubeconfig(tmp_path / ".kube" / "config")
    annotations = {"app.version": "1.2.0", "gateway.weight": "3", "gateway.tags": "canary,blue"}
    put_web(fake, "127.0.1.1", "127.0.1.2", namespace="default", annotations=annotations)
    d = start_daemon(load_example("kubernetes-local.yaml"))
    expect_a(d, "v1-2-0.web", ["127.0.1.1", "127.0.1.2"])
    assert a(d, "canary.web.service") == ["127.0.1.1", "127.0.1.2"]
    assert sorted(p for _, p, _ in srv_targets(ask(d, f"_http._tcp.web.{D}", "SRV"))) == [
        8080,
        8080,
    ]
    assert {i.metadata["weight"] for i in instances(d, "web")} == {"3"}


def test_client_configuration_failure_is_stale_and_retried(
    fake: FakeKubernetes, start_daemon: Start, tmp_path: Path
) -> None:
    """A kubeconfig that is not there yet: stale with the reason, not a dead
    provider; once the file appears the provider syncs."""
    config = k8s_config_for(fake, tmp_path)
    kubeconfig = Path(config["service_discovery"]["kubeconfig"])
    kubeconfig.unlink()
    put_web(fake, "127.0.1.1")
    d = start_daemon(config)
    eventually(lambda: _assert(provider_state(d).stale))
    assert "configuration" in (provider_state(d).error or "")
    fake.write_kubeconfig(kubeconfig)
    expect_a(d, "web", ["127.0.1.1"])
    assert not provider_state(d).stale
