"""Builds the components from a config, wires the one-way data flow
(providers -> table -> balancing -> answers -> servers), runs them and shuts
them down in order."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
import structlog

from resolverd import snapshot
from resolverd.balancing import Balancer, ConnectionTracker, OutcomeStats
from resolverd.config import Config, ConfigError, default_state_file, load_config
from resolverd.dns.answers import Answerer
from resolverd.dns.forward import Forwarder, default_allow, resolv_conf_upstreams
from resolverd.dns.server import DnsServer
from resolverd.health import HealthChecker
from resolverd.metrics import MetricsServer
from resolverd.providers import Provider, create_provider
from resolverd.providers.registrations import RegistrationsProvider
from resolverd.rpc.server import RpcServer
from resolverd.rpc.servicer import ResolverServicer, WatchHub
from resolverd.snapshot import SnapshotWriter
from resolverd.systemd import Notifier
from resolverd.table import Change, ServiceTable, View

log = structlog.get_logger(__name__)

STALE_POLL_INTERVAL = 0.5
STALE_REPORT_INTERVAL = 60.0
STATUS_INTERVAL = 10.0
RELOAD_SYNC_TIMEOUT = 5.0


class Daemon:
    def __init__(
        self, config: Config, *, extra_rpc_handlers: Sequence[grpc.GenericRpcHandler] = ()
    ) -> None:
        self.config = config
        self.table = ServiceTable(
            order=[p.name for p in config.providers] + [RegistrationsProvider.NAME]
        )
        self.tracker = ConnectionTracker()
        self.balancer = Balancer(tracker=self.tracker)
        self.forwarder = _forwarder(config)
        self.answerer = Answerer(
            config=config.dns,
            balancer=self.balancer,
            policy_for=config.policy_for,
            view=self.table.view,
            forwarder=self.forwarder,
        )
        self.dns = DnsServer(self.answerer)
        self.outcomes = OutcomeStats()
        # Created (and the state file read) before anything binds, so an
        # unavailable provider or a bad state file fails start-up cleanly.
        self.registrations = RegistrationsProvider(
            config.registrations.state_file or default_state_file()
        )
        self.registrations.load()
        self.providers: list[Provider] = [create_provider(p) for p in config.providers]
        self.providers.append(self.registrations)
        self.hub = WatchHub()
        # Providers whose snapshots the on-disk copy keeps (static and runtime
        # registrations have their own sources).
        self._persisted = [p.name for p in config.providers if p.type != "static"]
        self.snapshots: SnapshotWriter | None = None
        if config.snapshot.file is not None:
            self.snapshots = SnapshotWriter(
                self.table, config.snapshot.file, providers=self._persisted
            )
        self.rpc = RpcServer(
            servicer=ResolverServicer(
                config=config,
                table=self.table,
                balancer=self.balancer,
                outcomes=self.outcomes,
                registrations=self.registrations,
                hub=self.hub,
            ),
            api=config.api,
            extra_handlers=extra_rpc_handlers,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._provider_tasks: dict[str, asyncio.Task[None]] = {}
        self._clock_task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        # -- active health checks (resolverd/health.py): only built when some
        # provider or service enables them; off by default.
        self.health: HealthChecker | None = None
        if config.health_checks_enabled:
            self.health = HealthChecker(self.table, config)
        # -- end health checks
        self.metrics = MetricsServer(
            config=config,
            table=self.table,
            answerer=self.answerer,
            forwarder=self.forwarder,
            tracker=self.tracker,
            health=self.health,
            grpc=self.rpc.metrics,
        )

    def _on_change(self, view: View, change: Change) -> None:
        self.balancer.retain(view.by_id.keys())
        self.outcomes.retain(view.by_id.keys())
        self.answerer.set_view(view)
        log.info(
            "table.changed",
            revision=change.revision,
            registered=len(change.registered),
            deregistered=len(change.deregistered),
            updated=len(change.updated),
            services=len(view.services),
        )

    async def start(self) -> None:
        self._unsubscribe.append(self.table.subscribe(self._on_change))
        self._unsubscribe.append(self.table.subscribe(self.hub.on_change))
        if self.snapshots is not None and self.config.snapshot.file is not None:
            snapshot.restore(
                self.table,
                self.config.snapshot.file,
                providers=self._persisted,
                max_age=self.config.snapshot.max_age,
            )
            self._unsubscribe.append(self.table.subscribe(self.snapshots.on_change))
            self._spawn(self.snapshots.run(), "snapshot-writer")
        self._unsubscribe.append(self.tracker.subscribe(self.answerer.connections_changed))
        for provider in self.providers:
            self._start_provider(provider)
        if self.forwarder.enabled:
            self._clock_task = self._spawn(self.forwarder.run_clock(), "forward-clock")
        # -- health checks: stopped with the other tasks in stop() (cancelled; its
        # run() closes its probes and HTTP session on the way out).
        if self.health is not None:
            self._health_task = self._spawn(self.health.run(), "health-checker")
        # -- end health checks
        await asyncio.sleep(0)  # let providers publish their first snapshot
        try:
            await self.dns.start(udp=self.config.dns.listen_udp, tcp=self.config.dns.listen_tcp)
            await self.rpc.start()
            await self.metrics.start()
        except BaseException:
            await self.stop()
            raise
        self._spawn(self._ready(), "ready")
        # The start-up heap (config, table, modules) lives as long as the daemon:
        # keep it out of the collector's generations, so full collections stay
        # short while probes and queries churn young objects.
        gc.freeze()
        log.info("daemon.started", providers=[p.name for p in self.providers])

    async def _ready(self) -> None:
        """gRPC health turns SERVING once every provider has synced (or was
        restored from the on-disk copy); then watch for staleness."""
        while not self.table.ready:
            await asyncio.sleep(0.05)
        await self.rpc.set_serving()
        log.info("daemon.ready", revision=self.table.view.revision)
        fresh: bool | None = None
        last_report = 0.0
        loop = asyncio.get_running_loop()
        while True:
            states = self.table.states().values()
            stale = [s for s in states if s.stale]
            if (not stale) != fresh:
                fresh = not stale
                await self.rpc.set_providers_fresh(fresh)
            if stale and loop.time() - last_report >= STALE_REPORT_INTERVAL:
                last_report = loop.time()
                now = time.time()
                for state in stale:
                    log.warning(
                        "provider.serving_stale",
                        provider=state.name,
                        age_seconds=round(state.age(now) or 0.0, 1),
                        instances=state.instances,
                        error=state.error,
                    )
            await asyncio.sleep(STALE_POLL_INTERVAL)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_provider(self, provider: Provider) -> None:
        self._provider_tasks[provider.name] = self._spawn(
            self._provider_task(provider), f"provider:{provider.name}"
        )

    async def _cancel(self, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _wait_published(self, since: dict[str, float | None], *, timeout: float) -> None:
        """Until each restarted provider has published (or reported its backend
        down), so READY after a reload means the new config is being served."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            states = self.table.states()
            if all(
                states[n].last_sync != t or states[n].stale for n, t in since.items() if n in states
            ):
                return
            await asyncio.sleep(0.01)
        log.warning("daemon.reload_providers_pending", providers=sorted(since))

    def summary(self) -> str:
        """A one-line status for systemd's STATUS=."""
        view = self.table.view
        instances = sum(len(i) for i in view.services.values())
        now = time.time()
        stale = [
            f"{s.name} stale {s.age(now) or 0:.0f}s"
            for s in self.table.states().values()
            if s.stale
        ]
        text = f"serving {len(view.services)} services, {instances} instances"
        return text + (f"; {', '.join(stale)}" if stale else "")

    async def reload(self, new: Config) -> list[str]:
        """Apply a new config without dropping a query. Listeners whose address
        did not change are kept, providers restart only when their section
        changed, balancing state stays for every service. Returns the sections
        that need a restart to change (API listeners, state files, logging)."""
        old = self.config
        self.config = new
        self.forwarder = _forwarder(new)
        self.answerer.reconfigure(
            config=new.dns, policy_for=new.policy_for, forwarder=self.forwarder
        )
        await self._cancel(self._clock_task)
        self._clock_task = None
        if self.forwarder.enabled:
            self._clock_task = self._spawn(self.forwarder.run_clock(), "forward-clock")
        await self.dns.rebind(udp=new.dns.listen_udp, tcp=new.dns.listen_tcp)
        self.rpc.servicer.reconfigure(new)

        before = {p.name: p for p in old.providers}
        after = {p.name: p for p in new.providers}
        self.table.set_order([*after, RegistrationsProvider.NAME])
        for name, section in before.items():
            if after.get(name) != section:
                await self._cancel(self._provider_tasks.pop(name, None))
                self.providers = [p for p in self.providers if p.name != name]
                if name not in after:
                    self.table.remove_provider(name)
        restarted: dict[str, float | None] = {}
        for name, section in after.items():
            if before.get(name) != section:
                provider = create_provider(section)
                self.providers.insert(len(self.providers) - 1, provider)
                restarted[name] = self.table.states()[name].last_sync
                self._start_provider(provider)
        await self._wait_published(restarted, timeout=RELOAD_SYNC_TIMEOUT)

        health_before = (old.health_check, old.provider_health_checks, old.service_health_checks)
        health_after = (new.health_check, new.provider_health_checks, new.service_health_checks)
        if health_before != health_after:
            await self._cancel(self._health_task)
            self._health_task = None
            self.table.clear_checked_health()
            self.health = HealthChecker(self.table, new) if new.health_checks_enabled else None
            if self.health is not None:
                self._health_task = self._spawn(self.health.run(), "health-checker")

        await self.metrics.reconfigure(config=new, forwarder=self.forwarder, health=self.health)
        restart = [
            section
            for section in ("api", "registrations", "snapshot", "log")
            if getattr(old, section) != getattr(new, section)
        ]
        log.info(
            "daemon.reloaded",
            file=new.file,
            providers=sorted(after),
            needs_restart=restart,
        )
        return restart

    async def _provider_task(self, provider: Provider) -> None:
        try:
            await provider.run(self.table)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("provider.failed", provider=provider.name)

    async def stop(self, grace: float = 5.0) -> None:
        # NOT_SERVING first, so load balancers stop sending, then the servers.
        await self.rpc.not_serving()
        self.hub.close()
        await self.rpc.stop(grace)
        await self.dns.stop()
        await self.metrics.stop()
        if self.snapshots is not None:
            try:
                self.snapshots.flush()
            except OSError as exc:
                log.warning("snapshot.write_failed", error=str(exc))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        log.info("daemon.stopped")

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _forwarder(config: Config) -> Forwarder:
    dns = config.dns
    own = [host for host, _port in (*dns.listen_udp, *dns.listen_tcp)]
    upstreams = dns.forward.upstreams
    if upstreams is None:
        upstreams = resolv_conf_upstreams(exclude=own)
    forwarder = Forwarder(
        dns.forward,
        upstreams=upstreams,
        allow=dns.forward.allow or default_allow((*dns.listen_udp, *dns.listen_tcp)),
        max_udp_size=dns.max_udp_size,
    )
    log.info(
        "dns.forwarding",
        upstreams=[f"{h}:{p}" for h, p in upstreams],
        policy=dns.forward.policy,
    )
    return forwarder


async def serve(config: Config, *, notifier: Notifier | None = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config file. Speaks
    sd_notify: READY=1 once listening and every provider has synced or
    reported its backend unreachable, WATCHDOG=1 from the loop, RELOADING=1,
    STOPPING=1. A second SIGTERM/SIGINT exits at once."""
    notify = notifier or Notifier()
    stop = asyncio.Event()
    hup = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        if stop.is_set():
            log.warning("daemon.forced_exit")
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    daemon = Daemon(config)
    await daemon.start()
    tasks: list[asyncio.Task[None]] = []
    try:
        tasks.append(asyncio.create_task(_notify_ready(daemon, notify), name="sd-ready"))
        if notify.watchdog_interval is not None:
            tasks.append(
                asyncio.create_task(_watchdog(notify, notify.watchdog_interval), name="watchdog")
            )
        while not stop.is_set():
            waiter = asyncio.create_task(hup.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if hup.is_set() and not stop.is_set():
                hup.clear()
                await _reload(daemon, notify)
        log.info("daemon.stopping")
        notify.stopping()
    finally:
        for task in tasks:
            task.cancel()
        await daemon.stop()
        notify.close()


async def _notify_ready(daemon: Daemon, notify: Notifier) -> None:
    while not daemon.table.settled:
        await asyncio.sleep(0.05)
    notify.ready(daemon.summary())
    last = ""
    while True:
        await asyncio.sleep(STATUS_INTERVAL)
        status = daemon.summary()
        if status != last:
            notify.send(STATUS=status)
            last = status


async def _watchdog(notify: Notifier, interval: float) -> None:
    # Pinged from the event loop itself: if the loop is stuck, pings stop.
    while True:
        notify.watchdog()
        await asyncio.sleep(interval)


async def _reload(daemon: Daemon, notify: Notifier) -> None:
    notify.reloading()
    log.info("daemon.reloading", file=daemon.config.file)
    try:
        new = load_config(daemon.config.file)
    except ConfigError as err:
        # The running config stays; the error is located as at start-up.
        log.error("daemon.reload_rejected", error=str(err))
        notify.ready(f"{daemon.summary()}; reload rejected: {err}")
        return
    try:
        await daemon.reload(new)
    except Exception as exc:
        log.exception("daemon.reload_failed")
        notify.ready(f"{daemon.summary()}; reload failed: {exc}")
        return
    notify.ready(daemon.summary())
