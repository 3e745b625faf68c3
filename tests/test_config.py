"""Config loading: the seed's examples, the providers list, and located errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from resolverd.config import (
    Algorithm,
    BalancePolicy,
    ConfigError,
    Location,
    load_config,
    parse_config,
    parse_duration,
    parse_hostport,
)
from resolverd.model import Health

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BAD_DIR = Path(__file__).resolve().parent / "configs" / "bad"


def write(tmp_path: Path, text: str, name: str = "static.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- the examples


def test_static_example() -> None:
    config = load_config(EXAMPLES / "static.yaml")

    assert config.file == str(EXAMPLES / "static.yaml")
    [provider] = config.providers
    assert (provider.type, provider.name) == ("static", "static")
    first, second = provider.static_services
    assert (first.id, first.name, first.address, first.port) == (
        "user-service-1",
        "user-service",
        "10.0.1.10",
        8080,
    )
    assert (second.id, second.address, second.port) == ("user-service-2", "10.0.1.11", 8080)
    assert first.metadata == {"weight": "10", "region": "us-east-1"}
    assert second.metadata["weight"] == "5"
    assert first.version == "1.2.0"
    assert first.tags == ("production", "primary")
    assert second.tags == ("production", "secondary")
    assert first.health is Health.HEALTHY
    assert first.provider == "static"

    user = config.policy_for("user-service")
    assert user.algorithm is Algorithm.WEIGHTED
    assert user.sticky_session is True
    assert user.session_key == "user_session"
    assert config.policy_for("payment-service").algorithm is Algorithm.LEAST_CONNECTIONS
    cdn = config.policy_for("cdn-service")
    assert (cdn.algorithm, cdn.fallback) == (Algorithm.GEO_LOCATION, Algorithm.ROUND_ROBIN)
    assert config.policy_for("analytics-service").algorithm is Algorithm.IP_HASH
    assert config.policy_for("User-Service.") == user  # DNS names are case-insensitive
    assert config.default_policy == BalancePolicy()
    assert config.policy_for("unknown") == config.default_policy

    assert config.dns.listen_udp == (("127.0.0.1", 5354),)
    assert config.dns.listen_tcp == (("127.0.0.1", 5354),)
    assert config.dns.domains == ("resolverd.internal",)
    # The seed's 10.0.1.x addresses must never be probed.
    assert config.health_check.enabled is False


def test_consul_example() -> None:
    config = load_config(EXAMPLES / "consul.yaml")

    [provider] = config.providers
    assert (provider.type, provider.name) == ("consul", "consul")
    assert provider.options["host"] == "consul.service.consul"
    assert provider.options["port"] == 8500
    assert provider.options["datacenter"] == "dc1"
    assert provider.options["scheme"] == "http"
    assert provider.options["verify"] is True
    assert provider.options["token"] is None
    assert provider.static_services == ()

    assert config.health_check.interval == 10.0
    assert config.health_check.timeout == 5.0
    assert config.health_check.enabled is False
    policy = config.default_policy
    assert policy.algorithm is Algorithm.LEAST_CONNECTIONS
    assert policy.health_check_enabled is True
    assert policy.sticky_session is True
    assert policy.session_key == "JSESSIONID"
    assert config.policy_for("anything") == policy
    assert config.dns.listen_udp == (("127.0.0.1", 5354),)


def test_kubernetes_example() -> None:
    config = load_config(EXAMPLES / "kubernetes.yaml")

    [provider] = config.providers
    assert (provider.type, provider.name) == ("kubernetes", "kubernetes")
    assert provider.options["namespaces"] == ("production",)
    assert provider.options["annotations"] == {
        "version": "app.version",
        "weight": "gateway.weight",
        "region": "gateway.region",
    }
    assert provider.options["in_cluster"] is None
    assert provider.options["kubeconfig"] is None
    assert config.default_policy.algorithm is Algorithm.GEO_LOCATION
    assert config.default_policy.fallback is Algorithm.ROUND_ROBIN
    assert config.dns.listen_tcp == (("127.0.0.1", 5354),)


def test_options_are_read_only() -> None:
    config = load_config(EXAMPLES / "consul.yaml")
    with pytest.raises(TypeError):
        config.providers[0].options["port"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        config.policies["x"] = BalancePolicy()  # type: ignore[index]


# --------------------------------------------------------------------------- other valid forms


def test_providers_list(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        service_discovery:
          providers:
            - type: static
              static_services:
                - {id: web-1, name: web, address: 127.0.0.1, port: 8080}
            - type: consul
              name: consul-east
              consul: {host: 127.0.0.1, port: 18500, scheme: https, token: secret}
            - type: static
            - type: etcd
              etcd: {endpoints: ["127.0.0.1:2379", "etcd.local"], prefix: /svc/}
            - type: kubernetes
              namespaces: [team-a, team-b]
              annotations: {tags: gateway.tags}
          health_check: {enabled: true, interval: 500ms, timeout: 250ms, path: /ready}
          load_balancer: {algorithm: round_robin, sticky_session: true, sticky_ttl: 1m}
        load_balancing:
          strategies:
            web: {algorithm: weighted}
        """,
    )
    config = load_config(path)

    names = [(p.type, p.name) for p in config.providers]
    assert names == [
        ("static", "static"),
        ("consul", "consul-east"),
        ("static", "static-2"),
        ("etcd", "etcd"),
        ("kubernetes", "kubernetes"),
    ]
    static, consul, static2, etcd, k8s = config.providers
    assert [i.id for i in static.static_services] == ["web-1"]
    assert static.static_services[0].provider == "static"
    assert static2.static_services == ()
    assert consul.options["port"] == 18500
    assert consul.options["scheme"] == "https"
    assert consul.options["token"] == "secret"
    assert etcd.options["endpoints"] == (("127.0.0.1", 2379), ("etcd.local", 2379))
    assert etcd.options["prefix"] == "/svc/"
    assert k8s.options["namespaces"] == ("team-a", "team-b")
    assert k8s.options["annotations"] == {
        "version": "app.version",
        "weight": "gateway.weight",
        "region": "gateway.region",
        "tags": "gateway.tags",
    }
    assert config.health_check.enabled is True
    assert (config.health_check.interval, config.health_check.timeout) == (0.5, 0.25)
    assert config.health_check.path == "/ready"
    # A strategy inherits what it does not set from service_discovery.load_balancer.
    web = config.policy_for("web")
    assert web.algorithm is Algorithm.WEIGHTED
    assert web.sticky_session is True
    assert web.sticky_ttl == 60.0


def test_auto_names_skip_explicit_names(tmp_path: Path) -> None:
    config = parse_config(
        {
            "service_discovery": {
                "providers": [
                    {"type": "static"},
                    {"type": "static", "name": "static-2"},
                    {"type": "static"},
                ]
            }
        },
        file="inline.yaml",
    )
    assert [p.name for p in config.providers] == ["static", "static-2", "static-3"]


def test_dns_section() -> None:
    config = parse_config(
        {
            "service_discovery": {"provider": "static"},
            "dns": {
                "listen": ["127.0.0.1:0", "[::1]:5354"],
                "listen_tcp": "127.0.0.1",
                "domains": ["Example.COM.", "svc.internal"],
                "ttl": 0,
                "answer_limit": 3,
                "datacenter": "DC2",
                "max_udp_size": 4096,
                "client_location": {"latitude": 40.7, "longitude": -74},
                "soa": {"mname": "ns1.example.com", "rname": "admin.example.com.", "minimum": 30},
            },
            "log": {"level": "debug", "format": "json"},
        },
        file="inline.yaml",
    )
    dns = config.dns
    assert dns.listen_udp == (("127.0.0.1", 0), ("::1", 5354))
    assert dns.listen_tcp == (("127.0.0.1", 53),)
    assert dns.domains == ("example.com", "svc.internal")
    assert (dns.ttl, dns.answer_limit, dns.datacenter, dns.max_udp_size) == (0, 3, "dc2", 4096)
    assert dns.client_location == Location(latitude=40.7, longitude=-74.0)
    assert dns.soa.mname == "ns1.example.com."
    assert dns.soa.rname == "admin.example.com."
    assert (dns.soa.minimum, dns.soa.refresh) == (30, 3600)
    assert (config.log.level, config.log.format) == ("debug", "json")


def test_empty_sections_mean_defaults() -> None:
    # A key whose children are all commented out loads as null.
    config = parse_config(
        {"service_discovery": {"provider": "static", "load_balancer": None}, "dns": None},
        file="inline.yaml",
    )
    assert config.default_policy == BalancePolicy()
    assert config.dns.listen_udp == (("127.0.0.1", 53),)
    assert config.policies == {}


def test_numbers_become_text_where_strings_are_expected() -> None:
    config = parse_config(
        {
            "service_discovery": {
                "provider": "static",
                "static_services": [
                    {
                        "id": "a",
                        "name": "svc",
                        "address": "svc.example",
                        "port": 80,
                        "version": 2,
                        "tags": [2024],
                        "metadata": {"weight": 10},
                        "health": "critical",
                    }
                ],
            }
        },
        file="inline.yaml",
    )
    [instance] = config.providers[0].static_services
    assert (instance.version, instance.tags, instance.metadata) == (
        "2",
        ("2024",),
        {"weight": "10"},
    )
    assert instance.health is Health.CRITICAL
    assert instance.address == "svc.example"


# --------------------------------------------------------------------------- located errors

STATIC = """\
service_discovery:
  provider: static
  static_services:
"""

BAD_CONFIGS: list[tuple[str, str, str]] = [
    (
        "port",
        STATIC
        + "    - {id: a, name: svc, address: 127.0.0.1, port: 8080}\n"
        + "    - {id: b, name: svc, address: 127.0.0.1, port: 70000}\n",
        "service_discovery.static_services[1].port: 70000 is not a port (1-65535)",
    ),
    (
        "typo",
        "service_discovery:\n  provider: static\n  load_balancer:\n    algoritm: weighted\n",
        "service_discovery.load_balancer.algoritm: unknown key",
    ),
    (
        "bad algorithm",
        "service_discovery: {provider: static}\n"
        "load_balancing:\n  strategies:\n    user-service: {algorithm: fastest}\n",
        "load_balancing.strategies.user-service.algorithm: 'fastest' is not one of "
        "round_robin, least_connections, weighted, ip_hash, geo_location",
    ),
    (
        "bad duration",
        "service_discovery:\n  provider: static\n  health_check: {interval: 10x}\n",
        "service_discovery.health_check.interval: '10x' is not a duration "
        "(e.g. 500ms, 10s, 1m, 2h)",
    ),
    (
        "zero duration",
        "service_discovery:\n  provider: static\n  load_balancer: {sticky_ttl: 0s}\n",
        "service_discovery.load_balancer.sticky_ttl: '0s' must be longer than zero",
    ),
    (
        "provider and providers",
        "service_discovery:\n  provider: static\n  providers: [{type: static}]\n",
        "service_discovery: use either provider or providers, not both",
    ),
    (
        "neither provider nor providers",
        "service_discovery:\n  load_balancer: {algorithm: weighted}\n",
        "service_discovery: needs provider or providers",
    ),
    (
        "no service_discovery",
        "dns: {ttl: 5}\n",
        "service_discovery: missing required key",
    ),
    (
        "static_services under consul",
        "service_discovery:\n  provider: consul\n  static_services: []\n",
        "service_discovery.static_services: only valid for provider static",
    ),
    (
        "consul block in a static providers entry",
        "service_discovery:\n  providers:\n    - {type: static, consul: {port: 1}}\n",
        "service_discovery.providers[0].consul: only valid for provider consul",
    ),
    (
        "provider keys beside providers",
        "service_discovery:\n  providers: [{type: consul}]\n  consul: {port: 1}\n",
        "service_discovery.consul: only valid in a providers entry",
    ),
    (
        "unknown provider",
        "service_discovery: {provider: zookeeper}\n",
        "service_discovery.provider: 'zookeeper' is not one of consul, etcd, kubernetes, static",
    ),
    (
        "empty providers",
        "service_discovery: {providers: []}\n",
        "service_discovery.providers: must not be empty",
    ),
    (
        "providers entry without type",
        "service_discovery: {providers: [{name: x}]}\n",
        "service_discovery.providers[0].type: missing required key",
    ),
    (
        "duplicate provider names",
        "service_discovery:\n  providers:\n"
        "    - {type: static, name: local}\n    - {type: consul, name: local}\n",
        "service_discovery.providers[1].name: duplicate provider name 'local'",
    ),
    (
        "duplicate ids",
        STATIC
        + "    - {id: a, name: svc, address: 127.0.0.1, port: 80}\n"
        + "    - {id: a, name: svc, address: 127.0.0.2, port: 80}\n",
        "service_discovery.static_services[1].id: duplicate id 'a'",
    ),
    (
        "service name not a label",
        STATIC + "    - {id: a, name: User Service, address: 127.0.0.1, port: 80}\n",
        "service_discovery.static_services[0].name: 'User Service' is not a DNS label",
    ),
    (
        "missing port",
        STATIC + "    - {id: a, name: svc, address: 127.0.0.1}\n",
        "service_discovery.static_services[0].port: missing required key",
    ),
    (
        "bad address",
        STATIC + "    - {id: a, name: svc, address: 10.0.1.300, port: 80}\n",
        "service_discovery.static_services[0].address: '10.0.1.300' is not an IP address "
        "or host name",
    ),
    (
        "tags not a list",
        STATIC + "    - {id: a, name: svc, address: 127.0.0.1, port: 80, tags: production}\n",
        "service_discovery.static_services[0].tags: expected a list, got 'production'",
    ),
    (
        "bad health",
        STATIC + "    - {id: a, name: svc, address: 127.0.0.1, port: 80, health: up}\n",
        "service_discovery.static_services[0].health: 'up' is not one of "
        "healthy, unhealthy, critical",
    ),
    (
        "instance typo",
        STATIC + "    - {id: a, name: svc, address: 127.0.0.1, port: 80, tag: [x]}\n",
        "service_discovery.static_services[0].tag: unknown key",
    ),
    (
        "bad listen address",
        "service_discovery: {provider: static}\ndns: {listen: 'localhost:53'}\n",
        "dns.listen: host 'localhost' in 'localhost:53' is not an IP address",
    ),
    (
        "bad listen address in a list",
        "service_discovery: {provider: static}\ndns: {listen_udp: ['127.0.0.1:53', '::1:x:']}\n",
        "dns.listen_udp[1]: '::1:x:' is not an IP address",
    ),
    (
        "no listener at all",
        "service_discovery: {provider: static}\ndns: {listen: []}\n",
        "dns: needs at least one listen address",
    ),
    (
        "negative ttl",
        "service_discovery: {provider: static}\ndns: {ttl: -1}\n",
        "dns.ttl: -1 is out of range (0..2147483647)",
    ),
    (
        "ttl not an integer",
        "service_discovery: {provider: static}\ndns: {ttl: abc}\n",
        "dns.ttl: expected an integer, got 'abc'",
    ),
    (
        "bool is not an integer",
        "service_discovery: {provider: static}\ndns: {answer_limit: true}\n",
        "dns.answer_limit: expected an integer, got true",
    ),
    (
        "string is not a bool",
        "service_discovery:\n  provider: static\n  load_balancer: {sticky_session: 'on'}\n",
        "service_discovery.load_balancer.sticky_session: expected true or false, got 'on'",
    ),
    (
        "bad domain",
        "service_discovery: {provider: static}\ndns: {domains: [ok.internal, bad_name]}\n",
        "dns.domains[1]: 'bad_name' is not a domain name",
    ),
    (
        "latitude out of range",
        "service_discovery: {provider: static}\n"
        "dns: {client_location: {latitude: 91, longitude: 0}}\n",
        "dns.client_location.latitude: 91 is not a latitude (-90..90)",
    ),
    (
        "small udp size",
        "service_discovery: {provider: static}\ndns: {max_udp_size: 511}\n",
        "dns.max_udp_size: 511 is out of range (512..65535)",
    ),
    (
        "geo fallback",
        "service_discovery:\n  provider: static\n  load_balancer: {fallback: geo_location}\n",
        "service_discovery.load_balancer.fallback: 'geo_location' is not one of "
        "round_robin, least_connections, weighted, ip_hash",
    ),
    (
        "strategy name not a label",
        "service_discovery: {provider: static}\n"
        "load_balancing: {strategies: {user_service: {algorithm: weighted}}}\n",
        "load_balancing.strategies.user_service: 'user_service' is not a DNS label",
    ),
    (
        "load_balancing only has strategies",
        "service_discovery: {provider: static}\nload_balancing: {algorithm: weighted}\n",
        "load_balancing.algorithm: unknown key",
    ),
    (
        "consul port",
        "service_discovery:\n  provider: consul\n  consul: {port: 0}\n",
        "service_discovery.consul.port: 0 is not a port (1-65535)",
    ),
    (
        "consul scheme",
        "service_discovery:\n  provider: consul\n  consul: {scheme: ftp}\n",
        "service_discovery.consul.scheme: 'ftp' is not one of http, https",
    ),
    (
        "consul cert without key",
        "service_discovery:\n  provider: consul\n  consul: {cert_file: /c.pem}\n",
        "service_discovery.consul.key_file: required with cert_file",
    ),
    (
        "etcd endpoint",
        "service_discovery:\n  provider: etcd\n  etcd: {endpoints: ['http://127.0.0.1:2379']}\n",
        "service_discovery.etcd.endpoints[0]: 'http://127.0.0.1:2379' is not an IP address "
        "or host name",
    ),
    (
        "kubernetes namespace and namespaces",
        "service_discovery:\n  provider: kubernetes\n  namespace: a\n  namespaces: [b]\n",
        "service_discovery.namespaces: use either namespace or namespaces, not both",
    ),
    (
        "kubernetes annotation for an unknown field",
        "service_discovery:\n  provider: kubernetes\n  annotations: {colour: x}\n",
        "service_discovery.annotations.colour: unknown key",
    ),
    (
        "log level",
        "service_discovery: {provider: static}\nlog: {level: verbose}\n",
        "log.level: 'verbose' is not one of debug, info, warning, error",
    ),
    (
        "unknown top-level key",
        "service_discovery: {provider: static}\nserver: {port: 53}\n",
        "server: unknown key",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(text, expected, id=case) for case, text, expected in BAD_CONFIGS],
)
def test_bad_config(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"static.yaml: {expected}"


@pytest.mark.parametrize("path", sorted(BAD_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_bad_config_files(path: Path) -> None:
    # Each file states its expected message on its first line.
    first_line = path.read_text().splitlines()[0]
    expected = first_line.removeprefix("# expect: ")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == expected


def test_error_parts(tmp_path: Path) -> None:
    path = write(tmp_path, "service_discovery: {provider: static}\ndns: {ttl: abc}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert info.value.path == "dns.ttl"
    assert info.value.reason == "expected an integer, got 'abc'"


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "service_discovery:\n  provider: static\n  tags: [a, b\n", "broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("broken.yaml: line 4, column 1: ")
    assert info.value.path == "line 4, column 1"


def test_yaml_merge_keys_may_override(tmp_path: Path) -> None:
    # Duplicate keys are rejected, but a key next to `<<:` legitimately overrides.
    path = write(
        tmp_path,
        """
        service_discovery:
          provider: static
          load_balancer: &lb {algorithm: weighted, sticky_session: true}
        load_balancing:
          strategies:
            api:
              <<: *lb
              algorithm: ip_hash
        """,
    )
    api = load_config(path).policy_for("api")
    assert (api.algorithm, api.sticky_session) == (Algorithm.IP_HASH, True)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"missing.yaml: cannot read {path}: No such file or directory"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, "inline.yaml: service_discovery: missing required key"),
        (["a"], "inline.yaml: expected a mapping, got a list"),
        (
            {"service_discovery": "static"},
            "inline.yaml: service_discovery: expected a mapping, got 'static'",
        ),
    ],
)
def test_parse_config_shape(data: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, file="inline.yaml")
    assert str(info.value) == expected


# --------------------------------------------------------------------------- small parsers


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("10", 10.0),
        ("0s", 0.0),
        (5, 5.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("10x", "'10x' is not a duration (e.g. 500ms, 10s, 1m, 2h)"),
        ("", "'' is not a duration (e.g. 500ms, 10s, 1m, 2h)"),
        ("-5s", "'-5s' is not a duration (e.g. 500ms, 10s, 1m, 2h)"),
        ("1 m", "'1 m' is not a duration (e.g. 500ms, 10s, 1m, 2h)"),
        (True, "true is not a duration (e.g. 500ms, 10s, 1m, 2h)"),
        (None, "null is not a duration (e.g. 500ms, 10s, 1m, 2h)"),
        ([1], "a list is not a duration (e.g. 500ms, 10s, 1m, 2h)"),
        (-1, "-1 is a negative duration"),
        (float("inf"), "inf is not a finite duration"),
    ],
)
def test_parse_duration_rejects(value: object, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == reason


def test_parse_duration_rejects_huge_numbers() -> None:
    with pytest.raises(ValueError, match="is not a finite duration"):
        parse_duration(10**400)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5354", ("127.0.0.1", 5354)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:53", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
        ("[0:0::1]:5300", ("::1", 5300)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, default_port=53) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("localhost:53", "host 'localhost' in 'localhost:53' is not an IP address"),
        ("localhost", "'localhost' is not an IP address"),
        ("127.0.0.1:x", "port 'x' in '127.0.0.1:x' is not a number"),
        ("127.0.0.1:70000", "port 70000 in '127.0.0.1:70000' is out of range (0-65535)"),
        ("127.0.0.1:", "port '' in '127.0.0.1:' is not a number"),
        (":53", "':53' has no host"),
        ("[::1", "'[::1' has no closing ]"),
        ("[::1]53", "'[::1]53' is not [address]:port"),
        ("[127.0.0.1]:53", "'127.0.0.1' in '[127.0.0.1]:53' is not an IPv6 address"),
        ("", "'' is not an address"),
    ],
)
def test_parse_hostport_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_hostport(text, default_port=53)
    assert str(info.value) == reason
