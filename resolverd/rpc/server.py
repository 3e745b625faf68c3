"""The gRPC server: the Resolver service, grpc.health.v1 and reflection, on
TCP (optionally TLS, optionally requiring client certificates) and a unix
socket whose file mode is the access control."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from resolverd.api.v1 import resolver_pb2 as pb
from resolverd.api.v1 import resolver_pb2_grpc as pb_grpc
from resolverd.config import ApiConfig
from resolverd.metrics import Durations
from resolverd.rpc.servicer import ResolverServicer

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Resolver"].full_name
# Health of the data: NOT_SERVING while any provider is stale (answers still flow).
PROVIDERS_HEALTH = "resolverd.providers"


def _credentials(api: ApiConfig) -> grpc.ServerCredentials | None:
    if api.tls is None:
        return None
    with open(api.tls.key_file, "rb") as fh:
        key = fh.read()
    with open(api.tls.cert_file, "rb") as fh:
        cert = fh.read()
    ca = None
    if api.tls.client_ca_file is not None:
        with open(api.tls.client_ca_file, "rb") as fh:
            ca = fh.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


# grpc-prometheus's grpc_code values: Go's spelling of the status codes.
GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

MethodKey = tuple[str, str, str]  # (grpc_type, grpc_service, grpc_method)


class GrpcMetrics(grpc.aio.ServerInterceptor):
    """grpc-prometheus's server metrics as plain counters (resolverd.metrics
    renders them): RPCs started and handled (by status code) per method, and
    their handling time. Only methods the server has count, so the labels are
    bounded; wrapped handlers are reused, one per method."""

    def __init__(self) -> None:
        self.started: dict[MethodKey, int] = {}
        self.handled: dict[tuple[str, str, str, str], int] = {}
        self.durations: dict[MethodKey, Durations] = {}
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED: not a method of ours, not counted
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            wrapped: grpc.RpcMethodHandler[Any, Any] = cached[1]
            return wrapped
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, name = method.lstrip("/").rpartition("/")
        streams = (handler.request_streaming, handler.response_streaming)
        kind = {
            (False, False): "unary",
            (True, False): "client_stream",
            (False, True): "server_stream",
            (True, True): "bidi_stream",
        }[streams]
        key = (kind, service, name)
        behavior = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        if behavior is None:
            return handler
        if inspect.isasyncgenfunction(behavior):
            wrapped: Callable[..., Any] = self._generator(behavior, key)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = self._coroutine(behavior, key)
        else:
            return handler  # a synchronous handler: none of ours
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[streams]
        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _start(self, key: MethodKey) -> float:
        self.started[key] = self.started.get(key, 0) + 1
        return time.perf_counter()

    def _done(self, key: MethodKey, code: str, started: float) -> None:
        handled = (*key, code)
        self.handled[handled] = self.handled.get(handled, 0) + 1
        durations = self.durations.get(key)
        if durations is None:
            durations = self.durations[key] = Durations()
        durations.observe(time.perf_counter() - started)

    def _coroutine(
        self, behavior: Callable[..., Awaitable[Any]], key: MethodKey
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = self._start(key)
            code = "Unknown"
            try:
                result = await behavior(request, context)
                code = _code_name(context.code(), "OK")
                return result
            except asyncio.CancelledError:
                code = "Canceled"
                raise
            except BaseException:
                code = _code_name(context.code(), "Unknown")  # set by abort()
                raise
            finally:
                self._done(key, code, started)

        return call

    def _generator(
        self, behavior: Callable[..., AsyncGenerator[Any, None]], key: MethodKey
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = self._start(key)
            code = "Unknown"
            try:
                # Closed with this one, however it ends: its cleanup runs now.
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
                code = _code_name(context.code(), "OK")
            except (asyncio.CancelledError, GeneratorExit):
                code = "Canceled"
                raise
            except BaseException:
                code = _code_name(context.code(), "Unknown")
                raise
            finally:
                self._done(key, code, started)

        return call


def _code_name(code: object, default: str) -> str:
    if isinstance(code, grpc.StatusCode):
        return GO_CODE_NAMES.get(code, code.name)
    return default


class RpcServer:
    def __init__(
        self,
        *,
        servicer: ResolverServicer,
        api: ApiConfig,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self._api = api
        # Counted first, so the status codes other interceptors set are seen.
        self.metrics = GrpcMetrics()
        self._server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0)],
            handlers=list(extra_handlers) or None,
            interceptors=[self.metrics, *interceptors],
        )
        self.servicer = servicer
        pb_grpc.add_ResolverServicer_to_server(servicer, self._server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.addresses: list[str] = []

    @property
    def address(self) -> str:
        """The first bound address, as a gRPC target."""
        return self.addresses[0]

    async def start(self) -> None:
        credentials = _credentials(self._api)
        for host, port in self._api.listen:
            shown = f"[{host}]" if ":" in host else host
            target = f"{shown}:{port}"
            if credentials is not None:
                bound = self._server.add_secure_port(target, credentials)
            else:
                bound = self._server.add_insecure_port(target)
            if not bound:
                raise OSError(f"gRPC cannot listen on {target}")
            self.addresses.append(f"{shown}:{bound}")
        socket_path = self._api.unix_socket
        if socket_path is not None:
            os.makedirs(os.path.dirname(socket_path) or ".", exist_ok=True)
            if os.path.exists(socket_path):
                os.unlink(socket_path)  # left by a previous run
            self._server.add_insecure_port(f"unix:{socket_path}")
            self.addresses.append(f"unix:{socket_path}")
        await self._server.start()
        if socket_path is not None:
            os.chmod(socket_path, self._api.unix_socket_mode)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        for address in self.addresses:
            log.info("rpc.listening", address=address, tls=self._api.tls is not None)

    async def set_serving(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def set_providers_fresh(self, fresh: bool) -> None:
        status = health_pb2.HealthCheckResponse
        await self.health.set(PROVIDERS_HEALTH, status.SERVING if fresh else status.NOT_SERVING)

    async def not_serving(self) -> None:
        """Health says NOT_SERVING from now on (idempotent)."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        await self.not_serving()
        await self._server.stop(grace)
        if self._api.unix_socket is not None and os.path.exists(self._api.unix_socket):
            os.unlink(self._api.unix_socket)
