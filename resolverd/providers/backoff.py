"""Reconnect delays for providers: exponential, capped, with jitter so many
sidecars do not hammer a recovering backend in step."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable


class Backoff:
    def __init__(
        self,
        *,
        initial: float = 0.1,
        maximum: float = 10.0,
        factor: float = 2.0,
        jitter: float = 0.2,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._initial = min(initial, maximum)
        self._maximum = maximum
        self._factor = factor
        self._jitter = jitter
        self._rng = rng
        self._next = self._initial

    def reset(self) -> None:
        """After a success: the next failure waits the initial delay again."""
        self._next = self._initial

    def delay(self) -> float:
        """The next delay; each call grows the following one up to the cap."""
        base = self._next
        self._next = min(self._maximum, self._next * self._factor)
        spread = base * self._jitter
        return max(0.0, base - spread + 2 * spread * self._rng())

    async def wait(self) -> None:
        await asyncio.sleep(self.delay())
