from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Health(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_UNSPECIFIED: _ClassVar[Health]
    HEALTH_HEALTHY: _ClassVar[Health]
    HEALTH_UNHEALTHY: _ClassVar[Health]
    HEALTH_CRITICAL: _ClassVar[Health]
HEALTH_UNSPECIFIED: Health
HEALTH_HEALTHY: Health
HEALTH_UNHEALTHY: Health
HEALTH_CRITICAL: Health

class ClientInfo(_message.Message):
    __slots__ = ("address", "session_key", "latitude", "longitude")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    LATITUDE_FIELD_NUMBER: _ClassVar[int]
    LONGITUDE_FIELD_NUMBER: _ClassVar[int]
    address: str
    session_key: str
    latitude: float
    longitude: float
    def __init__(self, address: _Optional[str] = ..., session_key: _Optional[str] = ..., latitude: _Optional[float] = ..., longitude: _Optional[float] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("service", "version", "tags", "client", "limit")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    client: ClientInfo
    limit: int
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., client: _Optional[_Union[ClientInfo, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class EndpointStats(_message.Message):
    __slots__ = ("open_connections", "successes", "failures", "average_latency_ms")
    OPEN_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    open_connections: int
    successes: int
    failures: int
    average_latency_ms: float
    def __init__(self, open_connections: _Optional[int] = ..., successes: _Optional[int] = ..., failures: _Optional[int] = ..., average_latency_ms: _Optional[float] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("id", "address", "port", "version", "tags", "metadata", "health", "weight", "provider", "target", "stats")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    port: int
    version: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    health: Health
    weight: int
    provider: str
    target: str
    stats: EndpointStats
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., version: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., health: _Optional[_Union[Health, str]] = ..., weight: _Optional[int] = ..., provider: _Optional[str] = ..., target: _Optional[str] = ..., stats: _Optional[_Union[EndpointStats, _Mapping]] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("endpoints", "revision", "ttl_seconds")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    revision: int
    ttl_seconds: int
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., revision: _Optional[int] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class ConnectionEvent(_message.Message):
    __slots__ = ("instance_id", "opened", "closed")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    opened: int
    closed: int
    def __init__(self, instance_id: _Optional[str] = ..., opened: _Optional[int] = ..., closed: _Optional[int] = ...) -> None: ...

class CallOutcome(_message.Message):
    __slots__ = ("instance_id", "success", "latency_ms", "count")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    success: bool
    latency_ms: float
    count: int
    def __init__(self, instance_id: _Optional[str] = ..., success: _Optional[bool] = ..., latency_ms: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("connections", "outcomes")
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    connections: _containers.RepeatedCompositeFieldContainer[ConnectionEvent]
    outcomes: _containers.RepeatedCompositeFieldContainer[CallOutcome]
    def __init__(self, connections: _Optional[_Iterable[_Union[ConnectionEvent, _Mapping]]] = ..., outcomes: _Optional[_Iterable[_Union[CallOutcome, _Mapping]]] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("connection_events", "outcomes", "released")
    CONNECTION_EVENTS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    connection_events: int
    outcomes: int
    released: int
    def __init__(self, connection_events: _Optional[int] = ..., outcomes: _Optional[int] = ..., released: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("service", "version", "tags")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("service", "revision", "endpoints", "registered", "deregistered", "updated")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    DEREGISTERED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    service: str
    revision: int
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    registered: _containers.RepeatedScalarFieldContainer[str]
    deregistered: _containers.RepeatedScalarFieldContainer[str]
    updated: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, service: _Optional[str] = ..., revision: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., registered: _Optional[_Iterable[str]] = ..., deregistered: _Optional[_Iterable[str]] = ..., updated: _Optional[_Iterable[str]] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("id", "name", "version", "address", "port", "tags", "metadata", "health")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    version: str
    address: str
    port: int
    tags: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    health: Health
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., tags: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., health: _Optional[_Union[Health, str]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: Instance
    def __init__(self, instance: _Optional[_Union[Instance, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("revision", "created")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    created: bool
    def __init__(self, revision: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceInstances(_message.Message):
    __slots__ = ("name", "endpoints")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, name: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services", "revision")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceInstances]
    revision: int
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceInstances, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class GetHealthStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceHealth(_message.Message):
    __slots__ = ("total", "healthy", "unhealthy", "critical")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_FIELD_NUMBER: _ClassVar[int]
    total: int
    healthy: int
    unhealthy: int
    critical: int
    def __init__(self, total: _Optional[int] = ..., healthy: _Optional[int] = ..., unhealthy: _Optional[int] = ..., critical: _Optional[int] = ...) -> None: ...

class ProviderStatus(_message.Message):
    __slots__ = ("name", "type", "synced", "stale", "age_seconds", "error", "instances", "restored")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SYNCED_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    synced: bool
    stale: bool
    age_seconds: float
    error: str
    instances: int
    restored: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., synced: _Optional[bool] = ..., stale: _Optional[bool] = ..., age_seconds: _Optional[float] = ..., error: _Optional[str] = ..., instances: _Optional[int] = ..., restored: _Optional[bool] = ...) -> None: ...

class GetHealthStatusResponse(_message.Message):
    __slots__ = ("services", "revision", "providers")
    class ServicesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ServiceHealth
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ServiceHealth, _Mapping]] = ...) -> None: ...
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    services: _containers.MessageMap[str, ServiceHealth]
    revision: int
    providers: _containers.RepeatedCompositeFieldContainer[ProviderStatus]
    def __init__(self, services: _Optional[_Mapping[str, ServiceHealth]] = ..., revision: _Optional[int] = ..., providers: _Optional[_Iterable[_Union[ProviderStatus, _Mapping]]] = ...) -> None: ...
