"""What /ready reports: the queue answers and workers are live, counted per GPU where serve runs them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.queue import JobQueue


@dataclass(frozen=True)
class ReadyState:
    """Ready while the queue answers and at least one worker is live; `degraded` (still ready) while fewer
    are live than serve runs."""

    ready: bool
    reason: str
    live_workers: int = 0
    expected_workers: int | None = None  # None: workers run elsewhere and their number is not known here
    # serve only: live workers per device label ("0", "GPU-<uuid>", "cpu"), every expected one listed
    by_gpu: dict[str, int] | None = None

    def body(self) -> dict[str, Any]:
        status = "ready" if self.ready else "not_ready"
        if self.ready and self.expected_workers is not None and self.live_workers < self.expected_workers:
            status = "degraded"
        workers: dict[str, Any] = {"live": self.live_workers, "expected": self.expected_workers}
        if self.by_gpu is not None:
            workers["by_gpu"] = self.by_gpu
        return {"status": status, "workers": workers}


async def ready_state(queue: JobQueue, max_age: float, expected: int | None = None,
                      local_workers: Callable[[], set[str]] | None = None,
                      expected_by_gpu: dict[str, int] | None = None) -> ReadyState:
    """`local_workers`: the ids of the workers this process supervises, the only ones that count (a killed
    one stops counting at once). `expected_by_gpu`: serve's plan; the live ones are counted by the device
    each names in its heartbeat."""
    by_gpu = dict.fromkeys(expected_by_gpu, 0) if expected_by_gpu is not None else None
    try:
        if not await queue.ping():
            return ReadyState(False, "queue is not reachable", 0, expected, by_gpu)
        live = await queue.live_workers(max_age)
        if local_workers is not None:
            live &= local_workers()
        if by_gpu is not None and live:
            infos = await queue.workers()
            for worker in live:
                label = str(infos.get(worker, {}).get("gpu", "unknown"))
                by_gpu[label] = by_gpu.get(label, 0) + 1
    except Exception as exc:  # any backend failure means not ready
        return ReadyState(False, f"queue is not reachable: {exc}", 0, expected, by_gpu)
    if not live:
        of = f" (0 of {expected} expected)" if expected else ""
        return ReadyState(False, f"no live worker{of}: none has sent a heartbeat recently "
                                 "(model still loading, or workers down)", 0, expected, by_gpu)
    return ReadyState(True, "ready", len(live), expected, by_gpu)
