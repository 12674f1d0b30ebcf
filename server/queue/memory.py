"""In-process job queue: the default for `janus-server serve` on one machine.

Everything lives in the event loop of the one process that runs both the API and the worker, so
there is no serialisation and nothing to reconnect. Bounded: `submit` raises `QueueFull` past
`max_depth` unfinished jobs; waiting jobs leave in fair order across owners (`FairQueue`); a finished
job drops its input images at once and its result after `result_ttl` (a timer sweeps), or earlier, oldest
first, when more than `max_results` results or `max_result_bytes` of them are kept. A client following a
job keeps its result however it was dropped; only re-attaching needs it kept. Idempotency keys map to
(fingerprint, job id) for as long as the job's result is kept; a job that ends in an error releases its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from server.jobs import UNAVAILABLE, Job, UnderstandParams, error_event, is_terminal
from server.queue.base import IdempotencyConflict, JobQueue, QueueFull
from server.queue.fair import FairQueue


class _Entry:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.history: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.cancelled = False
        self.done_at: float | None = None
        self.size = 0  # bytes of its stored result, once finished


class MemoryQueue(JobQueue):
    OPTIONS = ("max_depth", "result_ttl", "max_results", "max_result_bytes")

    def __init__(self, max_depth: int = 256, result_ttl: float = 600.0, max_results: int = 1024,
                 max_result_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_depth = max_depth
        self.result_ttl = result_ttl
        self.max_results = max_results
        self.max_result_bytes = max_result_bytes
        self._pending: FairQueue[str] = FairQueue()
        self._entries: dict[str, _Entry] = {}
        self._finished: OrderedDict[str, _Entry] = OrderedDict()  # in the order they finished
        self._finished_bytes = 0
        self._sweeper: asyncio.Task | None = None
        self._keys: dict[str, tuple[str | None, str]] = {}  # idempotency key -> (fingerprint, job id)
        self._available = asyncio.Event()
        self._heartbeats: dict[str, float] = {}
        self._worker_info: dict[str, dict[str, Any]] = {}

    async def submit(self, job: Job) -> str:
        self._expire_results()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
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
        self._pending.push(job.owner or "", job.id, job.weight)
        self._available.set()
        return job.id

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        entry = self._entries.get(job_id)
        if entry is None:  # never known, or its result was dropped before this follower came
            yield error_event(UNAVAILABLE, f"job {job_id} is unknown, or its result is no longer kept")
            return
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
            entry = self._entries.get(self._pending.pop())
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
        if isinstance(entry.job.params, UnderstandParams) and entry.job.params.images:
            entry.job.params = dataclasses.replace(entry.job.params, images=[])  # the worker is done with them
        if event.get("type") == "error":  # nothing was produced: a retry with the key runs again
            self._release_key(entry.job)
        entry.size = sum(len(json.dumps(e)) for e in entry.history)
        self._finished[job_id] = entry
        self._finished_bytes += entry.size
        self._expire_results()

    async def is_cancelled(self, job_id: str) -> bool:
        entry = self._entries.get(job_id)
        return entry is None or entry.cancelled

    async def heartbeat(self, worker_id: str, info: dict[str, Any] | None = None) -> None:
        self._heartbeats[worker_id] = time.time()
        self._worker_info[worker_id] = dict(info or {})

    async def workers(self) -> dict[str, dict[str, Any]]:
        return {w: {**self._worker_info.get(w, {}), "last_seen": t} for w, t in self._heartbeats.items()}

    def _expire_results(self) -> None:
        cutoff = time.time() - self.result_ttl
        while self._finished:
            job_id, entry = next(iter(self._finished.items()))
            assert entry.done_at is not None
            if (entry.done_at >= cutoff and len(self._finished) <= self.max_results
                    and self._finished_bytes <= self.max_result_bytes):
                break
            del self._finished[job_id]
            self._finished_bytes -= entry.size
            self._entries.pop(job_id, None)
            self._release_key(entry.job)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(min(self.result_ttl / 2, 30.0), 0.05))
            self._expire_results()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def _release_key(self, job: Job) -> None:
        key = job.idempotency_key
        if key and self._keys.get(key, (None, None))[1] == job.id:
            del self._keys[key]
