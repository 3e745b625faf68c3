"""The sd_notify protocol: a few datagrams to $NOTIFY_SOCKET.

READY=1 once serving, STATUS= summaries, WATCHDOG=1 pings from the event loop
itself (a stuck loop stops pinging and systemd restarts the service),
RELOADING=1 and STOPPING=1. Without NOTIFY_SOCKET every call is a no-op, so
the daemon runs the same under systemd, in a container or in a terminal.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address: str | None = None
        self._socket: socket.socket | None = None
        path = env.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):  # abstract namespace
            path = "\0" + path[1:]
        if path:
            self._address = path
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: str | int) -> None:
        """Send `KEY=value` lines, e.g. send(READY=1, STATUS="serving")."""
        if self._socket is None or self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:  # systemd gone or socket full: never fatal
            log.warning("systemd.notify_failed", error=str(exc))

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match the reload.
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping")

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half the watchdog timeout systemd set for this process, or None."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds / 2 if seconds > 0 else None
