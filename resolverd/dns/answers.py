"""DNS answers as derived data: built from the view + balancing, cached as wire bytes.

The hot path never parses or builds with dnslib. A query whose bytes after the
ID equal a cached key is answered by prefixing its ID to a precomputed body
(header flags and counts, the lowercased question, the records). Orderings that
change per query are a cycle of precomputed variants; orderings that depend on
the client (ip_hash, sticky sessions) pick a variant per query. Everything
else goes through `Answerer.slow`, which builds the entry with dnslib once.

Caches are dropped whole when the table's revision changes and per service when
least-connections counts change.

Counting for resolverd.metrics costs the hot path one integer increment: each
cached `Entry` counts its own hits and carries what they are counted under
(`stat`, an id in `Answerer.stat_ids`, fixed when it is built); a dropped
entry's hits are folded into `stat_ids.hits`. Replies that come from no cached
entry (answers being built, error replies, forwarded queries) are counted, and
timed, in plain dicts here.
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import dnslib
import structlog

from resolverd.balancing import Balancer, ClientContext, Plan
from resolverd.config import Algorithm, BalancePolicy, DnsConfig
from resolverd.dns import wire
from resolverd.dns.forward import Forwarder
from resolverd.dns.names import Kind, Name, parse_name, split_labels
from resolverd.metrics import Durations, StatIds, StatKey, known_qtype
from resolverd.model import Instance, label_for, parse_ip, version_label
from resolverd.table import View

log = structlog.get_logger(__name__)

A, NS, SOA, HINFO, AAAA, SRV, ANY = 1, 2, 6, 13, 28, 33, 255
AXFR, IXFR = 252, 251
IN = 1
MAX_CACHE_ENTRIES = 20_000
RFC8482_HINFO = b"\x07RFC8482\x00"
# The zone of replies to messages no zone handled (FORMERR, NOTIMP), as CoreDNS.
DROPPED_ZONE = "dropped"


@dataclass(slots=True)
class Records:
    """The sections of one answer variant (dnslib RRs)."""

    answer: list[dnslib.RR] = field(default_factory=list)
    authority: list[dnslib.RR] = field(default_factory=list)
    additional: list[dnslib.RR] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Forward:
    """The answer must come from upstream: `Answerer.forward` gets it."""

    query: wire.Query
    data: bytes
    key: bytes
    tcp: bool
    started: float = 0.0  # time.perf_counter() when the query came in


@dataclass(slots=True)
class Outcome:
    rcode: int
    authoritative: bool
    records: Records = field(default_factory=Records)
    # Balanced answers: records for one order of instances, and the plan.
    render: Callable[[tuple[Instance, ...]], Records] | None = None
    plan: Plan | None = None
    service: str | None = None
    policy: BalancePolicy | None = None
    recursion: bool = False  # RA: this answer comes from the forwarding resolver


class Entry:
    """A cached answer: bodies (reply bytes after the ID) per variant.

    Client-independent entries walk `sched` (bodies in schedule order) with the
    service's shared counter; client-dependent ones call `pick`.
    """

    __slots__ = (
        "bodies",
        "client_key",
        "counter",
        "hits",
        "n",
        "pick",
        "qlen",
        "sched",
        "service",
        "stat",
    )

    def __init__(
        self,
        *,
        bodies: list[bytes],
        qlen: int,
        service: str | None,
        sched: list[bytes] | None,
        counter: Iterator[int],
        pick: Callable[[str], int] | None,
        client_key: str | None,
        stat: int,
    ) -> None:
        self.bodies = bodies
        self.qlen = qlen
        self.service = service
        self.sched = sched
        self.n = len(sched) if sched else 1
        self.counter = counter
        self.pick = pick
        self.client_key = client_key
        self.stat = stat
        # Replies served from the cache (the first one, which built it, is not
        # one); the UDP transport's inlined path adds its own.
        self.hits = 0

    def body(self, client: str) -> bytes:
        if self.sched is not None:
            return self.sched[next(self.counter) % self.n]
        assert self.pick is not None
        return self.bodies[self.pick(self.client_key or client)]

    def reply(self, data: bytes, client: str) -> bytes:
        """For a query whose bytes match the key exactly: a cache hit."""
        self.hits += 1
        return data[:2] + self.body(client)

    def reply_spliced(self, data: bytes, client: str) -> bytes:
        """For a query that matches modulo letter case: keep the client's question."""
        body = self.body(client)
        end = 10 + self.qlen
        return data[:2] + body[:10] + data[12 : 12 + self.qlen] + body[end:]


_FIXED = itertools.repeat(0)


class Answerer:
    def __init__(
        self,
        *,
        config: DnsConfig,
        balancer: Balancer,
        policy_for: Callable[[str], BalancePolicy],
        view: View,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.config = config
        self.forwarder = forwarder if forwarder is not None and forwarder.enabled else None
        self.balancer = balancer
        self.policy_for = policy_for
        self.view = view
        self.domains = tuple(split_labels(d) for d in config.domains)
        self.udp_cache: dict[bytes, Entry] = {}
        self.tcp_cache: dict[bytes, Entry] = {}
        self._keys_by_service: dict[str, list[tuple[dict[bytes, Entry], bytes]]] = {}
        self._ns_addresses = _ns_addresses(config)
        self._errors_logged = 0
        # For resolverd.metrics. `counts`: replies no cached entry served;
        # `stat_ids`: what entries count under, and dropped entries' hits.
        self.counts: dict[StatKey, int] = {}
        self.stat_ids = StatIds()
        self.misses = {"answer": 0, "forward": 0}
        self.durations = {"build": Durations(), "direct": Durations(), "forward": Durations()}

    def reconfigure(
        self,
        *,
        config: DnsConfig,
        policy_for: Callable[[str], BalancePolicy],
        forwarder: Forwarder | None,
    ) -> None:
        """A reloaded config: new answer rules, same caches objects (cleared)."""
        self.config = config
        self.policy_for = policy_for
        self.domains = tuple(split_labels(d) for d in config.domains)
        self._ns_addresses = _ns_addresses(config)
        self.forwarder = forwarder if forwarder is not None and forwarder.enabled else None
        self.clear()

    # -- invalidation -------------------------------------------------------

    def set_view(self, view: View) -> None:
        added = set(view.services) - set(self.view.services)
        self.view = view
        self.clear()
        if added and self.forwarder is not None:
            # A bare name that was forwarded may now be a service of ours.
            for key in [k for k in self.forwarder.cache if _last_label(k) in added]:
                self.forwarder.drop(key)

    def clear(self) -> None:
        # Cleared in place: the transports hold references to these dicts.
        self._retire(self.udp_cache.values())
        self._retire(self.tcp_cache.values())
        self.udp_cache.clear()
        self.tcp_cache.clear()
        self._keys_by_service.clear()

    def invalidate_service(self, service: str) -> None:
        for cache, key in self._keys_by_service.pop(service, ()):
            entry = cache.pop(key, None)
            if entry is not None:
                self._retire((entry,))

    def _retire(self, entries: Iterable[Entry]) -> None:
        """Keep the hits of entries being dropped: one pass, ~1 ms per 20,000
        (freeing them costs ~5 ms anyway)."""
        hits = self.stat_ids.hits
        for entry in entries:
            if entry.hits:
                hits[entry.stat] += entry.hits

    def connections_changed(self, instance_id: str) -> None:
        inst = self.view.by_id.get(instance_id)
        if inst is not None:
            policy = self.policy_for(inst.name)
            if policy.algorithm is Algorithm.LEAST_CONNECTIONS:
                self.invalidate_service(inst.name)

    # -- query path -----------------------------------------------------------

    def respond(self, data: bytes, client: str, *, tcp: bool) -> bytes | Forward | None:
        cache = self.tcp_cache if tcp else self.udp_cache
        entry = cache.get(data[2:])
        if entry is not None:
            return entry.reply(data, client)
        return self.slow(data, client, tcp=tcp)

    def slow(self, data: bytes, client: str, *, tcp: bool) -> bytes | Forward | None:
        """Everything the exact-bytes cache did not answer. Never raises."""
        try:
            return self._slow(data, client, tcp=tcp)
        except Exception:
            if self._errors_logged < 10:
                self._errors_logged += 1
                log.exception("dns.internal_error", size=len(data))
            if len(data) >= 12:
                stat = (tcp, 0, wire.SERVFAIL, DROPPED_ZONE, False)
                self.counts[stat] = self.counts.get(stat, 0) + 1
                return wire.header_only(data, wire.SERVFAIL)
            return None

    def _slow(self, data: bytes, client: str, *, tcp: bool) -> bytes | Forward | None:
        fwd = self.forwarder
        if fwd is not None and fwd.cache and fwd.allowed(client):
            # Forwarded names answered from the forwarding cache: as cheap as a
            # service answer, for clients allowed to recurse.
            hit = fwd.cached(data[2:], data, spliced=False, tcp=tcp)
            if hit is not None:
                return hit
        started = time.perf_counter()
        if len(data) < 12:
            return None  # not even a header to answer to
        _qid, flags, qdcount, _an, _ns, _ar = wire.HEADER.unpack_from(data)
        if flags & wire.QR:
            return None  # a response: answering it could start a loop
        if (flags >> 11) & 0xF != 0:
            return self._error(data, wire.NOTIMP, tcp=tcp, started=started)
        if qdcount != 1:
            return self._error(data, wire.FORMERR, tcp=tcp, started=started)
        try:
            query = wire.parse_query(data)
        except wire.Malformed:
            return self._error(data, wire.FORMERR, tcp=tcp, started=started)
        qlen = query.name_end + 4 - 12
        norm = data[2:12] + data[12 : query.name_end].lower() + data[query.name_end :]
        cache = self.tcp_cache if tcp else self.udp_cache
        entry = cache.get(norm)
        if entry is not None:
            entry.hits += 1  # the same question in other letter case
            return entry.reply_spliced(data, client)
        if fwd is not None and self._outside(query):
            return self._forwarded(fwd, query, data, norm, client, tcp=tcp, started=started)
        entry = self._build_entry(query, qlen, tcp=tcp)
        if len(cache) >= MAX_CACHE_ENTRIES:
            self.clear()
        cache[norm] = entry
        if entry.service is not None:
            self._keys_by_service.setdefault(entry.service, []).append((cache, norm))
        reply = entry.reply_spliced(data, client)
        self.misses["answer"] += 1
        self._count(self.stat_ids.keys[entry.stat], "build", started)
        return reply

    def _count(self, stat: StatKey, path: str, started: float) -> None:
        """One reply that no cached entry served, and how long it took."""
        self.counts[stat] = self.counts.get(stat, 0) + 1
        self.durations[path].observe(time.perf_counter() - started)

    def _error(self, data: bytes, rcode: int, *, tcp: bool, started: float) -> bytes:
        """A header-only reply to a message no zone can handle."""
        reply = wire.header_only(data, rcode)
        self._count((tcp, 0, rcode, DROPPED_ZONE, False), "direct", started)
        return reply

    # -- forwarding -----------------------------------------------------------

    def _outside(self, query: wire.Query) -> bool:
        """A well-formed IN query for a name outside every served zone."""
        if query.qclass != IN or (query.opt is not None and query.opt.version > 0):
            return False
        labels = tuple(lbl.lower().decode("latin-1") for lbl in query.labels)
        name = parse_name(
            labels,
            domains=self.domains,
            datacenter=self.config.datacenter,
            services=self.view.services,
        )
        return name is None

    def _forwarded(
        self,
        fwd: Forwarder,
        query: wire.Query,
        data: bytes,
        key: bytes,
        client: str,
        *,
        tcp: bool,
        started: float,
    ) -> bytes | Forward:
        if not fwd.allowed(client):
            # Not an open resolver: only our own zones for everyone else.
            outcome = Outcome(rcode=wire.REFUSED, authoritative=False)
        elif query.qtype == ANY:
            qname = dnslib.DNSLabel([lbl.lower() for lbl in query.labels])
            rr = dnslib.RR(qname, HINFO, ttl=self.config.ttl, rdata=dnslib.RD(RFC8482_HINFO))
            outcome = Outcome(wire.NOERROR, False, recursion=True, records=Records(answer=[rr]))
        else:
            hit = fwd.cached(key, data, spliced=True, tcp=tcp)
            if hit is not None:
                return hit
            self.misses["forward"] += 1
            return Forward(query=query, data=data, key=key, tcp=tcp, started=started)
        reply = self._direct(query, data, outcome)
        stat = (tcp, known_qtype(query.qtype), outcome.rcode, ".", bool(outcome.records.answer))
        self._count(stat, "direct", started)
        return reply

    def _direct(self, query: wire.Query, data: bytes, outcome: Outcome) -> bytes:
        """A reply for this client only (it depends on who asks): not cached."""
        raw = [lbl.lower() for lbl in query.labels]
        body = self._pack(query, dnslib.DNSLabel(raw), outcome, outcome.records, limit=512, scope=0)
        qlen = query.name_end + 4 - 12
        return data[:2] + body[:10] + data[12 : 12 + qlen] + body[10 + qlen :]

    async def forward(self, request: Forward) -> bytes:
        """The upstream's answer for a `Forward`; SERVFAIL on internal errors."""
        assert self.forwarder is not None
        try:
            reply = await self.forwarder.resolve(
                request.query, request.data, request.key, tcp=request.tcp
            )
        except Exception:
            if self._errors_logged < 10:
                self._errors_logged += 1
                log.exception("dns.forward_error")
            reply = wire.header_only(request.data, wire.SERVFAIL)
        answered = struct.unpack_from("!H", reply, 6)[0] > 0
        stat = (request.tcp, known_qtype(request.query.qtype), reply[3] & 0xF, ".", answered)
        self._count(stat, "forward", request.started)
        return reply

    # -- building -------------------------------------------------------------

    def _build_entry(self, query: wire.Query, qlen: int, *, tcp: bool) -> Entry:
        opt = query.opt
        raw = tuple(lbl.lower() for lbl in query.labels)
        labels = tuple(lbl.decode("latin-1") for lbl in raw)
        # A DNSLabel from the raw bytes: labels may hold any octet (even '.').
        qname = dnslib.DNSLabel(list(raw))
        limit = (
            65535
            if tcp
            else (max(512, min(opt.udp_size, self.config.max_udp_size)) if opt else 512)
        )

        if opt is not None and opt.version > 0:
            outcome = Outcome(rcode=wire.BADVERS, authoritative=False)
        elif query.qclass != IN:
            outcome = Outcome(rcode=wire.REFUSED, authoritative=False)
        else:
            name = parse_name(
                labels,
                domains=self.domains,
                datacenter=self.config.datacenter,
                services=self.view.services,
            )
            outcome = self.resolve(name, query.qtype, qname)

        client_key = opt.subnet.network if opt and opt.subnet and opt.subnet.source_prefix else None
        plan = outcome.plan
        client_dependent = plan is not None and plan.client_dependent
        scope = opt.subnet.source_prefix if client_dependent and opt and opt.subnet else 0

        def pack(records: Records) -> bytes:
            return self._pack(query, qname, outcome, records, limit=limit, scope=scope)

        balanced = plan is not None and bool(plan.instances) and outcome.render is not None
        answered = balanced or bool(outcome.records.answer)
        stat = self.stat_ids.id(
            (tcp, known_qtype(query.qtype), outcome.rcode, self._zone_of(labels), answered)
        )
        if plan is None or not plan.instances or outcome.render is None:
            body = pack(outcome.records)
            return Entry(
                bodies=[body],
                qlen=qlen,
                service=outcome.service,
                sched=[body],
                counter=_FIXED,
                pick=None,
                client_key=None,
                stat=stat,
            )
        render = outcome.render
        bodies = [pack(render(plan.order(i))) for i in range(len(plan.instances))]
        service, policy = outcome.service, outcome.policy
        assert service is not None and policy is not None
        if client_dependent:
            balancer = self.balancer

            def pick(key: str) -> int:
                index = balancer.pick(service, plan, policy, ClientContext(address=key))
                return index or 0

            return Entry(
                bodies=bodies,
                qlen=qlen,
                service=service,
                sched=None,
                counter=_FIXED,
                pick=pick,
                client_key=client_key,
                stat=stat,
            )
        return Entry(
            bodies=bodies,
            qlen=qlen,
            service=service,
            sched=[bodies[i] for i in plan.schedule],
            counter=self.balancer.counter(service),
            pick=None,
            client_key=None,
            stat=stat,
        )

    def _pack(
        self,
        query: wire.Query,
        qname: dnslib.DNSLabel,
        outcome: Outcome,
        records: Records,
        *,
        limit: int,
        scope: int,
    ) -> bytes:
        rcode = outcome.rcode
        reply = dnslib.DNSRecord(
            dnslib.DNSHeader(id=0, qr=1), q=dnslib.DNSQuestion(qname, query.qtype, query.qclass)
        )
        for rr in records.answer:
            reply.add_answer(rr)
        for rr in records.authority:
            reply.add_auth(rr)
        for rr in records.additional:
            reply.add_ar(rr)
        opt = query.opt
        if opt is not None:
            opts = []
            if opt.subnet is not None:
                ecs = opt.subnet.option(scope)
                opts.append(dnslib.EDNSOption(wire.ECS_OPTION, ecs[4:]))
            reply.add_ar(
                dnslib.EDNS0(
                    udp_len=self.config.max_udp_size,
                    ext_rcode=rcode >> 4,
                    flags="do" if opt.do else "",
                    opts=opts,
                )
            )
        flags = (
            wire.QR
            | (wire.AA if outcome.authoritative else 0)
            | (wire.RA if outcome.recursion else 0)
            | (query.flags & (wire.RD | wire.CD))
            | (rcode & 0xF)
        )
        packed = bytearray(reply.pack())
        if len(packed) > limit:
            # Over UDP: the header, the question and the OPT, with TC set; the
            # client retries over TCP (RFC 1035 4.2.1, RFC 6891 7).
            reply.rr, reply.auth = [], []
            reply.ar = [rr for rr in reply.ar if rr.rtype == wire.OPT_TYPE]
            packed = bytearray(reply.pack())
            flags |= wire.TC
        struct.pack_into("!H", packed, 2, flags)
        return bytes(packed[2:])

    # -- name resolution (policy) -------------------------------------------

    def resolve(self, name: Name | None, qtype: int, qname: dnslib.DNSLabel) -> Outcome:
        if name is None:
            return Outcome(rcode=wire.REFUSED, authoritative=False)
        if qtype in (AXFR, IXFR):
            return Outcome(rcode=wire.REFUSED, authoritative=False)
        if name.kind is Kind.APEX:
            return self._apex(name, qtype, qname)
        if name.kind is Kind.NAMESERVER:
            return self._addresses(name, qtype, qname, self._ns_addresses)
        if name.kind is Kind.INSTANCE:
            return self._instance(name, qtype, qname)
        if name.kind is Kind.SERVICE:
            return self._service(name, qtype, qname)
        return self._negative(name, wire.NXDOMAIN)

    def _zone_of(self, labels: tuple[str, ...]) -> str:
        """The metrics zone of a name: the served domain it is under, else "."
        (bare service names and forwarded names, as CoreDNS's root zone)."""
        best: tuple[str, ...] = ()
        for domain in self.domains:
            n = len(domain)
            if n > len(best) and len(labels) >= n and labels[len(labels) - n :] == domain:
                best = domain
        return ".".join(best) + "." if best else "."

    def _zone_name(self, name: Name) -> str:
        return ".".join(name.zone) + "."

    def _domain(self, name: Name) -> str:
        domain = name.domain if name.domain is not None else self.domains[0]
        return ".".join(domain) + "."

    def _soa(self, name: Name) -> dnslib.RR:
        soa = self.config.soa
        domain = self._domain(name)
        mname = soa.mname or f"ns.dns.{domain}"
        rname = soa.rname or f"hostmaster.{domain}"
        times = (
            self.view.revision & 0xFFFFFFFF,
            soa.refresh,
            soa.retry,
            soa.expire,
            soa.minimum,
        )
        return dnslib.RR(
            self._zone_name(name),
            SOA,
            ttl=soa.minimum,
            rdata=dnslib.SOA(_fqdn(mname), _fqdn(rname), times),
        )

    def _negative(self, name: Name, rcode: int) -> Outcome:
        """NXDOMAIN, or NODATA with rcode NOERROR: the SOA in authority (RFC 2308)."""
        return Outcome(
            rcode=rcode, authoritative=True, records=Records(authority=[self._soa(name)])
        )

    def _any(self, qname: dnslib.DNSLabel) -> Outcome:
        # RFC 8482 4.2: a synthesized HINFO instead of every RRset.
        rr = dnslib.RR(qname, HINFO, ttl=self.config.ttl, rdata=dnslib.RD(RFC8482_HINFO))
        return Outcome(rcode=wire.NOERROR, authoritative=True, records=Records(answer=[rr]))

    def _apex_records(self, name: Name, qtype: int, qname: dnslib.DNSLabel) -> Outcome | None:
        if qtype == SOA:
            soa = self._soa(name)
            soa.ttl = self.config.ttl
            return Outcome(wire.NOERROR, True, Records(answer=[soa]))
        if qtype == NS:
            ns_name = f"ns.dns.{self._domain(name)}"
            answer = [dnslib.RR(qname, NS, ttl=self.config.ttl, rdata=dnslib.NS(ns_name))]
            glue = [self._address_rr(ns_name, ip) for ip in self._ns_addresses]
            return Outcome(wire.NOERROR, True, Records(answer=answer, additional=glue))
        return None

    def _apex(self, name: Name, qtype: int, qname: dnslib.DNSLabel) -> Outcome:
        outcome = self._apex_records(name, qtype, qname)
        if outcome is not None:
            return outcome
        if qtype == ANY:
            return self._any(qname)
        return self._negative(name, wire.NOERROR)

    def _address_rr(self, owner: str, ip: str) -> dnslib.RR:
        if ":" in ip:
            return dnslib.RR(owner, AAAA, ttl=self.config.ttl, rdata=dnslib.AAAA(ip))
        return dnslib.RR(owner, A, ttl=self.config.ttl, rdata=dnslib.A(ip))

    def _addresses(
        self, name: Name, qtype: int, qname: dnslib.DNSLabel, ips: tuple[str, ...]
    ) -> Outcome:
        if qtype == ANY:
            return self._any(qname)
        want6 = qtype == AAAA
        answer = [
            self._address_rr(qname, ip) for ip in ips if qtype in (A, AAAA) and (":" in ip) == want6
        ]
        if not answer:
            return self._negative(name, wire.NOERROR)
        return Outcome(wire.NOERROR, True, Records(answer=answer))

    def _instance(self, name: Name, qtype: int, qname: dnslib.DNSLabel) -> Outcome:
        assert name.service is not None
        for inst in self.view.instances(name.service):
            if label_for(inst.id) == name.instance and inst.ip is not None:
                return self._addresses(name, qtype, qname, (str(inst.ip),))
        return self._negative(name, wire.NXDOMAIN)

    def _service(self, name: Name, qtype: int, qname: dnslib.DNSLabel) -> Outcome:
        service = name.service
        assert service is not None
        matching = [
            inst
            for inst in self.view.instances(service)
            if (name.tag is None or name.tag in (t.lower() for t in inst.tags))
            and (name.version is None or version_label(inst.version) == name.version)
            and (
                name.port_name is None
                or (inst.port_name == name.port_name and inst.protocol == name.protocol)
            )
        ]
        if not matching:
            return self._negative(name, wire.NXDOMAIN)
        if name.domain is None and len(name.zone) == 1 and name.version is None:
            outcome = self._apex_records(name, qtype, qname)
            if outcome is not None:
                return outcome
        if qtype == ANY:
            return self._any(qname)
        if qtype not in (A, AAAA, SRV):
            return self._negative(name, wire.NOERROR)
        policy = self.policy_for(service)
        plan = self.balancer.plan(service, matching, policy, location=self.config.client_location)
        if qtype != SRV:
            family = 6 if qtype == AAAA else 4
            eligible = [i for i in plan.instances if i.ip is not None and i.ip.version == family]
            if not eligible:
                return self._negative(name, wire.NOERROR)
            if len(eligible) != len(plan.instances):
                # Only the instances of this family take part in the order.
                plan = self.balancer.plan(
                    service, eligible, policy, location=self.config.client_location
                )
        if not plan.instances:
            return self._negative(name, wire.NOERROR)
        target_domain = self._domain(name)
        ttl, limit = self.config.ttl, self.config.answer_limit

        def render(order: tuple[Instance, ...]) -> Records:
            if limit:
                order = order[:limit]
            if qtype != SRV:
                # One record per address: instances may share one (named ports).
                ips = dict.fromkeys(str(i.ip) for i in order)
                return Records(answer=[self._address_rr(qname, ip) for ip in ips])
            records = Records()
            for rank, inst in enumerate(order, start=1):
                target = srv_target(inst, target_domain)
                srv = dnslib.SRV(min(rank, 65535), _srv_weight(inst), inst.port, target)
                records.answer.append(dnslib.RR(qname, SRV, ttl=ttl, rdata=srv))
                if inst.ip is not None:
                    records.additional.append(self._address_rr(target, str(inst.ip)))
            return records

        return Outcome(
            rcode=wire.NOERROR,
            authoritative=True,
            render=render,
            plan=plan,
            service=service,
            policy=policy,
        )


def srv_target(inst: Instance, domain: str) -> str:
    """The resolvable target of an instance: its own name under the domain, or
    its address when that is a host name."""
    if parse_ip(inst.address) is None:
        return _fqdn(inst.address)
    return f"{label_for(inst.id)}.{inst.name}.instance.{domain}"


def _srv_weight(inst: Instance) -> int:
    try:
        weight = int(float(inst.metadata.get("weight", "1")))
    except ValueError:
        weight = 1
    return max(1, min(weight, 65535))


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _last_label(key: bytes) -> str:
    """The last label of the question name in a cache key (a query after its ID)."""
    labels, _ = wire.read_name(b"\x00\x00" + key, 12)
    return labels[-1].decode("latin-1") if labels else ""


def _ns_addresses(config: DnsConfig) -> tuple[str, ...]:
    ips = []
    for host, _port in config.listen_udp:
        ip = parse_ip(host)
        if ip is None or ip.is_unspecified:
            continue
        if str(ip) not in ips:
            ips.append(str(ip))
    return tuple(ips) or ("127.0.0.1",)
