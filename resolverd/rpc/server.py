"""The gRPC server: the Resolver service, grpc.health.v1 and reflection, on
TCP (optionally TLS, optionally requiring client certificates) and a unix
socket whose file mode is the access control."""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from resolverd.api.v1 import resolver_pb2 as pb
from resolverd.api.v1 import resolver_pb2_grpc as pb_grpc
from resolverd.config import ApiConfig
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


class RpcServer:
    def __init__(
        self,
        *,
        servicer: ResolverServicer,
        api: ApiConfig,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    ) -> None:
        self._api = api
        self._server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0)],
            handlers=list(extra_handlers) or None,
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
