"""A small authoritative DNS server on 127.0.0.x for forwarding tests: it
serves a dict of records over UDP and TCP, counts the queries it sees, and can
delay, truncate or go away on command. Runs in its own thread and loop."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import dnslib


class Upstream:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.records: dict[tuple[str, str], list[dnslib.RR]] = {}
        self.nxdomain: set[str] = set()
        self.queries: Counter[tuple[str, str, str]] = Counter()  # (name, type, proto)
        self.delay = 0.0
        self.truncate_udp: set[str] = set()
        self.servfail = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._udp: Any = None
        self._tcp: Any = None
        self.start()

    # -- data ---------------------------------------------------------------------

    def add(self, zone_line: str) -> None:
        """Add records from zone-file text, e.g. 'www.example.test. 300 IN A 192.0.2.1'."""
        for rr in dnslib.RR.fromZone(zone_line):
            key = (str(rr.rname).lower(), dnslib.QTYPE[rr.rtype])
            self.records.setdefault(key, []).append(rr)

    def count(self, name: str, qtype: str = "A") -> int:
        name = name.lower()
        return sum(n for (q, t, _p), n in self.queries.items() if q == name and t == qtype)

    # -- serving ------------------------------------------------------------------

    def _answer(self, data: bytes, proto: str) -> bytes | None:
        try:
            request = dnslib.DNSRecord.parse(data)
        except Exception:
            return None
        qname = str(request.q.qname).lower()
        qtype = dnslib.QTYPE[request.q.qtype]
        self.queries[(qname, qtype, proto)] += 1
        reply = request.reply()
        reply.header.ra = 1
        if self.servfail:
            reply.header.rcode = dnslib.RCODE.SERVFAIL
            return bytes(reply.pack())
        if proto == "udp" and qname in self.truncate_udp:
            reply.header.tc = 1
            return bytes(reply.pack())
        for rr in self.records.get((qname, qtype), []):
            reply.add_answer(rr)
        if not reply.rr:
            zone = "example.test."
            soa = dnslib.SOA(
                "ns.example.test.", "hostmaster.example.test.", (1, 3600, 600, 86400, 60)
            )
            reply.add_auth(dnslib.RR(zone, dnslib.QTYPE.SOA, ttl=120, rdata=soa))
            if qname in self.nxdomain:
                reply.header.rcode = dnslib.RCODE.NXDOMAIN
        return bytes(reply.pack())

    async def _start(self) -> None:
        upstream = self
        loop = asyncio.get_running_loop()

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                async def later() -> None:
                    if upstream.delay:
                        await asyncio.sleep(upstream.delay)
                    reply = upstream._answer(data, "udp")
                    if reply is not None:
                        self.transport.sendto(reply, addr)

                task = loop.create_task(later())
                upstream._tasks.add(task)
                task.add_done_callback(upstream._tasks.discard)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                    if upstream.delay:
                        await asyncio.sleep(upstream.delay)
                    reply = upstream._answer(data, "tcp")
                    if reply is not None:
                        writer.write(len(reply).to_bytes(2, "big") + reply)
                        await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        fixed = self.port
        for _attempt in range(20):
            transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, fixed))
            port = transport.get_extra_info("sockname")[1]
            try:
                # TCP on the same port number as UDP, as DNS clients expect.
                self._tcp = await asyncio.start_server(tcp, self.host, port, reuse_address=True)
            except OSError:
                transport.close()
                if fixed:
                    raise
                continue
            self.port, self._udp = port, transport
            return
        raise OSError("no port free for UDP and TCP together")

    async def _stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def main() -> None:
    """Serve zone lines until killed: `python tests/upstream.py HOST:PORT 'name TTL IN A ip' ...`
    (used inside network namespaces, where the test cannot share a thread)."""
    import sys

    host, port = sys.argv[1].rsplit(":", 1)
    up = Upstream.__new__(Upstream)
    up.__init__(host)  # binds an ephemeral port first; rebind on the requested one
    up.stop()
    up.port = int(port)
    for line in sys.argv[2:]:
        up.add(line)
    up.start()
    print(f"listening {up.address}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
