"""A circuit breaker: once a backend is known to be down, callers fail at once instead of each one
waiting out its own retries; one probe per `probe_interval` finds out when it is back.

Plain state and a clock; it knows nothing about Redis or about what the callers do.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(self, probe_interval: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        if probe_interval <= 0:
            raise ValueError(f"probe_interval must be positive, got {probe_interval}")
        self.probe_interval = probe_interval
        self.clock = clock
        self.opened_at: float | None = None  # when the backend was first seen down; None: closed
        self._next_probe = 0.0

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        """May a caller try the backend now? Always while closed; while open, one caller per
        `probe_interval` (the probe), so recovery is noticed without a stampede."""
        if self.opened_at is None:
            return True
        now = self.clock()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.probe_interval
        return True

    def failure(self) -> None:
        now = self.clock()
        if self.opened_at is None:
            self.opened_at = now
        self._next_probe = max(self._next_probe, now + self.probe_interval)

    def success(self) -> None:
        self.opened_at = None
        self._next_probe = 0.0

    def down_for(self) -> float:
        return 0.0 if self.opened_at is None else self.clock() - self.opened_at
