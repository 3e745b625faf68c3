"""Typed configuration: YAML in, frozen dataclasses out, every mistake located.

This is the only module that reads resolverd's YAML. `load_config` parses the
file (rejecting duplicate keys, which PyYAML would otherwise drop silently) and
`parse_config` walks the mapping with small helpers that each know their key
path, so the first problem found becomes a `ConfigError` naming the file, the
key and the reason (``static.yaml: service_discovery.load_balancer.algoritm:
unknown key``). It accepts the seed's single-provider ``service_discovery``
block as well as a ``providers`` list, rejects unknown keys everywhere, and
returns frozen dataclasses that the daemon, providers, balancing and DNS layers
use without checking them again.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from ipaddress import IPv6Address, ip_network
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from resolverd.model import Health, Instance, is_dns_label, parse_ip

__all__ = [
    "Algorithm",
    "BalancePolicy",
    "CheckType",
    "Config",
    "ConfigError",
    "DnsConfig",
    "HealthCheckConfig",
    "Location",
    "LogConfig",
    "MetricsConfig",
    "ProviderConfig",
    "SoaConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_hostport",
]


class ConfigError(Exception):
    """A config problem located by file and key path.

    ``str(err)`` is the full located message, e.g.
    ``static.yaml: service_discovery.static_services[1].port: 70000 is not a port (1-65535)``.
    ``file`` is the path as given (the message shows its basename), ``path`` the
    key path (or ``line N, column M`` for YAML syntax errors, empty when the
    problem concerns the whole file) and ``reason`` the bare explanation.
    """

    file: str
    path: str
    reason: str

    def __init__(self, file: str, path: str, reason: str) -> None:
        self.file = file
        self.path = path
        self.reason = reason
        name = os.path.basename(file) or file
        super().__init__(f"{name}: {path}: {reason}" if path else f"{name}: {reason}")


# --------------------------------------------------------------------------- the typed config


class Algorithm(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_CONNECTIONS = "least_connections"
    WEIGHTED = "weighted"
    IP_HASH = "ip_hash"
    GEO_LOCATION = "geo_location"


@dataclass(frozen=True, slots=True)
class Location:
    latitude: float  # -90..90
    longitude: float  # -180..180


@dataclass(frozen=True, slots=True)
class BalancePolicy:
    """The seed's ``load_balancer`` block, and each ``load_balancing.strategies`` entry."""

    algorithm: Algorithm = Algorithm.ROUND_ROBIN
    health_check_enabled: bool = True
    sticky_session: bool = False
    session_key: str | None = None
    fallback: Algorithm = Algorithm.ROUND_ROBIN  # geo_location without a client location
    sticky_ttl: float = 1800.0  # seconds
    sticky_max_entries: int = 10000


class CheckType(StrEnum):
    HTTP = "http"  # GET path: 2xx healthy, any other status unhealthy, no answer critical
    TCP = "tcp"  # connect: accepted healthy, refused or timed out critical


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health checks (resolverd/health.py). ``service_discovery.health_check``
    is the default; a providers entry's ``health_check`` and then a
    ``load_balancing.strategies.<service>.health_check`` override it key by key."""

    # Off unless asked: the seed's example addresses (10.0.1.x) must never be
    # probed, and instances of remote providers may not be reachable from here.
    enabled: bool = False
    interval: float = 10.0
    timeout: float = 5.0
    path: str = "/health"
    type: CheckType = CheckType.HTTP
    healthy_threshold: int = 2  # consecutive successes before an instance is healthy
    unhealthy_threshold: int = 3  # consecutive failures before it is unhealthy/critical
    concurrency: int = 100  # probes in flight, all instances; service_discovery's only
    jitter: float = 0.1  # each interval varies by up to +-this fraction


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    type: str  # "static" | "consul" | "etcd" | "kubernetes"
    name: str  # unique; defaults to the type, then "<type>-2", "<type>-3" ...
    options: Mapping[str, object] = field(hash=False)  # validated, read-only
    static_services: tuple[Instance, ...] = ()


@dataclass(frozen=True, slots=True)
class SoaConfig:
    mname: str | None = None  # absolute (trailing dot); None: ns.dns.<domain>.
    rname: str | None = None  # absolute (trailing dot); None: hostmaster.<domain>.
    refresh: int = 3600
    retry: int = 600
    expire: int = 86400
    minimum: int = 5


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    """Names outside the served zones go to upstream resolvers."""

    # None: the nameservers of /etc/resolv.conf minus resolverd's own addresses;
    # an empty tuple turns forwarding off (such names get REFUSED).
    upstreams: tuple[tuple[str, int], ...] | None = None
    policy: str = "sequential"  # sequential | round_robin | random (as CoreDNS forward)
    timeout: float = 2.0  # per upstream attempt
    max_concurrent: int = 1000  # upstream queries in flight; beyond: SERVFAIL
    # Clients allowed recursion; None: loopback and resolverd's listen addresses.
    allow: tuple[str, ...] | None = None
    cache_size: int = 10000  # entries; 0 turns the cache off
    min_ttl: int = 0
    max_ttl: int = 3600
    max_negative_ttl: int = 300
    serve_stale: bool = False  # RFC 8767: expired answers when every upstream fails
    stale_max_age: float = 86400.0


@dataclass(frozen=True, slots=True)
class DnsConfig:
    listen_udp: tuple[tuple[str, int], ...] = (("127.0.0.1", 53),)
    listen_tcp: tuple[tuple[str, int], ...] = (("127.0.0.1", 53),)
    domains: tuple[str, ...] = ("resolverd.internal",)  # lowercase, no trailing dot
    ttl: int = 5
    answer_limit: int = 0  # 0: no limit
    datacenter: str = "dc1"
    max_udp_size: int = 1232
    client_location: Location | None = None
    soa: SoaConfig = SoaConfig()
    forward: ForwardConfig = ForwardConfig()


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set: clients must present a certificate it signed


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The gRPC API: where it listens and who may change routing."""

    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 50051),)
    unix_socket: str | None = None
    unix_socket_mode: int = 0o660
    token: str | None = None  # bearer token for Register/Deregister/Report over TCP
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class RegistrationsConfig:
    """Runtime registrations (the gRPC Register API) and where they persist."""

    state_file: str = ""  # "" -> default_state_file()


def default_state_file() -> str:
    """$STATE_DIRECTORY (systemd's StateDirectory=) or the XDG state home."""
    base = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not base:
        xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "state"
        )
        base = os.path.join(xdg, "resolverd")
    return os.path.join(base, "registrations.json")


@dataclass(frozen=True, slots=True)
class SnapshotConfig:
    """An on-disk copy of the providers' snapshots, so a restart while a backend
    is down still answers. Off unless `file` is set."""

    file: str | None = None
    max_age: float = 3600.0  # an older copy is ignored at start


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus /metrics and the HTTP status endpoints (resolverd/metrics.py):
    where they listen, None for nowhere. CoreDNS's port, on loopback."""

    listen: tuple[str, int] | None = ("127.0.0.1", 9153)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"  # debug | info | warning | error
    format: str = "auto"  # auto | json | console


@dataclass(frozen=True, slots=True)
class Config:
    file: str  # the path it was loaded from
    dns: DnsConfig
    providers: tuple[ProviderConfig, ...]
    default_policy: BalancePolicy  # service_discovery.load_balancer
    policies: Mapping[str, BalancePolicy] = field(hash=False)  # lowercase service -> policy
    health_check: HealthCheckConfig
    log: LogConfig = LogConfig()
    api: ApiConfig = ApiConfig()
    registrations: RegistrationsConfig = RegistrationsConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    metrics: MetricsConfig = MetricsConfig()
    # Health check overrides: resolved per provider name; per lowercase service
    # only the keys given, applied over the provider's (most specific wins).
    provider_health_checks: Mapping[str, HealthCheckConfig] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    service_health_checks: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    def policy_for(self, service: str) -> BalancePolicy:
        """The service's strategy, or the default policy (names compare case-insensitively)."""
        return self.policies.get(service.lower().rstrip("."), self.default_policy)

    def health_check_for(self, provider: str, service: str) -> HealthCheckConfig:
        """The active health check of `service`'s instances from `provider`:
        the strategy's keys over the providers entry's over service_discovery's."""
        base = self.provider_health_checks.get(provider, self.health_check)
        changes = self.service_health_checks.get(service.lower().rstrip("."))
        return replace(base, **changes) if changes else base

    @property
    def health_checks_enabled(self) -> bool:
        """Whether any provider or service has active health checks on."""
        return (
            self.health_check.enabled
            or any(c.enabled for c in self.provider_health_checks.values())
            or any(c.get("enabled") is True for c in self.service_health_checks.values())
        )


# --------------------------------------------------------------------------- public parsers

_DURATION_HINT = "(e.g. 500ms, 10s, 1m, 2h)"
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?|\.\d+")
_DURATION_RE = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)(?:ms|h|m|s))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """Seconds from ``500ms``, ``10s``, ``1m``, ``2h``, ``1m30s`` or a number of seconds.

    Raises ValueError whose message is the reason (used after a key path).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{_describe(value)} is not a duration {_DURATION_HINT}")
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER_RE.fullmatch(text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            parts = _DURATION_PART_RE.findall(text)
            seconds = math.fsum(float(n) * _UNIT_SECONDS[unit] for n, unit in parts)
        else:
            raise ValueError(f"{_describe(value)} is not a duration {_DURATION_HINT}")
    else:
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    if not math.isfinite(seconds):
        raise ValueError(f"{_describe(value)} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"{_describe(value)} is a negative duration")
    return seconds


def parse_hostport(text: str, *, default_port: int) -> tuple[str, int]:
    """``127.0.0.1:5354``, ``[::1]:53``, ``127.0.0.1`` or ``::1`` -> (ip, port).

    The host must be an IP literal (returned in its normal form); port 0 is
    allowed so tests can bind an ephemeral port. Raises ValueError with the reason.
    """
    host, port = _split_hostport(text, default_port=default_port, min_port=0)
    ip = parse_ip(host)
    if ip is None:
        where = repr(text) if host == text else f"host {host!r} in {text!r}"
        raise ValueError(f"{where} is not an IP address")
    return str(ip), port


def _split_hostport(text: str, *, default_port: int, min_port: int) -> tuple[str, int]:
    if not text:
        raise ValueError("'' is not an address")
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r} has no closing ]")
        host, rest = text[1:end], text[end + 1 :]
        if not isinstance(parse_ip(host), IPv6Address):
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not [address]:port")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # no port, or a bare IPv6 address (brackets are needed to add a port)
        host = text
    if not host:
        raise ValueError(f"{text!r} has no host")
    if port_text is None:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"port {port_text!r} in {text!r} is not a number")
    port = int(port_text)
    if not min_port <= port <= 65535:
        raise ValueError(f"port {port} in {text!r} is out of range ({min_port}-65535)")
    return host, port


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (a pasted seed has three service_discovery)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # merged keys may legitimately be overridden
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable; construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; any problem is a ConfigError."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read {file}: {exc.strerror or exc}") from None
    try:
        data = yaml.load(raw, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(file, where, exc.problem or exc.context or "invalid YAML") from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", f"invalid YAML: {exc}") from None
    return parse_config(data, file=file)


def parse_instance(data: object, *, path: str, provider: str) -> Instance:
    """Validate one instance mapping, as in ``static_services`` (used for
    runtime registrations too). Raises ValueError("<path>.<key>: <reason>")."""
    try:
        return _instance(data, path, provider=provider)
    except _Invalid as exc:
        raise ValueError(f"{exc.path}: {exc.reason}") from None


def parse_config(data: object, *, file: str) -> Config:
    """Validate an already-loaded mapping; ``file`` names it in errors and Config.file."""
    try:
        return _config(data, file)
    except _Invalid as exc:
        raise ConfigError(file, exc.path, exc.reason) from None


# --------------------------------------------------------------------------- helpers (path-aware)


class _Invalid(Exception):
    """The first problem found, before the file name is known to be attached."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason


_Parser = Callable[[object, str], object]
_R = TypeVar("_R", BalancePolicy, HealthCheckConfig, SoaConfig, LogConfig, ForwardConfig)


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _item(path: str, index: int) -> str:
    return f"{path}[{index}]"


def _describe(value: object) -> str:
    """The value as the user wrote it (YAML spelling), short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _mapping(value: object, path: str) -> Mapping[object, object]:
    # A key whose children are all commented out is null: treat it as empty.
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Invalid(path, f"expected a mapping, got {_describe(value)}")
    return value


def _section(
    value: object, path: str, keys: Sequence[str] | Mapping[str, object]
) -> dict[str, Any]:
    """A mapping whose keys are all known."""
    mapping = _mapping(value, path)
    for key in mapping:
        if not isinstance(key, str) or key not in keys:
            raise _Invalid(_key(path, str(key)), "unknown key")
    return {str(k): v for k, v in mapping.items()}


def _required(section: Mapping[str, object], path: str, key: str) -> object:
    if key not in section:
        raise _Invalid(_key(path, key), "missing required key")
    return section[key]


def _list(value: object, path: str) -> list[object]:
    if not isinstance(value, list | tuple):
        raise _Invalid(path, f"expected a list, got {_describe(value)}")
    return list(value)


def _one_or_list(value: object, path: str) -> list[tuple[object, str]]:
    """A string or a list of them, each with its own key path."""
    if isinstance(value, str):
        return [(value, path)]
    return [(item, _item(path, i)) for i, item in enumerate(_list(value, path))]


def _str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(path, f"expected a string, got {_describe(value)}")
    if not value:
        raise _Invalid(path, "must not be empty")
    return value


def _opt_str(value: object, path: str) -> str | None:
    return None if value is None else _str(value, path)


def _text(value: object, path: str, *, empty_ok: bool = False) -> str:
    """A string; YAML numbers (``version: 2``, ``weight: 10``) are taken as their text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if empty_ok and value == "":
        return ""
    return _str(value, path)


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(path, f"expected true or false, got {_describe(value)}")
    return value


def _int(value: object, path: str, *, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(path, f"expected an integer, got {_describe(value)}")
    if value < lo or (hi is not None and value > hi):
        bounds = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
        raise _Invalid(path, f"{value} is out of range ({bounds})")
    return value


def _port(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(path, f"expected an integer, got {_describe(value)}")
    if not 1 <= value <= 65535:
        raise _Invalid(path, f"{value} is not a port (1-65535)")
    return value


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Invalid(path, f"expected a number, got {_describe(value)}")
    return float(value)


def _duration(value: object, path: str) -> float:
    """A positive duration in seconds."""
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise _Invalid(path, str(exc)) from None
    if seconds <= 0:
        raise _Invalid(path, f"{_describe(value)} must be longer than zero")
    return seconds


def _choice(value: object, path: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _Invalid(path, f"{_describe(value)} is not one of {', '.join(choices)}")
    return value


def _algorithm(value: object, path: str) -> Algorithm:
    return Algorithm(_choice(value, path, [a.value for a in Algorithm]))


def _fallback(value: object, path: str) -> Algorithm:
    # geo_location falls back when it cannot work; it cannot fall back to itself.
    choices = [a.value for a in Algorithm if a is not Algorithm.GEO_LOCATION]
    return Algorithm(_choice(value, path, choices))


def _label(value: object, path: str) -> str:
    text = _str(value, path)
    if not is_dns_label(text):
        raise _Invalid(path, f"{_describe(text)} is not a DNS label")
    return text


def _is_hostname(name: str) -> bool:
    # An all-numeric last label would let a mistyped IPv4 address pass as a name.
    bare = name.removesuffix(".")
    labels = bare.split(".")
    return (
        len(bare) <= 253
        and all(is_dns_label(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _domain(value: object, path: str) -> str:
    """A DNS name, lowercased, without the trailing dot."""
    text = _str(value, path)
    if not _is_hostname(text):
        raise _Invalid(path, f"{_describe(text)} is not a domain name")
    return text.lower().removesuffix(".")


def _opt_absolute_name(value: object, path: str) -> str | None:
    return None if value is None else _domain(value, path) + "."


def _host(value: object, path: str) -> str:
    """An IP literal or a host name, as written."""
    text = _str(value, path)
    if parse_ip(text) is None and not _is_hostname(text):
        raise _Invalid(path, f"{_describe(text)} is not an IP address or host name")
    return text


def _record(value: object, path: str, base: _R, parsers: Mapping[str, _Parser]) -> _R:
    """``base`` with the keys present in the mapping parsed and replaced."""
    section = _section(value, path, parsers)
    # Any: each parser returns its field's type; the table cannot say so to mypy.
    changes: dict[str, Any] = {k: parsers[k](raw, _key(path, k)) for k, raw in section.items()}
    return replace(base, **changes)


def _both_or_neither(options: Mapping[str, object], path: str, a: str, b: str) -> None:
    if (options[a] is None) != (options[b] is None):
        missing, given = (b, a) if options[b] is None else (a, b)
        raise _Invalid(_key(path, missing), f"required with {given}")


# --------------------------------------------------------------------------- sections


def _config(data: object, file: str) -> Config:
    top = _section(
        data,
        "",
        (
            "service_discovery",
            "load_balancing",
            "dns",
            "log",
            "api",
            "registrations",
            "snapshot",
            "metrics",
        ),
    )
    base = os.path.dirname(os.path.abspath(file))
    providers, default_policy, health_check = _service_discovery(
        _required(top, "", "service_discovery"), "service_discovery"
    )
    policies = _load_balancing(top.get("load_balancing"), "load_balancing", default_policy)
    provider_checks = _provider_health_checks(top["service_discovery"], providers, health_check)
    service_checks = _service_health_checks(top.get("load_balancing"))
    config = Config(
        file=file,
        dns=_dns(top.get("dns"), "dns"),
        providers=providers,
        default_policy=default_policy,
        policies=MappingProxyType(policies),
        health_check=health_check,
        log=_record(top.get("log"), "log", LogConfig(), _LOG_FIELDS),
        api=_api(top.get("api"), "api", base),
        registrations=_registrations(top.get("registrations"), "registrations", base),
        snapshot=_snapshot(top.get("snapshot"), "snapshot", base),
        metrics=_metrics(top.get("metrics"), "metrics"),
        provider_health_checks=MappingProxyType(provider_checks),
        service_health_checks=MappingProxyType(
            {name: MappingProxyType(changes) for name, changes in service_checks.items()}
        ),
    )
    _check_metrics_listen(config)
    return config


def _http_path(value: object, path: str) -> str:
    text = _str(value, path)
    if not text.startswith("/"):
        raise _Invalid(path, f"{_describe(text)} does not start with /")
    return text


_LOG_FIELDS: dict[str, _Parser] = {
    "level": lambda v, p: _choice(v, p, ("debug", "info", "warning", "error")),
    "format": lambda v, p: _choice(v, p, ("auto", "json", "console")),
}

_POLICY_FIELDS: dict[str, _Parser] = {
    "algorithm": _algorithm,
    "health_check_enabled": _bool,
    "sticky_session": _bool,
    "session_key": _opt_str,
    "fallback": _fallback,
    "sticky_ttl": _duration,
    "sticky_max_entries": lambda v, p: _int(v, p, lo=1),
}


def _fraction(value: object, path: str) -> float:
    number = _number(value, path)
    if not 0 <= number <= 1:
        raise _Invalid(path, f"{number:g} is not a fraction (0..1)")
    return number


_HEALTH_CHECK_FIELDS: dict[str, _Parser] = {
    "enabled": _bool,
    "type": lambda v, p: CheckType(_choice(v, p, [t.value for t in CheckType])),
    "interval": _duration,
    "timeout": _duration,
    "path": _http_path,
    "healthy_threshold": lambda v, p: _int(v, p, lo=1, hi=100),
    "unhealthy_threshold": lambda v, p: _int(v, p, lo=1, hi=100),
    "concurrency": lambda v, p: _int(v, p, lo=1, hi=10000),
    "jitter": _fraction,
}


def _health_check_changes(value: object, path: str) -> dict[str, Any]:
    """The keys of an overriding health_check section (a providers entry's or a
    strategy's), parsed; what it does not set comes from the wider section."""
    section = _section(value, path, _HEALTH_CHECK_FIELDS)
    if "concurrency" in section:
        raise _Invalid(
            _key(path, "concurrency"),
            "only valid in service_discovery.health_check (one cap for all probes)",
        )
    return {k: _HEALTH_CHECK_FIELDS[k](raw, _key(path, k)) for k, raw in section.items()}


def _provider_health_checks(
    sd: object, providers: Sequence[ProviderConfig], default: HealthCheckConfig
) -> dict[str, HealthCheckConfig]:
    """Each providers entry's health_check over the default, by provider name.
    Runs after _service_discovery, so the list's shape is known to be valid."""
    items = sd.get("providers") if isinstance(sd, Mapping) else None
    if not isinstance(items, list | tuple):
        return {}
    checks: dict[str, HealthCheckConfig] = {}
    for i, (item, provider) in enumerate(zip(items, providers, strict=True)):
        if isinstance(item, Mapping) and "health_check" in item:
            path = _key(_item("service_discovery.providers", i), "health_check")
            checks[provider.name] = replace(
                default, **_health_check_changes(item["health_check"], path)
            )
    return checks


def _service_health_checks(value: object) -> dict[str, dict[str, Any]]:
    """load_balancing.strategies.<service>.health_check keys, by lowercase service.
    Runs after _load_balancing, so names and shapes are known to be valid."""
    if not isinstance(value, Mapping) or not isinstance(value.get("strategies"), Mapping):
        return {}
    checks: dict[str, dict[str, Any]] = {}
    for name, raw in value["strategies"].items():
        if isinstance(raw, Mapping) and "health_check" in raw:
            path = f"load_balancing.strategies.{name}.health_check"
            checks[str(name).lower()] = _health_check_changes(raw["health_check"], path)
    return checks


def _without_health_check(value: object) -> object:
    """A strategy's mapping minus health_check, which is not a balancing key."""
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if k != "health_check"}
    return value


# Keys of service_discovery (or of a providers entry) owned by one provider type.
_PROVIDER_KEYS: dict[str, tuple[str, ...]] = {
    "consul": ("consul",),
    "etcd": ("etcd",),
    "kubernetes": (
        "namespace",
        "namespaces",
        "kubeconfig",
        "in_cluster",
        "annotations",
        "reconnect_max",
        "watch_timeout",
    ),
    "static": ("static_services",),
}
_PROVIDER_TYPES = tuple(_PROVIDER_KEYS)
_KEY_OWNER = {key: kind for kind, keys in _PROVIDER_KEYS.items() for key in keys}


def _service_discovery(
    value: object, path: str
) -> tuple[tuple[ProviderConfig, ...], BalancePolicy, HealthCheckConfig]:
    sd = _section(
        value, path, ("provider", "providers", "health_check", "load_balancer", *_KEY_OWNER)
    )
    if "provider" in sd and "providers" in sd:
        raise _Invalid(path, "use either provider or providers, not both")
    if "provider" in sd:
        kind = _choice(sd["provider"], _key(path, "provider"), _PROVIDER_TYPES)
        providers: tuple[ProviderConfig, ...] = (_provider(sd, path, kind=kind, name=kind),)
    elif "providers" in sd:
        for key in sd:
            if key in _KEY_OWNER:
                raise _Invalid(_key(path, key), "only valid in a providers entry")
        providers = _provider_list(sd["providers"], _key(path, "providers"))
    else:
        raise _Invalid(path, "needs provider or providers")
    policy = _record(
        sd.get("load_balancer"), _key(path, "load_balancer"), BalancePolicy(), _POLICY_FIELDS
    )
    health_check = _record(
        sd.get("health_check"),
        _key(path, "health_check"),
        HealthCheckConfig(),
        _HEALTH_CHECK_FIELDS,
    )
    return providers, policy, health_check


def _provider_list(value: object, path: str) -> tuple[ProviderConfig, ...]:
    items = _list(value, path)
    if not items:
        raise _Invalid(path, "must not be empty")
    entries: list[tuple[str, dict[str, Any], str, str | None]] = []
    taken: set[str] = set()
    for i, item in enumerate(items):
        entry_path = _item(path, i)
        entry = _section(item, entry_path, ("type", "name", "health_check", *_KEY_OWNER))
        kind = _choice(
            _required(entry, entry_path, "type"), _key(entry_path, "type"), _PROVIDER_TYPES
        )
        name = None
        if "name" in entry:
            name = _label(entry["name"], _key(entry_path, "name")).lower()
            if name in taken:
                raise _Invalid(_key(entry_path, "name"), f"duplicate provider name {name!r}")
            taken.add(name)
        entries.append((entry_path, entry, kind, name))
    providers = []
    for entry_path, entry, kind, name in entries:
        if name is None:  # the type, then type-2, type-3 ... skipping names given explicitly
            name, n = kind, 2
            while name in taken:
                name, n = f"{kind}-{n}", n + 1
            taken.add(name)
        providers.append(_provider(entry, entry_path, kind=kind, name=name))
    return tuple(providers)


def _provider(entry: Mapping[str, object], path: str, *, kind: str, name: str) -> ProviderConfig:
    """One provider from its keys in ``entry`` (service_discovery or a providers item)."""
    for key in entry:
        owner = _KEY_OWNER.get(key, kind)
        if owner != kind:
            raise _Invalid(_key(path, key), f"only valid for provider {owner}")
    options: dict[str, object] = {}
    instances: tuple[Instance, ...] = ()
    if kind == "static":
        instances = _static_services(
            entry.get("static_services"), _key(path, "static_services"), provider=name
        )
    elif kind == "consul":
        options = _consul(entry.get("consul"), _key(path, "consul"))
    elif kind == "etcd":
        options = _etcd(entry.get("etcd"), _key(path, "etcd"))
    else:
        options = _kubernetes(entry, path)
    return ProviderConfig(
        type=kind, name=name, options=MappingProxyType(options), static_services=instances
    )


def _consul(value: object, path: str) -> dict[str, object]:
    keys = ("host", "port", "datacenter", "scheme", "token", "ca_file", "cert_file", "key_file")
    section = _section(value, path, (*keys, "verify", "wait", "reconnect_max"))

    def get(key: str, default: object = None) -> tuple[object, str]:
        return section.get(key, default), _key(path, key)

    options: dict[str, object] = {
        "host": _host(*get("host", "127.0.0.1")),
        "port": _port(*get("port", 8500)),
        "datacenter": _opt_str(*get("datacenter")),
        "scheme": _choice(*get("scheme", "http"), ("http", "https")),
        "token": _opt_str(*get("token")),
        "ca_file": _opt_str(*get("ca_file")),
        "cert_file": _opt_str(*get("cert_file")),
        "key_file": _opt_str(*get("key_file")),
        "verify": _bool(*get("verify", True)),
        # Blocking query wait; Consul caps it at 10m.
        "wait": _bounded_duration(*get("wait", "5m"), hi=600.0),
        "reconnect_max": _bounded_duration(*get("reconnect_max", "10s"), hi=3600.0),
    }
    _both_or_neither(options, path, "cert_file", "key_file")
    return options


def _etcd(value: object, path: str) -> dict[str, object]:
    optional = ("username", "password", "ca_file", "cert_file", "key_file")
    section = _section(value, path, ("endpoints", "prefix", "reconnect_max", *optional))
    endpoints_path = _key(path, "endpoints")
    endpoints: list[tuple[str, int]] = []
    for item, item_path in _one_or_list(
        section.get("endpoints", ["127.0.0.1:2379"]), endpoints_path
    ):
        endpoint = _endpoint(item, item_path)
        if endpoint in endpoints:
            raise _Invalid(item_path, f"duplicate endpoint {item!r}")
        endpoints.append(endpoint)
    if not endpoints:
        raise _Invalid(endpoints_path, "must not be empty")
    options: dict[str, object] = {
        "endpoints": tuple(endpoints),
        "prefix": _str(section.get("prefix", "/services/"), _key(path, "prefix")),
        "reconnect_max": _bounded_duration(
            section.get("reconnect_max", "10s"), _key(path, "reconnect_max"), hi=3600.0
        ),
    }
    for key in optional:
        options[key] = _opt_str(section.get(key), _key(path, key))
    _both_or_neither(options, path, "username", "password")
    _both_or_neither(options, path, "cert_file", "key_file")
    return options


def _bounded_duration(value: object, path: str, *, hi: float) -> float:
    seconds = _duration(value, path)
    if seconds > hi:
        raise _Invalid(path, f"{seconds:g}s is longer than the maximum {hi:g}s")
    return seconds


def _endpoint(value: object, path: str) -> tuple[str, int]:
    """``host:port`` of a server we connect to: a host name is fine, port 0 is not."""
    text = _str(value, path)
    try:
        host, port = _split_hostport(text, default_port=2379, min_port=1)
    except ValueError as exc:
        raise _Invalid(path, str(exc)) from None
    if parse_ip(host) is None and not _is_hostname(host):
        where = repr(text) if host == text else f"host {host!r} in {text!r}"
        raise _Invalid(path, f"{where} is not an IP address or host name")
    return host, port


# The seed's annotation names; a config's `annotations` overrides them one by one.
_K8S_ANNOTATIONS = {
    "version": "app.version",
    "weight": "gateway.weight",
    "region": "gateway.region",
}


def _kubernetes(entry: Mapping[str, object], path: str) -> dict[str, object]:
    if "namespace" in entry and "namespaces" in entry:
        raise _Invalid(_key(path, "namespaces"), "use either namespace or namespaces, not both")
    if "namespaces" in entry:
        namespaces_path = _key(path, "namespaces")
        namespaces: list[str] = []
        for i, item in enumerate(_list(entry["namespaces"], namespaces_path)):
            namespace = _namespace(item, _item(namespaces_path, i))
            if namespace in namespaces:
                raise _Invalid(_item(namespaces_path, i), f"duplicate namespace {namespace!r}")
            namespaces.append(namespace)
        if not namespaces:
            raise _Invalid(namespaces_path, "must not be empty")
    else:
        namespaces = [_namespace(entry.get("namespace", "default"), _key(path, "namespace"))]
    in_cluster = entry.get("in_cluster")
    annotations_path = _key(path, "annotations")
    given = _section(
        entry.get("annotations"), annotations_path, ("version", "weight", "region", "tags")
    )
    annotations = dict(_K8S_ANNOTATIONS)
    for field_name, raw in given.items():
        annotations[field_name] = _str(raw, _key(annotations_path, field_name))
    return {
        "namespaces": tuple(namespaces),
        "kubeconfig": _opt_str(entry.get("kubeconfig"), _key(path, "kubeconfig")),
        # None: auto (in-cluster when the service account token is mounted).
        "in_cluster": None if in_cluster is None else _bool(in_cluster, _key(path, "in_cluster")),
        "annotations": MappingProxyType(annotations),
        "reconnect_max": _bounded_duration(
            entry.get("reconnect_max", "10s"), _key(path, "reconnect_max"), hi=3600.0
        ),
        # Server-side timeout of each watch request (timeoutSeconds).
        "watch_timeout": _bounded_duration(
            entry.get("watch_timeout", "5m"), _key(path, "watch_timeout"), hi=3600.0
        ),
    }


def _namespace(value: object, path: str) -> str:
    text = _str(value, path)
    if not is_dns_label(text) or text != text.lower():
        raise _Invalid(path, f"{_describe(text)} is not a namespace name (a lowercase DNS label)")
    return text


_INSTANCE_KEYS = ("id", "name", "version", "address", "port", "tags", "metadata", "health")


def _static_services(value: object, path: str, *, provider: str) -> tuple[Instance, ...]:
    if value is None:
        return ()
    instances: list[Instance] = []
    seen: set[str] = set()
    for i, item in enumerate(_list(value, path)):
        instance = _instance(item, _item(path, i), provider=provider)
        if instance.id in seen:
            raise _Invalid(_key(_item(path, i), "id"), f"duplicate id {instance.id!r}")
        seen.add(instance.id)
        instances.append(instance)
    return tuple(instances)


def _instance(value: object, path: str, *, provider: str) -> Instance:
    section = _section(value, path, _INSTANCE_KEYS)

    def at(key: str) -> str:
        return _key(path, key)

    tags = _list(section.get("tags", []), at("tags"))
    metadata = _mapping(section.get("metadata"), at("metadata"))
    return Instance(
        id=_str(_required(section, path, "id"), at("id")),
        name=_label(_required(section, path, "name"), at("name")),
        address=_host(_required(section, path, "address"), at("address")),
        port=_port(_required(section, path, "port"), at("port")),
        version=_text(section.get("version", "1.0.0"), at("version")),
        tags=tuple(_text(tag, _item(at("tags"), j)) for j, tag in enumerate(tags)),
        metadata=MappingProxyType(
            {
                _text(k, _key(at("metadata"), str(k))): _text(
                    v, _key(at("metadata"), str(k)), empty_ok=True
                )
                for k, v in metadata.items()
            }
        ),
        health=Health(
            _choice(section.get("health", "healthy"), at("health"), [h.value for h in Health])
        ),
        provider=provider,
    )


def _load_balancing(value: object, path: str, default: BalancePolicy) -> dict[str, BalancePolicy]:
    section = _section(value, path, ("strategies",))
    strategies_path = _key(path, "strategies")
    policies: dict[str, BalancePolicy] = {}
    for name, raw in _mapping(section.get("strategies"), strategies_path).items():
        entry_path = _key(strategies_path, str(name))
        service = _label(name, entry_path).lower()
        if service in policies:
            raise _Invalid(entry_path, f"duplicate service {service!r}")
        # Unspecified keys inherit service_discovery.load_balancer's values.
        policies[service] = _record(_without_health_check(raw), entry_path, default, _POLICY_FIELDS)
    return policies


def _dns(value: object, path: str) -> DnsConfig:
    section = _section(value, path, _DNS_FIELDS)
    changes: dict[str, Any] = {k: _DNS_FIELDS[k](raw, _key(path, k)) for k, raw in section.items()}
    # `listen` sets both transports; listen_udp / listen_tcp override it.
    listen = changes.pop("listen", None)
    if listen is not None:
        changes.setdefault("listen_udp", listen)
        changes.setdefault("listen_tcp", listen)
    dns = replace(DnsConfig(), **changes)
    if not dns.listen_udp and not dns.listen_tcp:
        raise _Invalid(path, "needs at least one listen address")
    return dns


def _listen(value: object, path: str) -> tuple[tuple[str, int], ...]:
    addresses: list[tuple[str, int]] = []
    for item, item_path in _one_or_list(value, path):
        text = _str(item, item_path)
        try:
            address = parse_hostport(text, default_port=53)
        except ValueError as exc:
            raise _Invalid(item_path, str(exc)) from None
        if address in addresses:
            raise _Invalid(item_path, f"duplicate address {text!r}")
        addresses.append(address)
    return tuple(addresses)


def _domains(value: object, path: str) -> tuple[str, ...]:
    domains: list[str] = []
    for item, item_path in _one_or_list(value, path):
        domain = _domain(item, item_path)
        if domain in domains:
            raise _Invalid(item_path, f"duplicate domain {domain!r}")
        domains.append(domain)
    if not domains:
        raise _Invalid(path, "must not be empty")
    return tuple(domains)


def _location(value: object, path: str) -> Location:
    section = _section(value, path, ("latitude", "longitude"))
    latitude = _number(_required(section, path, "latitude"), _key(path, "latitude"))
    if not -90 <= latitude <= 90:
        raise _Invalid(_key(path, "latitude"), f"{latitude:g} is not a latitude (-90..90)")
    longitude = _number(_required(section, path, "longitude"), _key(path, "longitude"))
    if not -180 <= longitude <= 180:
        raise _Invalid(_key(path, "longitude"), f"{longitude:g} is not a longitude (-180..180)")
    return Location(latitude=latitude, longitude=longitude)


def _u31(value: object, path: str) -> int:
    """A TTL-like count of seconds: 0..2**31-1 (RFC 2181)."""
    return _int(value, path, lo=0, hi=2147483647)


_SOA_FIELDS: dict[str, _Parser] = {
    "mname": _opt_absolute_name,
    "rname": _opt_absolute_name,
    "refresh": _u31,
    "retry": _u31,
    "expire": _u31,
    "minimum": _u31,
}

_DNS_FIELDS: dict[str, _Parser] = {
    "listen": _listen,
    "listen_udp": _listen,
    "listen_tcp": _listen,
    "domains": _domains,
    "ttl": _u31,
    "answer_limit": lambda v, p: _int(v, p, lo=0),
    "datacenter": lambda v, p: _label(v, p).lower(),
    "max_udp_size": lambda v, p: _int(v, p, lo=512, hi=65535),
    "client_location": lambda v, p: None if v is None else _location(v, p),
    "soa": lambda v, p: _record(v, p, SoaConfig(), _SOA_FIELDS),
    "forward": lambda v, p: _forward(v, p),
}


def _upstreams(value: object, path: str) -> tuple[tuple[str, int], ...]:
    upstreams: list[tuple[str, int]] = []
    for item, item_path in _one_or_list(value, path):
        try:
            host, port = _split_hostport(_str(item, item_path), default_port=53, min_port=1)
        except ValueError as exc:
            raise _Invalid(item_path, str(exc)) from None
        if parse_ip(host) is None:
            raise _Invalid(item_path, f"{host!r} is not an IP address")
        if (host, port) in upstreams:
            raise _Invalid(item_path, f"duplicate upstream {item!r}")
        upstreams.append((host, port))
    return tuple(upstreams)


def _networks(value: object, path: str) -> tuple[str, ...]:
    networks: list[str] = []
    for item, item_path in _one_or_list(value, path):
        try:
            networks.append(str(ip_network(_str(item, item_path), strict=False)))
        except ValueError:
            raise _Invalid(item_path, f"{item!r} is not an IP network") from None
    return tuple(networks)


_FORWARD_FIELDS: dict[str, _Parser] = {
    "upstreams": _upstreams,
    "policy": lambda v, p: _choice(v, p, ("sequential", "round_robin", "random")),
    "timeout": _duration,
    "max_concurrent": lambda v, p: _int(v, p, lo=1),
    "allow": _networks,
    "cache_size": lambda v, p: _int(v, p, lo=0),
    "min_ttl": _u31,
    "max_ttl": _u31,
    "max_negative_ttl": _u31,
    "serve_stale": _bool,
    "stale_max_age": _duration,
}


def _forward(value: object, path: str) -> ForwardConfig:
    forward = _record(value, path, ForwardConfig(), _FORWARD_FIELDS)
    if forward.min_ttl > forward.max_ttl:
        raise _Invalid(_key(path, "min_ttl"), f"{forward.min_ttl} is above max_ttl")
    return forward


# --------------------------------------------------------------------------- api, registrations


def _path(value: object, path: str, base: str) -> str:
    """A file path; relative ones are taken from the config file's folder."""
    text = os.path.expanduser(_str(value, path))
    return text if os.path.isabs(text) else os.path.normpath(os.path.join(base, text))


def _mode(value: object, path: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    raise _Invalid(path, f'{_describe(value)} is not a file mode (quote it: "0660")')


def _api(value: object, path: str, base: str) -> ApiConfig:
    section = _section(
        value, path, ("listen", "unix_socket", "unix_socket_mode", "token", "token_file", "tls")
    )
    api = ApiConfig()
    changes: dict[str, Any] = {}
    if "listen" in section:
        raw = section["listen"]
        changes["listen"] = () if raw == [] else _listen_api(raw, _key(path, "listen"))
    if section.get("unix_socket") is not None:
        changes["unix_socket"] = _path(section["unix_socket"], _key(path, "unix_socket"), base)
    if "unix_socket_mode" in section:
        changes["unix_socket_mode"] = _mode(
            section["unix_socket_mode"], _key(path, "unix_socket_mode")
        )
    if "token" in section and "token_file" in section:
        raise _Invalid(_key(path, "token_file"), "give token or token_file, not both")
    if section.get("token") is not None:
        changes["token"] = _str(section["token"], _key(path, "token"))
    if section.get("token_file") is not None:
        token_path = _key(path, "token_file")
        file = _path(section["token_file"], token_path, base)
        try:
            with open(file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise _Invalid(token_path, f"cannot read {file}: {exc.strerror or exc}") from None
        if not token:
            raise _Invalid(token_path, f"{file} is empty")
        changes["token"] = token
    if section.get("tls") is not None:
        changes["tls"] = _tls(section["tls"], _key(path, "tls"), base)
    api = replace(api, **changes)
    if not api.listen and api.unix_socket is None:
        raise _Invalid(path, "needs a listen address or a unix_socket")
    return api


def _listen_api(value: object, path: str) -> tuple[tuple[str, int], ...]:
    addresses: list[tuple[str, int]] = []
    for item, item_path in _one_or_list(value, path):
        try:
            address = parse_hostport(_str(item, item_path), default_port=50051)
        except ValueError as exc:
            raise _Invalid(item_path, str(exc)) from None
        if address in addresses:
            raise _Invalid(item_path, f"duplicate address {item!r}")
        addresses.append(address)
    return tuple(addresses)


def _tls(value: object, path: str, base: str) -> TlsConfig:
    section = _section(value, path, ("cert_file", "key_file", "client_ca_file"))

    def file(key: str) -> str:
        at = _key(path, key)
        name = _path(section[key], at, base)
        if not os.path.isfile(name):
            raise _Invalid(at, f"{name} does not exist")
        return name

    cert = file("cert_file") if "cert_file" in section else None
    key = file("key_file") if "key_file" in section else None
    if cert is None or key is None:
        raise _Invalid(
            _key(path, "key_file" if key is None else "cert_file"), "missing required key"
        )
    ca = file("client_ca_file") if section.get("client_ca_file") is not None else None
    return TlsConfig(cert_file=cert, key_file=key, client_ca_file=ca)


def _registrations(value: object, path: str, base: str) -> RegistrationsConfig:
    section = _section(value, path, ("state_file",))
    if section.get("state_file") is None:
        return RegistrationsConfig()
    return RegistrationsConfig(
        state_file=_path(section["state_file"], _key(path, "state_file"), base)
    )


def _snapshot(value: object, path: str, base: str) -> SnapshotConfig:
    section = _section(value, path, ("file", "max_age"))
    config = SnapshotConfig()
    if section.get("file") is not None:
        config = replace(config, file=_path(section["file"], _key(path, "file"), base))
    if "max_age" in section:
        config = replace(config, max_age=_duration(section["max_age"], _key(path, "max_age")))
    return config


# --------------------------------------------------------------------------- metrics


def _metrics(value: object, path: str) -> MetricsConfig:
    """``listen: "127.0.0.1:9153"`` (the default); ``listen: null`` or
    ``enabled: false`` turns the HTTP endpoint off."""
    section = _section(value, path, ("listen", "enabled"))
    enabled = _bool(section["enabled"], _key(path, "enabled")) if "enabled" in section else True
    listen = MetricsConfig().listen
    at = _key(path, "listen")
    if "listen" in section:
        raw = section["listen"]
        if raw is None:
            listen = None
        else:
            try:
                listen = parse_hostport(_str(raw, at), default_port=9153)
            except ValueError as exc:
                raise _Invalid(at, str(exc)) from None
    if not enabled:
        return MetricsConfig(listen=None)
    if listen is None and "enabled" in section:
        raise _Invalid(at, "null turns metrics off, but enabled is true")
    return MetricsConfig(listen=listen)


def _check_metrics_listen(config: Config) -> None:
    listen = config.metrics.listen
    if listen is None or listen[1] == 0:
        return
    for where, addresses in (
        ("api.listen", config.api.listen),
        ("dns.listen_tcp", config.dns.listen_tcp),
    ):
        if listen in addresses:
            host, port = listen
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise _Invalid("metrics.listen", f"{shown} is also {where}")
