"""The etcd provider: instances are JSON values under a key prefix, kept in
step with one paged read and then a watch from that read's revision.

Layout (the seed's): ``<prefix><service>/<id>``, the prefix defaulting to
``/services/``, and the value the seed's ServiceInstance JSON::

    etcdctl put /services/user-service/user-service-1 \\
      '{"id": "user-service-1", "name": "user-service", "version": "1.2.0",
        "address": "10.0.1.10", "port": 8080, "tags": ["production"],
        "metadata": {"weight": "10"}, "health": "healthy",
        "lastHeartbeat": "2024-01-15T10:30:00.000Z"}'

``id`` defaults to the key's last segment and ``name`` to the one before it;
``lastHeartbeat`` (ISO date or epoch seconds/milliseconds) is optional; keys
this version does not know are ignored, as Go's encoding/json would. A value
that is not a valid instance is skipped with one ``etcd.invalid_instance``
line naming the key, and the key then holds no instance; the watch goes on.
Two keys claiming the same id: the smaller key is served, the other skipped.

Self-registration with a lease: a process puts its own key attached to a
lease and keeps the lease alive; if the process dies, the heartbeats stop,
the lease expires after its TTL and etcd deletes the key, which reaches
resolverd as an ordinary delete::

    LEASE=$(etcdctl lease grant 10 | awk '{print $2}')       # TTL 10 s
    etcdctl put --lease=$LEASE /services/user-service/user-service-1 '{...}'
    etcdctl lease keep-alive $LEASE                          # heartbeat, runs until killed

(in Python with aetcd: ``lease = await client.lease(10)``, ``await
client.put(key, value, lease=lease)``, then ``await lease.refresh()`` every
few seconds, well within the TTL).

Consistency: the read is paged, every page pinned to the first page's
revision R, and the watch starts at R + 1, so no change between the two is
lost or applied twice. All events of one watch response (one revision, or a
fragmented one reassembled) and any responses already queued behind it are
applied before one ``table.replace``. When the backend cannot be reached the
last snapshot stays served and the table marks it stale; each reconnection
(with backoff, rotating through the endpoints) reads everything again, so
the table converges to the backend's exact state, changes made during the
outage included. A watch whose start revision was compacted away reads
everything again.

aetcd is used for its generated etcd v3 API (``aetcd.rpc``) rather than its
``Client``: the client has no TLS, keeps one gRPC channel whose own reconnect
backoff grows to minutes, and hands out watch events one by one without the
response boundaries, revisions or compaction signal this provider needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NoReturn

import grpc
import structlog
from aetcd import rpc  # type: ignore[import-untyped]  # aetcd ships no type hints

from resolverd.config import ProviderConfig, parse_instance
from resolverd.model import Instance
from resolverd.providers.backoff import Backoff
from resolverd.table import ServiceTable

log = structlog.get_logger(__name__)

# Bound on each request to etcd (a page of the read, authentication, the
# watch's creation); the watch stream itself is open-ended, and a dead peer
# on it is found by gRPC keepalive pings.
RPC_TIMEOUT = 10.0
# Keys per page of the initial read: also how many values are parsed
# between two yields to the event loop (DNS keeps answering during a sync).
PAGE_SIZE = 1000
# Watch responses buffered between the stream reader and the applier.
QUEUE_SIZE = 1024

# A dead peer on an open stream (etcd frozen, a partition that drops
# packets) is found by HTTP/2 pings: one after this many seconds without
# traffic (etcd's default --grpc-keepalive-min-time is 5 s: never below that),
KEEPALIVE_INTERVAL = 10.0
# and the connection is given up when its ack is this late.
KEEPALIVE_TIMEOUT = 5.0


def channel_options() -> tuple[tuple[str, int], ...]:
    return (
        # Pages and watch responses are bounded by etcd, not by gRPC's 4 MB default.
        ("grpc.max_receive_message_length", -1),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_INTERVAL * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
        # Recent gRPC cores time a ping out after this (default 60 s), not
        # after keepalive_timeout_ms alone.
        ("grpc.http2.ping_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
        # Keep pinging an idle watch stream (the default stops after two).
        ("grpc.http2.max_pings_without_data", 0),
    )


_PUT = 0
_DELETE = 1
_INSTANCE_KEYS = frozenset(
    ("id", "name", "version", "address", "port", "tags", "metadata", "health")
)


# --------------------------------------------------------------------------- pure parts


def range_end(prefix: bytes) -> tuple[bytes, bytes]:
    """The etcd [key, range_end) covering every key that starts with prefix."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:  # "" or all 0xff: everything from the prefix on
        return (prefix or b"\x00"), b"\x00"
    return prefix, trimmed[:-1] + bytes([trimmed[-1] + 1])


def key_defaults(key: str, prefix: str) -> tuple[str | None, str | None]:
    """(name, id) implied by ``<prefix><name>/<id>``: the last two segments."""
    rest = key[len(prefix) :] if key.startswith(prefix) else key
    parts = [part for part in rest.split("/") if part]
    return (
        parts[-2] if len(parts) >= 2 else None,
        parts[-1] if parts else None,
    )


def parse_heartbeat(value: object) -> float | None:
    """The seed's lastHeartbeat (a JS Date as JSON, or epoch s / ms) as epoch
    seconds; None when absent or unreadable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
        if seconds > 1e11:  # milliseconds (Date.now()); 1e11 s is year 5138
            seconds /= 1000.0
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    return None


class SharedValues:
    """Canonical copies of what many instances repeat (service names,
    versions, tags, metadata), so 100,000 instances do not hold 100,000
    copies of ``{"region": "us-east-1"}``. Bounded: when it holds `limit`
    distinct tag lists and metadata mappings it starts over (sharing is an
    optimisation, never a meaning)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._values: dict[object, Any] = {}

    def tags(self, tags: tuple[str, ...]) -> tuple[str, ...]:
        shared: tuple[str, ...] = self._get(("t", tags), lambda: tuple(map(sys.intern, tags)))
        return shared

    def metadata(self, metadata: Mapping[str, str]) -> Mapping[str, str]:
        items = tuple(metadata.items())
        shared: Mapping[str, str] = self._get(
            ("m", items),
            lambda: MappingProxyType({sys.intern(k): sys.intern(v) for k, v in items}),
        )
        return shared

    def _get(self, key: object, make: Callable[[], object]) -> Any:
        value = self._values.get(key)
        if value is None:
            if len(self._values) >= self._limit:
                self._values.clear()
            value = self._values[key] = make()
        return value


def parse_value(
    key: str,
    value: bytes,
    *,
    prefix: str,
    provider: str,
    now: float,
    shared: SharedValues | None = None,
) -> Instance:
    """One etcd value as an Instance. Raises ValueError with the reason."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the key is not UTF-8") from None
    try:
        data = json.loads(value.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("the value is not UTF-8") from None
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise ValueError(f"expected a JSON object, got {kind}")
    fields = {k: v for k, v in data.items() if k in _INSTANCE_KEYS}
    name, ident = key_defaults(key, prefix)
    if ident is not None:
        fields.setdefault("id", ident)
    if name is not None:
        fields.setdefault("name", name)
    inst = parse_instance(fields, path="", provider=provider)
    try:  # lone surrogates (JSON "\ud800") would break DNS and gRPC encoding later
        "".join(
            (inst.id, inst.version, *inst.tags, *inst.metadata, *inst.metadata.values())
        ).encode()
    except UnicodeEncodeError:
        raise ValueError("contains text that is not valid Unicode") from None
    heartbeat = parse_heartbeat(data.get("lastHeartbeat"))
    if heartbeat is None:
        heartbeat = now
    if shared is None:
        return replace(inst, last_heartbeat=heartbeat)
    return replace(
        inst,
        name=sys.intern(inst.name),
        version=sys.intern(inst.version),
        tags=shared.tags(inst.tags),
        metadata=shared.metadata(inst.metadata),
        last_heartbeat=heartbeat,
    )


@dataclass(frozen=True, slots=True)
class Skipped:
    """A key whose value is not served, and why."""

    key: str
    revision: int
    reason: str
    duplicate: bool = False


class Snapshot:
    """The instances under the prefix, by etcd key, as of `revision`.

    Owned by one provider and changed in place; the table only ever gets
    fresh tuples from `instances()`. Ids are unique in what it hands out:
    when two keys hold the same id, the smaller key wins (deterministic, so
    a re-read and a stream of events converge to the same answer).

    `changed` turns True when what `instances()` returns changed in a way
    the table can see; a put that only renews ``lastHeartbeat`` (which the
    table's equality ignores) leaves it alone, so heartbeat writes do not
    cost a rebuild of the table's view."""

    def __init__(self, *, prefix: str, provider: str, revision: int = 0) -> None:
        self.prefix = prefix
        self.provider = provider
        self.revision = revision
        self._by_key: dict[str, Instance] = {}
        self._owner: dict[str, str] = {}  # id -> the key whose instance is served
        self._shadowed: dict[str, set[str]] = {}  # id -> other keys holding it
        self._shared = SharedValues()
        self.changed = False

    def __len__(self) -> int:
        return len(self._by_key)

    def put(self, key: str, value: bytes, *, revision: int, now: float) -> Skipped | None:
        """Apply a put; returns why the key is not served, if it is not."""
        try:
            inst = parse_value(
                key, value, prefix=self.prefix, provider=self.provider, now=now, shared=self._shared
            )
        except ValueError as exc:
            self.delete(key)
            return Skipped(key, revision, str(exc))
        old = self._by_key.get(key)
        if old is not None and old == inst:  # equal but for the heartbeat
            self._by_key[key] = inst
            return None
        self.delete(key)
        self.changed = True
        self._by_key[key] = inst
        owner = self._owner.get(inst.id)
        if owner is None:
            self._owner[inst.id] = key
            return None
        self._shadowed.setdefault(inst.id, set()).add(max(owner, key))
        self._owner[inst.id] = min(owner, key)
        return Skipped(
            max(owner, key),
            revision,
            f"id {inst.id!r} is also held by {min(owner, key)}, which is served",
            duplicate=True,
        )

    def delete(self, key: str) -> bool:
        """Apply a delete; True if the key held an instance."""
        inst = self._by_key.pop(key, None)
        if inst is None:
            return False
        self.changed = True
        others = self._shadowed.get(inst.id)
        if self._owner.get(inst.id) == key:
            if others:
                self._owner[inst.id] = min(others)
                others.discard(self._owner[inst.id])
            else:
                del self._owner[inst.id]
        elif others is not None:
            others.discard(key)
        if others is not None and not others:
            del self._shadowed[inst.id]
        return True

    def instances(self) -> tuple[Instance, ...]:
        if not self._shadowed:
            return tuple(self._by_key.values())
        owner = self._owner
        return tuple(inst for key, inst in self._by_key.items() if owner[inst.id] == key)


def apply_events(snapshot: Snapshot, events: Iterable[Any], *, now: float) -> list[Skipped]:
    """Apply etcd watch events (``mvccpb.Event``) in order; returns the skipped puts."""
    skipped: list[Skipped] = []
    for event in events:
        key = _decode_key(event.kv.key)
        if event.type == _DELETE:
            snapshot.delete(key)
        else:
            problem = snapshot.put(key, event.kv.value, revision=event.kv.mod_revision, now=now)
            if problem is not None:
                skipped.append(problem)
    return skipped


def _decode_key(key: bytes) -> str:
    # surrogateescape keeps distinct byte keys distinct; parse_value rejects them.
    return key.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- the provider


class WatchCompactedError(Exception):
    """The revision to read or watch from was compacted away: read again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted (etcd keeps history from {revision})")
        self.revision = revision


class WatchEndedError(Exception):
    """etcd ended the watch (stream closed or watch canceled)."""


@dataclass(slots=True)
class Session:
    """One gRPC channel to one endpoint, authenticated if configured."""

    endpoint: str
    channel: grpc.aio.Channel
    metadata: tuple[tuple[str, str], ...]
    kv: Any
    watch: Any


class EtcdProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        options = config.options
        endpoints = options["endpoints"]
        assert isinstance(endpoints, tuple) and endpoints
        self._endpoints: tuple[tuple[str, int], ...] = endpoints
        prefix = options["prefix"]
        assert isinstance(prefix, str)
        self.prefix = prefix
        self._range = range_end(prefix.encode())
        reconnect_max = options["reconnect_max"]
        assert isinstance(reconnect_max, float | int)
        self._reconnect_max = float(reconnect_max)
        self._username = _opt(options, "username")
        self._password = _opt(options, "password")
        self._ca_file = _opt(options, "ca_file")
        self._cert_file = _opt(options, "cert_file")
        self._key_file = _opt(options, "key_file")
        # key -> mod revision of the invalid value already reported, so a
        # re-read after a reconnect does not repeat the same warning.
        self._reported: dict[str, int] = {}

    # -- the loop -----------------------------------------------------------------

    async def run(self, table: ServiceTable) -> None:
        backoff = Backoff(maximum=self._reconnect_max)
        attempt = 0
        while True:
            host, port = self._endpoints[attempt % len(self._endpoints)]
            attempt += 1
            endpoint = _target(host, port)
            try:
                async with self.session(endpoint) as session:
                    await self._serve(session, table, backoff)
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, WatchEndedError, TimeoutError, OSError) as exc:
                table.mark_stale(self.name, f"etcd {endpoint}: {describe_error(exc)}")
            except Exception as exc:  # a bug here must not end discovery
                log.exception("etcd.failed", provider=self.name, endpoint=endpoint)
                table.mark_stale(self.name, f"etcd {endpoint}: {describe_error(exc)}")
            delay = backoff.delay()
            log.debug("etcd.retry", provider=self.name, delay=round(delay, 3))
            await asyncio.sleep(delay)

    async def _serve(self, session: Session, table: ServiceTable, backoff: Backoff) -> NoReturn:
        while True:
            started = time.monotonic()
            try:
                snapshot = await self.read(session)
            except WatchCompactedError:
                continue  # a page's pinned revision went away mid-read: read again
            table.replace(self.name, snapshot.instances())
            log.info(
                "etcd.synced",
                provider=self.name,
                endpoint=session.endpoint,
                revision=snapshot.revision,
                keys=len(snapshot),
                instances=len(table.snapshots().get(self.name, ())),
                seconds=round(time.monotonic() - started, 3),
            )
            try:
                # The backoff starts over only once the watch is up: an etcd
                # that serves the read but fails every watch is not hammered.
                await self.watch(session, snapshot, table, on_watching=backoff.reset)
            except WatchCompactedError as exc:
                log.warning(
                    "etcd.compacted",
                    provider=self.name,
                    revision=snapshot.revision,
                    compact_revision=exc.revision,
                )

    # -- connecting ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session(self, endpoint: str) -> AsyncIterator[Session]:
        channel = self._channel(endpoint)
        try:
            metadata: tuple[tuple[str, str], ...] = ()
            if self._username is not None and self._password is not None:
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                reply = await rpc.AuthStub(channel).Authenticate(request, timeout=RPC_TIMEOUT)
                metadata = (("token", reply.token),)
            yield Session(
                endpoint=endpoint,
                channel=channel,
                metadata=metadata,
                kv=rpc.KVStub(channel),
                watch=rpc.WatchStub(channel),
            )
        finally:
            await channel.close()

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        # A fresh channel per attempt: a reused one would wait out gRPC's own
        # reconnect backoff (up to 2 min) after etcd comes back.
        if self._ca_file is None and self._cert_file is None:
            return grpc.aio.insecure_channel(endpoint, options=channel_options())
        # Read at each connection, so renewed certificates are picked up.
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self._ca_file),
            private_key=_read(self._key_file),
            certificate_chain=_read(self._cert_file),
        )
        return grpc.aio.secure_channel(endpoint, credentials, options=channel_options())

    # -- reading --------------------------------------------------------------------

    async def read(self, session: Session) -> Snapshot:
        """Everything under the prefix at one revision, page by page."""
        snapshot = Snapshot(prefix=self.prefix, provider=self.name)
        start, end = self._range
        revision = 0
        skipped: list[Skipped] = []
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=PAGE_SIZE, revision=revision)
            try:
                reply = await session.kv.Range(
                    request, timeout=RPC_TIMEOUT, metadata=session.metadata
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in str(exc.details()):
                    raise WatchCompactedError(revision) from None
                raise
            if revision == 0:
                revision = int(reply.header.revision)
            now = time.time()
            for kv in reply.kvs:
                key = _decode_key(kv.key)
                problem = snapshot.put(key, kv.value, revision=kv.mod_revision, now=now)
                if problem is not None:
                    skipped.append(problem)
            if not reply.more or not reply.kvs:
                break
            start = reply.kvs[-1].key + b"\x00"
            await asyncio.sleep(0)  # let DNS queries in between pages
        snapshot.revision = revision
        # Forget reports for keys that are now valid or gone.
        reported = {s.key for s in skipped}
        self._reported = {k: r for k, r in self._reported.items() if k in reported}
        self._report(skipped)
        return snapshot

    def _report(self, skipped: Iterable[Skipped]) -> None:
        for problem in skipped:
            if self._reported.get(problem.key) == problem.revision:
                continue
            self._reported[problem.key] = problem.revision
            log.warning(
                "etcd.duplicate_id" if problem.duplicate else "etcd.invalid_instance",
                provider=self.name,
                key=problem.key.encode("utf-8", "backslashreplace").decode(),
                revision=problem.revision,
                reason=problem.reason,
            )

    # -- watching -------------------------------------------------------------------

    async def watch(
        self,
        session: Session,
        snapshot: Snapshot,
        table: ServiceTable,
        *,
        on_watching: Callable[[], None] = lambda: None,
    ) -> NoReturn:
        """Follow changes after `snapshot.revision` into `snapshot` and the table.

        Raises WatchCompactedError when that revision is gone (read again),
        and WatchEndedError, gRPC errors or TimeoutError when the stream is lost."""
        start, end = self._range
        # hasleader: an etcd member cut off from its cluster ends the watch
        # instead of leaving it silent (clientv3's WithRequireLeader).
        call = session.watch.Watch(metadata=(*session.metadata, ("hasleader", "true")))
        reader: asyncio.Task[None] | None = None
        try:
            create = rpc.WatchCreateRequest(
                key=start,
                range_end=end,
                start_revision=snapshot.revision + 1,
                fragment=True,
            )
            await call.write(rpc.WatchRequest(create_request=create))
            async with asyncio.timeout(RPC_TIMEOUT):
                created = await call.read()
            if created is grpc.aio.EOF:
                raise WatchEndedError("watch stream closed by etcd")
            _check(created)
            on_watching()
            queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=QUEUE_SIZE)
            reader = asyncio.create_task(_pump(call, queue), name=f"etcd-watch:{self.name}")
            batch: list[Any] = [created]
            fragment = False  # mid-way through a revision split over responses
            snapshot.changed = False
            while True:
                try:
                    for item in batch:
                        if isinstance(item, BaseException):
                            raise item
                        self._apply(snapshot, item)
                        fragment = bool(item.fragment)
                finally:
                    # What arrived before an error is published too.
                    if snapshot.changed and not fragment:
                        table.replace(self.name, snapshot.instances())
                        snapshot.changed = False
                # Everything already queued is applied before the next replace,
                # so a burst costs one table rebuild, not one per revision.
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
        finally:
            if reader is not None:
                reader.cancel()
                # wait() does not raise the reader's CancelledError, so a
                # cancellation of this task is never swallowed here.
                await asyncio.wait({reader})
            call.cancel()

    def _apply(self, snapshot: Snapshot, response: Any) -> None:
        """Apply one watch response to the snapshot."""
        _check(response)
        if response.events:
            self._report(apply_events(snapshot, response.events, now=time.time()))
            revision = int(response.events[-1].kv.mod_revision)
        elif response.created or response.fragment:
            # The creation's header is etcd's revision, not the watch's progress.
            return
        else:  # a progress notification: nothing changed up to its revision
            revision = int(response.header.revision)
        snapshot.revision = max(snapshot.revision, revision)


def _check(response: Any) -> None:
    if response.compact_revision:
        raise WatchCompactedError(int(response.compact_revision))
    if response.canceled:
        reason = response.cancel_reason or "no reason given"
        raise WatchEndedError(f"watch canceled by etcd: {reason}")


async def _pump(call: Any, queue: asyncio.Queue[Any]) -> None:
    """Move watch responses from the stream to the queue; an error or the
    stream's end goes in as an exception, and ends the pump."""
    try:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                await queue.put(WatchEndedError("watch stream closed by etcd"))
                return
            await queue.put(response)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await queue.put(exc)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {RPC_TIMEOUT:g}s"
    return str(exc) or type(exc).__name__


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _opt(options: Any, key: str) -> str | None:
    value = options.get(key)
    return value if isinstance(value, str) else None


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as fh:
        return fh.read()
