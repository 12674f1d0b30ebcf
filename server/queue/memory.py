"""In-process job queue: the default for `janus-server serve` on one machine.

Everything lives in the event loop of the one process that runs both the API and the worker, so
there is no serialisation and nothing to reconnect. Bounded: `submit` raises `QueueFull` past
`max_depth` unfinished jobs; waiting jobs leave in fair order across owners (`FairQueue`); a finished
job drops its input images at once and its result after its TTL (`Job.ttl`, else `result_ttl`; a timer
sweeps), or earlier, oldest first, when more than `max_results` results or `max_result_bytes` of them are
kept; an async job dropped early leaves a small note saying so (`JobState.gone`) until its TTL. A client
following a job keeps its result however it was dropped; only re-attaching needs it kept. Idempotency keys
map to (fingerprint, job id) for as long as the job's result is kept; a job that ends in an error releases
its key. Webhook deliveries of async jobs wait here, with their due times and leases, until delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from server.jobs import UNAVAILABLE, Job, JobState, UnderstandParams, error_event, is_terminal
from server.queue.base import Delivery, IdempotencyConflict, JobQueue, QueueFull
from server.queue.fair import FairQueue


class _Entry:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.history: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.cancelled = False
        self.started: float | None = None
        self.done_at: float | None = None
        self.size = 0  # bytes of its stored result, once finished

    def expires(self, default_ttl: float) -> float:
        assert self.done_at is not None
        return self.done_at + (self.job.ttl if self.job.ttl is not None else default_ttl)

    def state(self) -> JobState:
        state = JobState.of(self.job)
        state.started, state.finished = self.started, self.done_at
        for event in reversed(self.history):
            if event.get("type") == "progress":
                state.progress = {"step": event["step"], "total": event["total"]}
                break
        if self.done_at is not None:
            state.terminal = self.history[-1]
        return state


DROPPED: dict[str, Any] = {"type": "dropped"}  # a preview once its job ended: kept in place, so followers' counts hold
MAX_GONE = 4096  # notes kept about async results dropped before their time


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
        # async jobs whose result was dropped early: id -> (state without the result, until when it is said)
        self._gone: OrderedDict[str, tuple[JobState, float]] = OrderedDict()
        self._deliveries: dict[str, list[Any]] = {}  # job id -> [due (epoch s), tries taken, url]

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
                if event is DROPPED:
                    continue
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
                entry.started = time.time()
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
        entry.history = [DROPPED if e.get("type") == "preview" else e for e in entry.history]  # previews are live
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
        if entry.job.webhook:
            self._deliveries[job_id] = [entry.done_at, 0, entry.job.webhook]
        self._expire_results()

    async def end(self, job_id: str, event: dict[str, Any]) -> bool:
        entry = self._entries.get(job_id)
        if entry is None or entry.done_at is not None:
            return False
        entry.cancelled = True  # a worker running it stops at its next step; a queued one is skipped
        await self.finish(job_id, event)
        return True

    async def is_cancelled(self, job_id: str) -> bool:
        entry = self._entries.get(job_id)
        return entry is None or entry.cancelled

    async def heartbeat(self, worker_id: str, info: dict[str, Any] | None = None) -> None:
        self._heartbeats[worker_id] = time.time()
        self._worker_info[worker_id] = dict(info or {})

    async def workers(self) -> dict[str, dict[str, Any]]:
        return {w: {**self._worker_info.get(w, {}), "last_seen": t} for w, t in self._heartbeats.items()}

    def _expire_results(self) -> None:
        now = time.time()
        for job_id in [j for j, e in self._finished.items() if e.expires(self.result_ttl) <= now]:
            self._drop(job_id)
        # over the bounds: the oldest results go first, and an async job's record says so until its TTL
        while self._finished and (len(self._finished) > self.max_results
                                  or self._finished_bytes > self.max_result_bytes):
            job_id, entry = next(iter(self._finished.items()))
            self._drop(job_id)
            if entry.job.is_async:
                state = entry.state()
                state.terminal, state.status = None, state.state
                state.gone = (f"its result was dropped early: this server keeps at most {self.max_results} "
                              f"results and {self.max_result_bytes} bytes of them in memory")
                self._gone[job_id] = (state, entry.expires(self.result_ttl))
        while self._gone and (len(self._gone) > MAX_GONE or next(iter(self._gone.values()))[1] <= now):
            self._gone.popitem(last=False)

    def _drop(self, job_id: str) -> None:
        entry = self._finished.pop(job_id)
        self._finished_bytes -= entry.size
        self._entries.pop(job_id, None)
        self._release_key(entry.job)

    # --- async jobs and their webhooks ----------------------------------------------------------------

    async def job_state(self, job_id: str) -> JobState | None:
        self._expire_results()
        entry = self._entries.get(job_id)
        if entry is None or not entry.job.is_async:
            gone = self._gone.get(job_id)
            return gone[0] if gone is not None and gone[1] > time.time() else None
        state = entry.state()
        if entry.done_at is None and entry.started is None:  # waiting jobs submitted before it (dict order)
            ahead = itertools.takewhile(lambda e: e is not entry, self._entries.values())
            state.position = sum(1 for e in ahead if e.done_at is None and e.started is None)
        return state

    async def job_states(self, owner: str, limit: int, status: str | None = None) -> list[JobState]:
        self._expire_results()
        now = time.time()
        states = [e.state() for e in self._entries.values() if e.job.is_async and e.job.owner == owner]
        states += [s for s, until in self._gone.values() if s.owner == owner and until > now]
        states = [s for s in states if status is None or s.state == status]
        states.sort(key=lambda s: s.created, reverse=True)
        for s in states:
            if s.terminal is not None and s.state == "succeeded":
                s.status, s.terminal = "succeeded", None
        return states[:limit]

    async def take_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        now = time.time()
        taken = []
        for job_id, due in self._deliveries.items():
            if len(taken) >= limit:
                break
            if due[0] <= now:
                due[0], due[1] = now + lease, due[1] + 1
                taken.append(Delivery(job_id, due[2], due[1]))
        return taken

    async def delivery_done(self, job_id: str) -> None:
        self._deliveries.pop(job_id, None)

    async def delivery_retry(self, job_id: str, delay: float) -> None:
        due = self._deliveries.get(job_id)
        if due is not None:
            due[0] = time.time() + delay

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
