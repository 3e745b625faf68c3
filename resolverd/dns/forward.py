"""Forwarding: names outside the served zones go to upstream resolvers.

resolverd is the only nameserver of its app, so everything else must resolve
through it, without making it an open resolver. This module owns the upstream
side: the upstream list and its order policy, UDP first and TCP on truncation
or for TCP clients, a cap on queries in flight, coalescing of identical
questions, and a TTL cache (positive and RFC 2308 negative, optionally serving
stale answers per RFC 8767). Cache hits are answered from stored bytes with
their TTLs patched at most once a second, so a hit costs about what a service
answer costs. Which clients may recurse is decided here too (`allowed`).

Everything is done on bytes: dnslib is not used on the forwarding path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog

from resolverd.config import ForwardConfig
from resolverd.dns import wire
from resolverd.metrics import Durations, StatIds, StatKey, known_qtype

log = structlog.get_logger(__name__)

SOA_TYPE = 6
STALE_TTL = 30  # RFC 8767 section 4: TTL of a stale answer
MAX_ALLOW_DECISIONS = 10_000


class UpstreamStats:
    """One upstream's exchanges: sent, answered (by RCODE, with timing), failed."""

    __slots__ = ("durations", "failures", "requests", "responses")

    def __init__(self) -> None:
        self.requests = 0
        self.responses: dict[int, int] = {}  # rcode -> count
        self.failures: dict[str, int] = {}  # reason -> count
        self.durations = Durations()


# -- configuration helpers -------------------------------------------------------


def resolv_conf_upstreams(
    path: str = "/etc/resolv.conf", *, exclude: Iterable[str] = ()
) -> tuple[tuple[str, int], ...]:
    """The nameservers of resolv.conf, minus resolverd's own addresses (so it
    never forwards to itself)."""
    skip = {str(ipaddress.ip_address(a)) for a in exclude if _is_ip(a)}
    upstreams: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return ()
    for line in lines:
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver" and _is_ip(parts[1].split("%")[0]):
            ip = str(ipaddress.ip_address(parts[1].split("%")[0]))
            if ip not in skip and (ip, 53) not in upstreams:
                upstreams.append((ip, 53))
    return tuple(upstreams)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def default_allow(listen: Iterable[tuple[str, int]]) -> tuple[str, ...]:
    """Loopback and the addresses resolverd listens on."""
    nets = ["127.0.0.0/8", "::1/128"]
    for host, _port in listen:
        if _is_ip(host):
            ip = ipaddress.ip_address(host)
            if not ip.is_unspecified:
                nets.append(str(ipaddress.ip_network(ip)))
    return tuple(dict.fromkeys(nets))


# -- message surgery (bytes) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    start: int
    end: int
    rtype: int
    ttl_offset: int
    section: int  # 0 answer, 1 authority, 2 additional


def records(msg: bytes) -> list[Record]:
    """The resource records of a message, with where their TTLs are."""
    qd, an, ns, ar = struct.unpack_from("!HHHH", msg, 4)
    offset = 12
    for _ in range(qd):
        offset = wire.skip_name(msg, offset) + 4
    found: list[Record] = []
    for index in range(an + ns + ar):
        start = offset
        offset = wire.skip_name(msg, offset)
        if offset + 10 > len(msg):
            raise wire.Malformed("record truncated")
        rtype, _rclass, _ttl, rdlen = struct.unpack_from("!HHIH", msg, offset)
        ttl_offset = offset + 4
        offset += 10 + rdlen
        if offset > len(msg):
            raise wire.Malformed("rdata truncated")
        section = 0 if index < an else 1 if index < an + ns else 2
        found.append(Record(start, offset, rtype, ttl_offset, section))
    return found


def _opt_record(udp_size: int, do: bool) -> bytes:
    return b"\x00" + struct.pack("!HHIH", wire.OPT_TYPE, udp_size, wire.DO_BIT if do else 0, 0)


def client_reply(response: bytes, query: wire.Query, data: bytes, *, max_udp_size: int) -> bytes:
    """The upstream response re-addressed to this client: its ID and question,
    RA set, and an OPT exactly when the client sent one."""
    recs = records(response)
    qend = wire.skip_name(response, 12) + 4
    qd, an, ns, ar = struct.unpack_from("!HHHH", response, 4)
    body = bytearray(response[:12])
    body += data[12 : query.name_end + 4]  # the client's own question, letter case included
    opt_seen = False
    ar_count = ar
    tail = bytearray()
    for rec in recs:
        raw = response[rec.start : rec.end]
        if rec.rtype == wire.OPT_TYPE:
            if query.opt is None:
                ar_count -= 1
                continue
            opt_seen = True
            raw = raw[:3] + struct.pack("!H", max_udp_size) + raw[5:]
        tail += raw
    if query.opt is not None and not opt_seen:
        tail += _opt_record(max_udp_size, query.opt.do)
        ar_count += 1
    # Compression pointers into the question stay valid: it has the same length.
    body += response[qend : recs[0].start] if recs else response[qend:]
    body += tail
    # RA: we recurse for this client; AA: we are not the authority for it.
    flags = (struct.unpack_from("!H", response, 2)[0] | wire.RA) & ~wire.AA
    struct.pack_into("!HHHHHH", body, 0, query.id, flags, qd, an, ns, ar_count)
    return bytes(body)


def truncated(reply: bytes, query: wire.Query) -> bytes:
    """Header, question and OPT only, TC set: the client retries over TCP."""
    qlen = query.name_end + 4 - 12
    flags = struct.unpack_from("!H", reply, 2)[0] | wire.TC
    out = bytearray(struct.pack("!HHHHHH", query.id, flags, 1, 0, 0, 0))
    out += reply[12 : 12 + qlen]
    if query.opt is not None:
        for rec in records(reply):
            if rec.rtype == wire.OPT_TYPE:
                out += reply[rec.start : rec.end]
                struct.pack_into("!H", out, 10, 1)
                break
    return bytes(out)


def cache_ttl(response: bytes, config: ForwardConfig) -> int | None:
    """How long an upstream response may be cached, or None for not at all."""
    flags = struct.unpack_from("!H", response, 2)[0]
    rcode = flags & 0xF
    recs = [r for r in records(response) if r.rtype != wire.OPT_TYPE]
    answers = [r for r in recs if r.section == 0]
    if rcode == wire.NOERROR and answers:
        ttl: int = min(struct.unpack_from("!I", response, r.ttl_offset)[0] for r in answers)
        return max(config.min_ttl, min(ttl, config.max_ttl))
    if rcode in (wire.NOERROR, wire.NXDOMAIN):
        # RFC 2308 section 5: the SOA's TTL, at most its MINIMUM field.
        for rec in recs:
            if rec.section == 1 and rec.rtype == SOA_TYPE:
                soa_ttl: int = struct.unpack_from("!I", response, rec.ttl_offset)[0]
                minimum: int = struct.unpack_from("!I", response, rec.end - 4)[0]
                return min(soa_ttl, minimum, config.max_negative_ttl)
    return None


class CachedAnswer:
    """An answer body (the reply after its ID) whose TTLs count down."""

    __slots__ = (
        "_body",
        "_original",
        "_patched",
        "cur",
        "expires",
        "hits",
        "qlen",
        "sec",
        "stat",
        "stored",
        "ttls",
    )

    def __init__(self, body: bytes, qlen: int, ttl: int, now: float, *, stat: int) -> None:
        self._original = body
        self._body = body
        self._patched = 0
        self.qlen = qlen
        self.stored = now
        self.expires = now + ttl
        # No record outlives the entry: for a negative answer that makes the
        # SOA's TTL the negative TTL (RFC 2308 section 5).
        self.ttls: list[tuple[int, int]] = [
            (r.ttl_offset - 2, min(ttl, struct.unpack_from("!I", body, r.ttl_offset - 2)[0]))
            for r in records(b"\x00\x00" + body)
            if r.rtype != wire.OPT_TYPE
        ]
        self._original = self._with_ttls(lambda t: t)
        self._body = self._original
        # The body valid for the whole of second `sec` of the coarse clock (-1:
        # none), which the UDP transport serves without calling in here.
        self.sec = -1
        self.cur = self._body
        # UDP replies served from this entry (the transport adds one per hit),
        # counted under `stat` (an id in Forwarder.stat_ids), folded into
        # stat_ids.hits when the entry is dropped.
        self.hits = 0
        self.stat = stat

    def body(self, now: float, *, stale: bool = False) -> bytes:
        if stale:
            return self._with_ttls(lambda ttl: min(ttl, STALE_TTL) if ttl else STALE_TTL)
        elapsed = int(now - self.stored)
        if elapsed != self._patched:
            self._patched = elapsed
            self._body = self._with_ttls(lambda ttl: max(0, ttl - elapsed))
        return self._body

    def _with_ttls(self, fn: Callable[[int], int]) -> bytes:
        out = bytearray(self._original)
        for offset, ttl in self.ttls:
            struct.pack_into("!I", out, offset, fn(ttl))
        return bytes(out)


# -- upstream exchanges --------------------------------------------------------------


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, accept: Callable[[bytes], bool]) -> None:
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._accept = accept

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.future.done() and self._accept(data):
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


async def exchange_udp(
    upstream: tuple[str, int], message: bytes, timeout: float, accept: Callable[[bytes], bool]
) -> bytes:
    loop = asyncio.get_running_loop()
    # A fresh socket (random source port) per query, connected to the upstream:
    # only its answers reach us, and a spoofer must guess port and ID.
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(accept), remote_addr=upstream
    )
    try:
        transport.sendto(message)
        return await asyncio.wait_for(protocol.future, timeout)
    finally:
        transport.close()


async def exchange_tcp(
    upstream: tuple[str, int], message: bytes, timeout: float, accept: Callable[[bytes], bool]
) -> bytes:
    async def run() -> bytes:
        reader, writer = await asyncio.open_connection(*upstream)
        try:
            writer.write(len(message).to_bytes(2, "big") + message)
            await writer.drain()
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                if accept(data):
                    return data
        finally:
            writer.close()

    return await asyncio.wait_for(run(), timeout)


class UpstreamFailedError(Exception):
    pass


# -- the forwarder -------------------------------------------------------------------


class Forwarder:
    def __init__(
        self,
        config: ForwardConfig,
        *,
        upstreams: Sequence[tuple[str, int]],
        allow: Sequence[str],
        max_udp_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.upstreams = tuple(upstreams)
        self._networks = [ipaddress.ip_network(n) for n in allow]
        self.decisions: dict[str, bool] = {}  # client address -> may recurse
        self._max_udp_size = max_udp_size
        self._clock = clock
        self._rotation = 0
        self._in_flight = 0
        self._pending: dict[tuple[bytes, bool], asyncio.Future[bytes]] = {}
        self.cache: dict[bytes, CachedAnswer] = {}
        self.sec = -1  # the coarse clock: whole seconds of `clock`, set by run_clock
        self.stats = {"upstream_queries": 0, "upstream_failures": 0, "coalesced": 0}
        # What cached answers count under; its `hits` are those no live entry
        # holds: dropped entries' UDP hits, and TCP hits.
        self.stat_ids = StatIds()
        self.upstream_stats: dict[tuple[str, int], UpstreamStats] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.upstreams)

    def allowed(self, client: str) -> bool:
        decision = self.decisions.get(client)
        if decision is None:
            try:
                ip = ipaddress.ip_address(client)
            except ValueError:
                decision = False
            else:
                decision = any(ip in net for net in self._networks)
            if len(self.decisions) >= MAX_ALLOW_DECISIONS:
                self.decisions.clear()
            self.decisions[client] = decision
        return decision

    # -- cache ------------------------------------------------------------------

    def cached(self, key: bytes, data: bytes, *, spliced: bool, tcp: bool = False) -> bytes | None:
        """A fresh cached reply for the query (counted as a hit), or None."""
        entry = self.cache.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires:
            if not self.config.serve_stale:
                self.drop(key)
            return None
        if tcp:
            over_tcp = (True, *self.stat_ids.keys[entry.stat][1:])
            self.stat_ids.hits[self.stat_ids.id(over_tcp)] += 1
        else:
            entry.hits += 1
        body = entry.body(now)
        if int(now) == self.sec and entry.expires >= self.sec + 1:
            entry.sec, entry.cur = self.sec, body
        if spliced:
            end = 10 + entry.qlen
            return data[:2] + body[:10] + data[12 : 12 + entry.qlen] + body[end:]
        return data[:2] + body

    async def run_clock(self) -> None:
        """Tick the coarse clock once a second, so the transport can tell a
        fresh cached body with one integer compare."""
        while True:
            now = self._clock()
            self.sec = int(now)
            await asyncio.sleep(max(0.001, self.sec + 1 - now))

    def drop(self, key: bytes) -> None:
        """Remove a cached answer, keeping its hits in the totals."""
        entry = self.cache.pop(key, None)
        if entry is not None and entry.hits:
            self.stat_ids.hits[entry.stat] += entry.hits

    def _store(self, key: bytes, reply: bytes, qlen: int, ttl: int) -> None:
        if not self.config.cache_size:
            return
        if key in self.cache:
            self.drop(key)
        elif len(self.cache) >= self.config.cache_size:
            self._evict()
        # Stored with the lowercased question, as the key has it.
        body = reply[2:12] + key[10 : 10 + qlen] + reply[12 + qlen :]
        stat = self.stat_ids.id(_stat_of(body, qlen))
        self.cache[key] = CachedAnswer(body, qlen, ttl, self._clock(), stat=stat)

    def _evict(self) -> None:
        """Drop expired entries past any stale window, else the oldest stored."""
        now = self._clock()
        keep_for = self.config.stale_max_age if self.config.serve_stale else 0.0
        dead = [k for k, e in self.cache.items() if now >= e.expires + keep_for]
        for key in dead:
            self.drop(key)
        if len(self.cache) >= self.config.cache_size:
            self.drop(next(iter(self.cache)))

    def _stale(self, key: bytes, data: bytes) -> bytes | None:
        entry = self.cache.get(key)
        if entry is None or not self.config.serve_stale:
            return None
        now = self._clock()
        if now > entry.expires + self.config.stale_max_age:
            return None
        body = entry.body(now, stale=True)
        end = 10 + entry.qlen
        return data[:2] + body[:10] + data[12 : 12 + entry.qlen] + body[end:]

    # -- resolution ---------------------------------------------------------------

    async def resolve(self, query: wire.Query, data: bytes, key: bytes, *, tcp: bool) -> bytes:
        """The reply for a client, from upstream (or stale cache, or SERVFAIL)."""
        limit = 65535 if tcp else self._udp_limit(query)
        qlen = query.name_end + 4 - 12
        do = bool(query.opt and query.opt.do)
        question = data[12 : query.name_end].lower() + data[query.name_end : query.name_end + 4]
        flight = (question + (b"\x01" if do else b"\x00"), tcp)
        try:
            future = self._pending.get(flight)
            if future is not None:
                self.stats["coalesced"] += 1
                response = await asyncio.shield(future)
            else:
                response = await self._lead(flight, query, data, tcp=tcp)
        except UpstreamFailedError:
            stale = self._stale(key, data)
            if stale is not None:
                return stale
            return wire.header_only(data, wire.SERVFAIL, echo_question=True)
        reply = client_reply(response, query, data, max_udp_size=self._max_udp_size)
        ttl = cache_ttl(response, self.config)
        if ttl is not None and not struct.unpack_from("!H", response, 2)[0] & wire.TC:
            self._store(key, reply, qlen, ttl)
        if len(reply) > limit:
            return truncated(reply, query)
        return reply

    def _udp_limit(self, query: wire.Query) -> int:
        if query.opt is None:
            return 512
        return max(512, min(query.opt.udp_size, self._max_udp_size))

    async def _lead(
        self, flight: tuple[bytes, bool], query: wire.Query, data: bytes, *, tcp: bool
    ) -> bytes:
        if self._in_flight >= self.config.max_concurrent:
            raise UpstreamFailedError("too many upstream queries in flight")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[flight] = future
        self._in_flight += 1
        try:
            response = await self._ask_upstreams(query, data, tcp=tcp)
        except BaseException as exc:
            if not future.done():
                future.set_exception(
                    exc if isinstance(exc, UpstreamFailedError) else UpstreamFailedError(str(exc))
                )
                future.exception()  # retrieved: waiters may be none
            raise
        else:
            future.set_result(response)
            return response
        finally:
            self._in_flight -= 1
            del self._pending[flight]

    def _order(self) -> list[tuple[str, int]]:
        upstreams = list(self.upstreams)
        if self.config.policy == "round_robin":
            start = self._rotation % len(upstreams)
            self._rotation += 1
            return upstreams[start:] + upstreams[:start]
        if self.config.policy == "random":
            random.shuffle(upstreams)
        return upstreams

    async def _ask_upstreams(self, query: wire.Query, data: bytes, *, tcp: bool) -> bytes:
        question = data[12 : query.name_end + 4]
        cd = struct.unpack_from("!H", data, 2)[0] & wire.CD
        do = bool(query.opt and query.opt.do)
        last_error = "no upstream"
        for upstream in self._order():
            qid = random.getrandbits(16)
            message = (
                struct.pack("!HHHHHH", qid, wire.RD | cd, 1, 0, 0, 1)
                + question
                + _opt_record(self._max_udp_size, do)
            )

            def accept(response: bytes, qid: int = qid) -> bool:
                return (
                    len(response) >= 12 + len(question)
                    and struct.unpack_from("!H", response)[0] == qid
                    and bool(response[2] & 0x80)
                    and response[12 : 12 + len(question)].lower() == question.lower()
                )

            self.stats["upstream_queries"] += 1
            stats = self.upstream_stats.get(upstream)
            if stats is None:
                stats = self.upstream_stats[upstream] = UpstreamStats()
            stats.requests += 1
            started = time.perf_counter()
            try:
                if tcp:
                    response = await exchange_tcp(upstream, message, self.config.timeout, accept)
                else:
                    response = await exchange_udp(upstream, message, self.config.timeout, accept)
                    if response[2] & 0x02:  # TC: the same upstream over TCP
                        response = await exchange_tcp(
                            upstream, message, self.config.timeout, accept
                        )
                records(response)  # well-formed, or Malformed
            except (OSError, TimeoutError, asyncio.IncompleteReadError, wire.Malformed) as exc:
                self.stats["upstream_failures"] += 1
                reason = _failure_reason(exc)
                stats.failures[reason] = stats.failures.get(reason, 0) + 1
                last_error = f"{upstream[0]}:{upstream[1]}: {type(exc).__name__} {exc}".strip()
                continue
            rcode = response[3] & 0xF
            stats.durations.observe(time.perf_counter() - started)
            stats.responses[rcode] = stats.responses.get(rcode, 0) + 1
            if rcode in (wire.SERVFAIL, wire.REFUSED):
                self.stats["upstream_failures"] += 1
                reason = "servfail" if rcode == wire.SERVFAIL else "refused"
                stats.failures[reason] = stats.failures.get(reason, 0) + 1
                last_error = f"{upstream[0]}:{upstream[1]}: rcode {rcode}"
                continue
            return response
        raise UpstreamFailedError(last_error)


def _stat_of(body: bytes, qlen: int) -> StatKey:
    """What a cached answer's UDP hits count under (body: the reply after its ID)."""
    qtype = struct.unpack_from("!H", body, 10 + qlen - 4)[0]
    answered = struct.unpack_from("!H", body, 4)[0] > 0
    return (False, known_qtype(qtype), body[1] & 0xF, ".", answered)


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, wire.Malformed):
        return "malformed"
    return "network"
