"""Byte-level reading of DNS queries, without dnslib.

Only what the server needs to decide how to answer a query: the header, the
one question (labels and where it ends), and the OPT record with its options.
Anything malformed raises `Malformed`, which the caller turns into FORMERR.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
_RR_FIXED = struct.Struct("!HHIH")

QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
CD = 0x0010

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16

OPT_TYPE = 41
ECS_OPTION = 8
DO_BIT = 0x8000


class Malformed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ClientSubnet:
    family: int
    source_prefix: int
    address: bytes  # as sent, ceil(source_prefix/8) bytes

    @property
    def network(self) -> str:
        size = 4 if self.family == 1 else 16
        raw = self.address + bytes(size - len(self.address))
        ip = ipaddress.ip_address(raw)
        return f"{ip}/{self.source_prefix}"

    def option(self, scope: int) -> bytes:
        data = _U16.pack(self.family) + bytes((self.source_prefix, scope)) + self.address
        return _U16.pack(ECS_OPTION) + _U16.pack(len(data)) + data


@dataclass(frozen=True, slots=True)
class Opt:
    udp_size: int
    version: int
    do: bool
    subnet: ClientSubnet | None


@dataclass(frozen=True, slots=True)
class Query:
    id: int
    flags: int
    labels: tuple[bytes, ...]  # as sent (letter case preserved)
    name_end: int  # offset just past the question name
    qtype: int
    qclass: int
    opt: Opt | None


def read_name(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """Read an uncompressed question name; returns (labels, offset past it)."""
    labels: list[bytes] = []
    total = 1
    end = len(data)
    while True:
        if offset >= end:
            raise Malformed("name runs past the end")
        n = data[offset]
        if n == 0:
            return tuple(labels), offset + 1
        if n & 0xC0:
            raise Malformed("compression or extended label in the question")
        total += n + 1
        if total > 255:
            raise Malformed("name longer than 255 octets")
        labels.append(data[offset + 1 : offset + 1 + n])
        offset += n + 1


def skip_name(data: bytes, offset: int) -> int:
    """Skip a possibly compressed name in a resource record."""
    end = len(data)
    while True:
        if offset >= end:
            raise Malformed("name runs past the end")
        n = data[offset]
        if n == 0:
            return offset + 1
        if n & 0xC0 == 0xC0:
            if offset + 2 > end:
                raise Malformed("truncated pointer")
            return offset + 2
        if n & 0xC0:
            raise Malformed("unknown label type")
        offset += n + 1


def parse_query(data: bytes) -> Query:
    """Parse a query whose header was already checked to have QDCOUNT == 1."""
    qid, flags, _qd, an, ns, ar = HEADER.unpack_from(data)
    labels, offset = read_name(data, 12)
    name_end = offset
    if offset + 4 > len(data):
        raise Malformed("question truncated")
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    offset += 4
    opt: Opt | None = None
    for index in range(an + ns + ar):
        start = offset
        offset = skip_name(data, offset)
        if offset + 10 > len(data):
            raise Malformed("record truncated")
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, offset)
        offset += 10
        if offset + rdlen > len(data):
            raise Malformed("rdata truncated")
        if rtype == OPT_TYPE:
            if index < an + ns or opt is not None or data[start] != 0:
                raise Malformed("misplaced, repeated or non-root OPT")
            opt = _parse_opt(data[offset : offset + rdlen], rclass, ttl)
        offset += rdlen
    if offset != len(data):
        raise Malformed("trailing bytes")
    return Query(qid, flags, labels, name_end, qtype, qclass, opt)


def _parse_opt(rdata: bytes, udp_size: int, ttl: int) -> Opt:
    version = (ttl >> 16) & 0xFF
    subnet: ClientSubnet | None = None
    pos = 0
    while pos < len(rdata):
        if pos + 4 > len(rdata):
            raise Malformed("EDNS option truncated")
        code, length = struct.unpack_from("!HH", rdata, pos)
        pos += 4
        if pos + length > len(rdata):
            raise Malformed("EDNS option truncated")
        if code == ECS_OPTION:
            subnet = _parse_ecs(rdata[pos : pos + length])
        pos += length
    return Opt(udp_size=udp_size, version=version, do=bool(ttl & DO_BIT), subnet=subnet)


def _parse_ecs(data: bytes) -> ClientSubnet:
    # RFC 7871 section 6: anything inconsistent is FORMERR.
    if len(data) < 4:
        raise Malformed("ECS option too short")
    family, source, scope = _U16.unpack_from(data)[0], data[2], data[3]
    address = data[4:]
    limit = {1: 32, 2: 128}.get(family)
    if limit is None or source > limit or scope != 0:
        raise Malformed("bad ECS family, prefix or scope")
    if len(address) != (source + 7) // 8:
        raise Malformed("ECS address length does not match its prefix")
    if source % 8 and address and address[-1] & (0xFF >> (source % 8)):
        raise Malformed("ECS address has bits set beyond its prefix")
    return ClientSubnet(family, source, address)


def header_only(data: bytes, rcode: int, *, echo_question: bool = False) -> bytes:
    """A reply carrying only a header (and optionally the question) for errors
    detected before the query is understood: FORMERR, NOTIMP, SERVFAIL."""
    qid, flags = struct.unpack_from("!HH", data)
    reply_flags = QR | (flags & 0x7800) | (flags & (RD | CD)) | (rcode & 0xF)
    if echo_question:
        _, end = read_name(data, 12)
        return HEADER.pack(qid, reply_flags, 1, 0, 0, 0) + data[12 : end + 4]
    return HEADER.pack(qid, reply_flags, 0, 0, 0, 0)
