"""DNS transports: UDP and TCP protocol classes that only move bytes.

Each datagram or TCP message goes to the `Answerer`; the UDP handler inlines
the exact-bytes cache lookup because that is the whole hot path.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Coroutine
from typing import Any, cast

import structlog

from resolverd.dns.answers import Answerer, Forward

log = structlog.get_logger(__name__)

TCP_IDLE_TIMEOUT = 10.0
TCP_MAX_CONNECTIONS = 256


class UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, answerer: Answerer, tasks: set[asyncio.Task[None]]) -> None:
        self._cache = answerer.udp_cache
        self._slow = answerer.slow
        self._answerer = answerer
        self._tasks = tasks
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        key = data[2:]
        entry = self._cache.get(key)
        if entry is not None and (sched := entry.sched) is not None:
            entry.hits += 1  # all the metrics cost here: summed at scrape time
            reply: bytes | Forward | None = data[:2] + sched[next(entry.counter) % entry.n]
        elif entry is not None:
            reply = entry.reply(data, addr[0])
        elif (
            (fwd := self._answerer.forwarder) is not None
            and (hit := fwd.cache.get(key)) is not None
            and hit.sec == fwd.sec
            and fwd.decisions.get(addr[0])
        ):
            # A forwarded name from the forwarding cache, patched this second.
            hit.hits += 1
            reply = data[:2] + hit.cur
        else:
            reply = self._slow(data, addr[0], tcp=False)
        if isinstance(reply, Forward):
            _spawn(self._tasks, self._forward(reply, addr))
        elif reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    async def _forward(self, request: Forward, addr: Any) -> None:
        reply = await self._answerer.forward(request)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (client gone): nothing to do.
        pass


class TcpProtocol(asyncio.Protocol):
    """RFC 7766: two-byte length framing, pipelined queries, idle timeout."""

    def __init__(
        self,
        answerer: Answerer,
        connections: set[TcpProtocol],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._answerer = answerer
        self._tasks = tasks
        self._connections = connections
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if len(self._connections) >= TCP_MAX_CONNECTIONS:
            self._transport.abort()
            return
        self._connections.add(self)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if peer else ""
        self._arm()

    def _arm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(TCP_IDLE_TIMEOUT, self.close)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._arm()
        while len(self._buffer) >= 2:
            size = int.from_bytes(self._buffer[:2], "big")
            if len(self._buffer) < 2 + size:
                break
            message = bytes(self._buffer[2 : 2 + size])
            del self._buffer[: 2 + size]
            reply = self._answerer.respond(message, self._peer, tcp=True)
            if reply is None:
                continue
            if isinstance(reply, Forward):
                # RFC 7766 6.2.1.1: replies may come back out of order.
                _spawn(self._tasks, self._forward(reply))
                continue
            self._send(reply)

    def _send(self, reply: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(len(reply).to_bytes(2, "big") + reply)

    async def _forward(self, request: Forward) -> None:
        self._send(await self._answerer.forward(request))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._connections.discard(self)


def _spawn(tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class DnsServer:
    """Binds the configured UDP and TCP addresses and reports the bound ones."""

    def __init__(self, answerer: Answerer) -> None:
        self._answerer = answerer
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._connections: set[TcpProtocol] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # forwarded queries in flight
        self.udp_addresses: list[tuple[str, int]] = []
        self.tcp_addresses: list[tuple[str, int]] = []
        # Configured address -> what serves it, so a reload keeps what it can.
        self._udp_for: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self._tcp_for: dict[tuple[str, int], asyncio.Server] = {}

    async def start(
        self, *, udp: tuple[tuple[str, int], ...], tcp: tuple[tuple[str, int], ...]
    ) -> None:
        """Bind everything. A TCP address with port 0 whose host also listens on
        UDP with port 0 gets the same port number, as clients retry a truncated
        UDP answer over TCP on the same port."""
        pending_tcp = list(tcp)
        for host, port in udp:
            transport = await self._bind_udp(host, port)
            self._udp_for[(host, port)] = transport
            bound_port = transport.get_extra_info("sockname")[1]
            if port == 0 and (host, 0) in pending_tcp:
                for _attempt in range(20):
                    try:
                        await self._bind_tcp(host, bound_port)
                    except OSError as err:
                        if err.errno != errno.EADDRINUSE:
                            raise
                        transport.close()
                        self._udp.remove(transport)
                        self.udp_addresses.pop()
                        transport = await self._bind_udp(host, 0)
                        bound_port = transport.get_extra_info("sockname")[1]
                    else:
                        pending_tcp.remove((host, 0))
                        self._udp_for[(host, port)] = transport
                        self._tcp_for[(host, 0)] = self._tcp[-1]
                        break
        for host, port in pending_tcp:
            await self._bind_tcp(host, port)
            self._tcp_for[(host, port)] = self._tcp[-1]
        for (address, port), proto in [(a, "udp") for a in self.udp_addresses] + [
            (a, "tcp") for a in self.tcp_addresses
        ]:
            log.info("dns.listening", proto=proto, address=address, port=port)

    async def _bind_udp(self, host: str, port: int) -> asyncio.DatagramTransport:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: UdpProtocol(self._answerer, self._tasks), local_addr=(host, port), family=family
        )
        self._udp.append(transport)
        bound = transport.get_extra_info("sockname")
        self.udp_addresses.append((bound[0], bound[1]))
        return transport

    async def _bind_tcp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: TcpProtocol(self._answerer, self._connections, self._tasks),
            host=host,
            port=port,
            reuse_address=True,
            backlog=128,
        )
        self._tcp.append(server)
        for sock in server.sockets:
            bound = sock.getsockname()
            self.tcp_addresses.append((bound[0], bound[1]))

    async def rebind(
        self, *, udp: tuple[tuple[str, int], ...], tcp: tuple[tuple[str, int], ...]
    ) -> None:
        """A reload: bind addresses that are new, then close those dropped;
        listeners whose address did not change are kept (no query lost)."""
        for address in [a for a in udp if a not in self._udp_for]:
            self._udp_for[address] = await self._bind_udp(*address)
            log.info("dns.listening", proto="udp", address=address[0], port=address[1])
        for address in [a for a in tcp if a not in self._tcp_for]:
            await self._bind_tcp(*address)
            self._tcp_for[address] = self._tcp[-1]
            log.info("dns.listening", proto="tcp", address=address[0], port=address[1])
        for address in [a for a in self._udp_for if a not in udp]:
            transport = self._udp_for.pop(address)
            self._udp.remove(transport)
            transport.close()
            log.info("dns.closed", proto="udp", address=address[0], port=address[1])
        for address in [a for a in self._tcp_for if a not in tcp]:
            server = self._tcp_for.pop(address)
            self._tcp.remove(server)
            server.close()
            log.info("dns.closed", proto="tcp", address=address[0], port=address[1])
        self.udp_addresses = [t.get_extra_info("sockname")[:2] for t in self._udp]
        self.tcp_addresses = [s.sockets[0].getsockname()[:2] for s in self._tcp if s.sockets]

    async def stop(self) -> None:
        for server in self._tcp:
            server.close()
        for transport in self._udp:
            transport.close()
        for conn in list(self._connections):
            conn.close()
        for server in self._tcp:
            await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._udp.clear()
        self._tcp.clear()
