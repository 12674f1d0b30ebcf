"""A circuit breaker: once a backend is known to be down, callers fail at once instead of each one
waiting out its own retries; one probe per `probe_interval` finds out when it is back.

"Known to be down" means failing for `open_after` seconds with no success in between: under heavy
load a single timeout, with other calls succeeding around it, must not refuse every request.
Plain state and a clock; it knows nothing about Redis or about what the callers do.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(self, probe_interval: float = 0.5, open_after: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if probe_interval <= 0 or open_after < 0:
            raise ValueError(f"probe_interval must be positive and open_after not negative, got "
                             f"{probe_interval} and {open_after}")
        self.probe_interval = probe_interval
        self.open_after = open_after
        self.clock = clock
        self.failing_since: float | None = None  # first failure since the last success
        self._next_probe = 0.0

    @property
    def is_open(self) -> bool:
        return self.failing_since is not None and self.clock() - self.failing_since >= self.open_after

    def allow(self) -> bool:
        """May a caller try the backend now? Always while closed; while open, one caller per
        `probe_interval` (the probe), so recovery is noticed without a stampede."""
        if not self.is_open:
            return True
        now = self.clock()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.probe_interval
        return True

    def failure(self) -> None:
        if self.failing_since is None:
            self.failing_since = self.clock()

    def success(self) -> None:
        self.failing_since = None
        self._next_probe = 0.0

    def down_for(self) -> float:
        return 0.0 if self.failing_since is None else self.clock() - self.failing_since
