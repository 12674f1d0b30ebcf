"""In-process job queue: the default for `janus-server serve` on one machine.

Everything lives in the event loop of the one process that runs both the API and the worker, so
there is no serialisation and nothing to reconnect. Bounded: `submit` raises `QueueFull` past
`max_depth` unfinished jobs. Idempotency keys map to (fingerprint, job id) for as long as the job's
result is kept; a job that ends in an error releases its key.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from server.jobs import Job, is_terminal
from server.queue.base import IdempotencyConflict, JobQueue, QueueFull


class _Entry:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.history: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.cancelled = False
        self.done_at: float | None = None


class MemoryQueue(JobQueue):
    OPTIONS = ("max_depth", "result_ttl")

    def __init__(self, max_depth: int = 256, result_ttl: float = 600.0) -> None:
        self.max_depth = max_depth
        self.result_ttl = result_ttl
        self._pending: deque[str] = deque()
        self._entries: dict[str, _Entry] = {}
        self._keys: dict[str, tuple[str | None, str]] = {}  # idempotency key -> (fingerprint, job id)
        self._available = asyncio.Event()
        self._heartbeats: dict[str, float] = {}

    async def submit(self, job: Job) -> str:
        self._expire_results()
        key = job.idempotency_key
        if key and key in self._keys:
            fingerprint, first = self._keys[key]
            if fingerprint != job.fingerprint:
                raise IdempotencyConflict(first)
            return first
        if await self.depth() >= self.max_depth:
            raise QueueFull(f"queue is full ({self.max_depth} jobs waiting or running)", retry_after=2.0)
        self._entries[job.id] = _Entry(job)
        if key:
            self._keys[key] = (job.fingerprint, job.id)
        self._pending.append(job.id)
        self._available.set()
        return job.id

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        entry = self._entries.get(job_id)
        if entry is None:
            raise KeyError(f"unknown job {job_id}")
        seen = 0
        while True:
            while seen < len(entry.history):
                event = entry.history[seen]
                seen += 1
                yield event
                if is_terminal(event):
                    return
            entry.changed.clear()
            if seen < len(entry.history):
                continue
            await entry.changed.wait()

    async def cancel(self, job_id: str) -> None:
        entry = self._entries.get(job_id)
        if entry is not None and entry.done_at is None:
            entry.cancelled = True

    async def depth(self) -> int:
        return sum(1 for e in self._entries.values() if e.done_at is None)

    async def ping(self) -> bool:
        return True

    async def live_workers(self, max_age: float) -> set[str]:
        now = time.time()
        return {w for w, t in self._heartbeats.items() if now - t <= max_age}

    async def claim(self, worker_id: str, max_jobs: int, timeout: float) -> list[Job]:
        if not self._pending:
            self._available.clear()
            try:
                await asyncio.wait_for(self._available.wait(), timeout)
            except TimeoutError:
                return []
        jobs: list[Job] = []
        while self._pending and len(jobs) < max_jobs:
            entry = self._entries.get(self._pending.popleft())
            if entry is not None and entry.done_at is None:
                jobs.append(entry.job)
        return jobs

    async def publish(self, job_id: str, event: dict[str, Any]) -> None:
        entry = self._entries.get(job_id)
        if entry is not None and entry.done_at is None:
            entry.history.append(event)
            entry.changed.set()

    async def finish(self, job_id: str, event: dict[str, Any]) -> None:
        entry = self._entries.get(job_id)
        if entry is None or entry.done_at is not None:
            return
        entry.history.append(event)
        entry.done_at = time.time()
        entry.changed.set()
        if event.get("type") == "error":  # nothing was produced: a retry with the key runs again
            self._release_key(entry.job)

    async def is_cancelled(self, job_id: str) -> bool:
        entry = self._entries.get(job_id)
        return entry is None or entry.cancelled

    async def heartbeat(self, worker_id: str, info: dict[str, Any] | None = None) -> None:
        self._heartbeats[worker_id] = time.time()

    def _expire_results(self) -> None:
        cutoff = time.time() - self.result_ttl
        for job_id in [k for k, e in self._entries.items() if e.done_at is not None and e.done_at < cutoff]:
            self._release_key(self._entries.pop(job_id).job)

    def _release_key(self, job: Job) -> None:
        key = job.idempotency_key
        if key and self._keys.get(key, (None, None))[1] == job.id:
            del self._keys[key]
