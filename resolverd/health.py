"""Active health checks: the seed's performHealthChecks, done right.

Every instance whose provider and service have ``health_check.enabled`` is
probed on its own schedule: an HTTP GET of ``http://{address}:{port}{path}``
(IPv6 in brackets; host names are resolved off the loop) or a TCP
connect, every ``interval`` (varied by ``jitter``), the first probe at a random
point of the first interval so 10,000 instances do not start together. Probes
run concurrently under one cap (``service_discovery.health_check.concurrency``)
with ``timeout`` each. The seed's mapping: 2xx is healthy, any other status
(3xx too: redirects are not followed) unhealthy, no answer (refused, reset,
timed out) critical. A state flips only after ``healthy_threshold``
consecutive successes or ``unhealthy_threshold`` consecutive failures; until
then the provider is trusted. Results are an overlay on the table
(`ServiceTable.set_checked_health`): the view's health is the worse of the
provider's (Consul checks, Kubernetes readiness) and the probe's, so an
instance is served only when both say up. Changes are batched into one table
change per loop turn, which updates DNS answers and gRPC Watch at once; in a
burst, table changes are spaced so they take at most a fifth of the loop. Each
state change is logged once.

Checks are off by default, everywhere. They probe from this node, so enabling
them for a provider whose instances this node cannot or should not reach
(remote Consul nodes, pod IPs of another cluster, the seed's 10.0.1.x static
example) is the operator's choice, made per providers entry or per service.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote

import structlog

from resolverd.config import CheckType, Config, HealthCheckConfig
from resolverd.model import Health, Instance
from resolverd.table import Change, ServiceTable, View

log = structlog.get_logger(__name__)

Key = tuple[str, str]  # (provider, instance id): the table's overlay key
USER_AGENT = "resolverd-health-check"
# Table changes are batched: at most one per COMMIT_INTERVAL, and never more
# than MAX_COMMIT_SHARE of the loop's time (a change rebuilds the whole view:
# ~20 ms at 10,000 instances), so a burst of failures cannot starve DNS.
COMMIT_INTERVAL = 0.05
MAX_COMMIT_SHARE = 0.2
# Probes due within this much of now start together: the loop's timers have
# 1 ms resolution, and 10,000 instances are due every millisecond or so.
SCHEDULE_SLACK = 0.005

_FAILING = (Health.UNHEALTHY, Health.CRITICAL)


# --------------------------------------------------------------------------- pure evaluation


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What one probe said, in the seed's states, and why (for the log)."""

    health: Health
    reason: str


@dataclass(frozen=True, slots=True)
class CheckState:
    """An instance's checked health and its run of agreeing results.

    ``health`` is None until a threshold is first reached: the provider is trusted.
    """

    health: Health | None = None
    successes: int = 0  # consecutive, capped at the healthy threshold
    failures: int = 0  # consecutive, capped at the unhealthy threshold


def classify_status(status: int) -> Health:
    """The seed's `response.ok`: 2xx healthy, anything else unhealthy."""
    return Health.HEALTHY if 200 <= status < 300 else Health.UNHEALTHY


def evaluate(
    state: CheckState, result: ProbeResult, *, healthy_threshold: int, unhealthy_threshold: int
) -> CheckState:
    """The state after one more probe result.

    Healthy after `healthy_threshold` successes in a row; after
    `unhealthy_threshold` failures in a row, the latest failure's state
    (unhealthy or critical). Anything shorter keeps the previous state.
    """
    if result.health is Health.HEALTHY:
        successes = min(state.successes + 1, healthy_threshold)
        health = Health.HEALTHY if successes >= healthy_threshold else state.health
        return CheckState(health, successes, 0)
    failures = min(state.failures + 1, unhealthy_threshold)
    health = result.health if failures >= unhealthy_threshold else state.health
    return CheckState(health, 0, failures)


def overlay(health: Health | None) -> Health | None:
    """What the table needs to know: only a failing state changes the view
    (the view's health is the worse of provider and probe)."""
    return health if health in _FAILING else None


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# --------------------------------------------------------------------------- probes

Probe = Callable[[Instance, HealthCheckConfig], Awaitable[ProbeResult]]

MAX_STATUS_BYTES = 4096  # a status line (and any 1xx header block) longer than this is not HTTP
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")
_PATH_SAFE = "/%?#[]@!$&'()*+,;=:~-._"


def final_status(buffer: bytes) -> int | None:
    """The status code of the final response that `buffer` starts with, or None
    while more bytes are needed. Interim 1xx responses are skipped. Raises
    ValueError when the bytes are not an HTTP/1.x response."""
    start = 0
    while True:
        end = buffer.find(b"\r\n", start)
        if end < 0:
            if len(buffer) - start > MAX_STATUS_BYTES:
                raise ValueError("no HTTP status line")
            return None
        match = _STATUS_LINE.fullmatch(buffer, start, end)
        if match is None:
            raise ValueError("not an HTTP/1.x response")
        status = int(match[1])
        if not 100 <= status < 200:
            return status
        blank = buffer.find(b"\r\n\r\n", start)
        if blank < 0:
            if len(buffer) - start > MAX_STATUS_BYTES:
                raise ValueError("1xx response without an end")
            return None
        start = blank + 4


def http_request(address: str, port: int, path: str) -> bytes:
    return (
        f"GET {quote(path, safe=_PATH_SAFE)} HTTP/1.1\r\n"
        f"Host: {hostport(address, port)}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


class _StatusProtocol(asyncio.Protocol):
    """Sends one request; `done` gets the final response's status code."""

    def __init__(self, request: bytes, done: asyncio.Future[int]) -> None:
        self._request = request
        self._done = done
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self._request)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return
        self._buffer += data
        try:
            status = final_status(self._buffer)
        except ValueError as exc:
            self._done.set_exception(exc)
            return
        if status is not None:
            self._done.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(exc or ConnectionResetError("closed before a response"))


def _error_reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


async def probe_instance(inst: Instance, config: HealthCheckConfig) -> ProbeResult:
    """One probe of `inst`, never raising: the seed's states with a reason.

    HTTP reads only the status line (of a GET with ``Connection: close``) and
    closes: a fresh connection per probe, nothing kept per instance, no
    redirects followed. That is all a check needs, and it costs about a third
    of the CPU (and half the garbage collections) of an aiohttp request: at
    10,000 instances every 10 s that is ~10% of a core instead of ~30%, on
    the loop that answers DNS.
    """
    try:
        async with asyncio.timeout(config.timeout):
            if config.type is CheckType.TCP:
                _, writer = await asyncio.open_connection(inst.address, inst.port)
                writer.close()
                with contextlib.suppress(OSError):  # connected is all a TCP check asks
                    await writer.wait_closed()
                return ProbeResult(Health.HEALTHY, "connected")
            loop = asyncio.get_running_loop()
            done: asyncio.Future[int] = loop.create_future()
            request = http_request(inst.address, inst.port, config.path)
            transport, _ = await loop.create_connection(
                lambda: _StatusProtocol(request, done), inst.address, inst.port
            )
            try:
                status = await done
            finally:
                transport.close()
        return ProbeResult(classify_status(status), f"HTTP {status}")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # any failure to get an answer is the seed's critical
        return ProbeResult(Health.CRITICAL, _error_reason(exc, config.timeout))


# --------------------------------------------------------------------------- the checker


@dataclass(slots=True)
class _Tracked:
    inst: Instance
    config: HealthCheckConfig
    state: CheckState
    due: float
    seq: int  # the heap entry that is current; older entries are skipped


class HealthChecker:
    """Probes the table's instances and feeds results back as its health overlay.

    `run` is the daemon's task. `tick` is one scheduler turn, public so tests can
    drive the schedule with a fake `clock` (and a fake `probe`) instead of sleeping.
    """

    def __init__(
        self,
        table: ServiceTable,
        config: Config,
        *,
        clock: Callable[[], float] | None = None,
        probe: Probe | None = None,
        rng: random.Random | None = None,
        commit_interval: float = COMMIT_INTERVAL,
    ) -> None:
        self._table = table
        self._config = config
        self._clock = clock
        self._probe: Probe = probe or probe_instance
        self._rng = rng or random.Random()
        self._commit_interval = commit_interval
        self._slots = asyncio.Semaphore(config.health_check.concurrency)
        self._tracked: dict[Key, _Tracked] = {}
        self._heap: list[tuple[float, int, Key]] = []
        self._seq = itertools.count()
        self._seen: dict[str, tuple[Instance, ...]] = {}
        self._dirty = True
        self._pending: dict[Key, Health | None] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._last_flush = -math.inf
        self._commit_gap = commit_interval
        self._inflight: set[asyncio.Task[None]] = set()
        self._waiter: asyncio.Future[None] | None = None
        self._wait_until = math.inf
        self.results: Counter[Health] = Counter()  # probe results by state, since start
        self._unsubscribe = table.subscribe(self._on_table_change)

    # -- public -------------------------------------------------------------------

    @property
    def instances(self) -> int:
        """How many instances are being checked."""
        return len(self._tracked)

    def state(self, provider: str, instance_id: str) -> CheckState | None:
        tracked = self._tracked.get((provider, instance_id))
        return None if tracked is None else tracked.state

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        log.info(
            "health.started",
            concurrency=self._config.health_check.concurrency,
            default_enabled=self._config.health_check.enabled,
        )
        try:
            while True:
                next_due = await self.tick()
                if self._dirty:
                    continue
                self._waiter = loop.create_future()
                self._wait_until = math.inf if next_due is None else next_due
                handle = None
                if next_due is not None:
                    handle = loop.call_at(loop.time() + next_due - self._now(), self._wake)
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                    if handle is not None:
                        handle.cancel()
        finally:
            await self.close()

    async def tick(self) -> float | None:
        """Re-read the table if it changed, start every probe that is due (waiting
        for a slot under the cap) and return when the next one is due."""
        if self._dirty:
            self._reconcile()
        now = self._now() + SCHEDULE_SLACK
        while self._heap and self._heap[0][0] <= now:
            _, seq, key = heapq.heappop(self._heap)
            tracked = self._tracked.get(key)
            if tracked is None or tracked.seq != seq:
                continue
            await self._slots.acquire()
            if self._tracked.get(key) is not tracked:  # forgotten while waiting
                self._slots.release()
                continue
            task = asyncio.create_task(
                self._run_probe(key, tracked), name=f"health-probe:{key[0]}/{key[1]}"
            )
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        while self._heap and self._stale(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    async def drain(self) -> None:
        """Wait for the probes in flight and apply their results (tests)."""
        while self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self.flush()

    def flush(self) -> None:
        """Apply the batched results to the table now: one table change."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, {}
        if pending:
            started = time.perf_counter()
            self._table.set_checked_health(pending)
            cost = time.perf_counter() - started
            self._commit_gap = max(self._commit_interval, cost / MAX_COMMIT_SHARE)
            self._last_flush = asyncio.get_running_loop().time()

    async def close(self) -> None:
        """Stop the probes in flight and stop following the table."""
        self._unsubscribe()
        for task in list(self._inflight):
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        log.info("health.stopped", instances=len(self._tracked))

    # -- schedule -----------------------------------------------------------------

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _stale(self, entry: tuple[float, int, Key]) -> bool:
        tracked = self._tracked.get(entry[2])
        return tracked is None or tracked.seq != entry[1]

    def _push(self, key: Key, tracked: _Tracked) -> None:
        tracked.seq = next(self._seq)
        heapq.heappush(self._heap, (tracked.due, tracked.seq, key))

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_table_change(self, view: View, change: Change) -> None:
        self._dirty = True
        self._wake()

    def _reconcile(self) -> None:
        """Track the instances the providers now report: schedule new ones,
        restart changed ones, forget removed ones. Snapshots are swapped whole,
        so "nothing changed" (our own overlay commits, most ticks) costs one
        identity check per provider."""
        self._dirty = False
        snapshots = self._table.snapshots()
        if snapshots.keys() == self._seen.keys() and all(
            snapshots[p] is self._seen[p] for p in snapshots
        ):
            return
        self._seen = snapshots
        now = self._now()
        configs: dict[tuple[str, str], HealthCheckConfig] = {}
        present: set[Key] = set()
        for inst in self._table.provider_instances():
            key = (inst.provider, inst.id)
            if key in present:
                continue  # the same id twice: the first one is checked
            config = configs.get((inst.provider, inst.name))
            if config is None:
                config = self._config.health_check_for(inst.provider, inst.name)
                configs[inst.provider, inst.name] = config
            if not config.enabled:
                continue
            present.add(key)
            tracked = self._tracked.get(key)
            if tracked is not None and (
                tracked.config == config
                and tracked.inst.address == inst.address
                and tracked.inst.port == inst.port
            ):
                tracked.inst = inst
                continue
            if tracked is not None:
                self._forget(key)
            # The first probe lands anywhere in the first interval: instances
            # that appear together are spread over it.
            tracked = _Tracked(
                inst, config, CheckState(), now + self._rng.uniform(0, config.interval), 0
            )
            self._tracked[key] = tracked
            self._push(key, tracked)
        for key in [k for k in self._tracked if k not in present]:
            self._forget(key)

    def _forget(self, key: Key) -> None:
        tracked = self._tracked.pop(key)
        if overlay(tracked.state.health) is not None or key in self._pending:
            self._set_overlay(key, None)

    # -- results ------------------------------------------------------------------

    async def _run_probe(self, key: Key, tracked: _Tracked) -> None:
        started = self._now()
        try:
            try:
                result = await self._probe(tracked.inst, tracked.config)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken probe must not stop the checks
                log.exception("health.probe_failed", instance=tracked.inst.id)
                result = ProbeResult(Health.CRITICAL, _error_reason(exc, tracked.config.timeout))
        finally:
            self._slots.release()
        self._record(key, tracked, result, started)

    def _record(self, key: Key, tracked: _Tracked, result: ProbeResult, started: float) -> None:
        if self._tracked.get(key) is not tracked:
            return  # forgotten or re-targeted while the probe ran
        self.results[result.health] += 1
        config = tracked.config
        old = tracked.state.health
        tracked.state = evaluate(
            tracked.state,
            result,
            healthy_threshold=config.healthy_threshold,
            unhealthy_threshold=config.unhealthy_threshold,
        )
        new = tracked.state.health
        if new is not old:
            inst = tracked.inst
            # unknown -> healthy changes nothing served: not worth 10k log lines.
            emit = log.debug if old is None and new is Health.HEALTHY else log.info
            emit(
                "health.changed",
                instance=inst.id,
                service=inst.name,
                provider=inst.provider,
                address=hostport(inst.address, inst.port),
                old=old.value if old is not None else "unknown",
                new=new.value if new is not None else "unknown",
                reason=result.reason,
            )
            if overlay(new) != overlay(old):
                self._set_overlay(key, overlay(new))
        period = config.interval * (1 + config.jitter * self._rng.uniform(-1, 1))
        tracked.due = max(started + period, self._now())
        self._push(key, tracked)
        if tracked.due < self._wait_until:
            self._wake()

    def _set_overlay(self, key: Key, health: Health | None) -> None:
        self._pending[key] = health
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            delay = self._last_flush + self._commit_gap - loop.time()
            # The first change after a quiet spell goes out on the next loop turn;
            # a burst (a host's instances failing together) is coalesced.
            self._flush_handle = (
                loop.call_later(delay, self.flush) if delay > 0 else loop.call_soon(self.flush)
            )
