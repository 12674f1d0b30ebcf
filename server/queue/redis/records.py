"""Async jobs' records in Redis, for `RedisQueue`: reading a job's state, listing an owner's jobs, and the
webhook deliveries every frontend takes from.

The records are written by the queue's own scripts (SUBMIT writes ``job:{id}`` and the owner's index
``owned:{owner}``; FINISH writes the end and queues the delivery in ``hooks``): this module reads them, marks
claimed jobs started, and leases deliveries (`scripts.TAKE_DELIVERIES`, `scripts.RETRY_DELIVERY`). It knows
the key layout of `server.queue.redis.queue` through the `RecordsHost` it is given, nothing about HTTP.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis

from server.jobs import Job, JobState
from server.queue.base import Delivery
from server.queue.redis import scripts
from server.queue.redis.errors import ms

T = TypeVar("T")
log = logging.getLogger(__name__)
LISTED = 1000  # the newest jobs of an owner a listing looks through


class RecordsHost(Protocol):
    redis: Redis
    stream: str
    group: str
    max_depth: int

    def key(self, *parts: str) -> str: ...

    async def _retry(self, call: Callable[[], Awaitable[T]], doing: str, *, fail_fast: bool = False) -> T: ...


class JobRecords:
    def __init__(self, host: RecordsHost) -> None:
        self.host = host
        redis = host.redis
        self._started = redis.register_script(scripts.STARTED)
        self._take = redis.register_script(scripts.TAKE_DELIVERIES)
        self._retry_later = redis.register_script(scripts.RETRY_DELIVERY)

    async def mark_started(self, jobs: list[Job]) -> None:
        """Best effort: a job whose record could not say so still runs (it reads "queued" until it ends)."""
        records = [self.host.key("job", job.id) for job in jobs]
        if not records:
            return
        try:
            await self.host._retry(lambda: self._started(keys=records, args=[time.time()]), "marking jobs started")
        except Exception as exc:
            log.warning("could not mark %d async job(s) started: %s", len(records), exc)

    async def state(self, job_id: str) -> JobState | None:
        h = self.host

        async def read() -> list[Any]:
            async with h.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(h.key("job", job_id))
                pipe.get(h.key("result", job_id))
                pipe.xrevrange(h.key("events", job_id), count=8)
                pipe.hget(h.key("entry"), job_id)
                return await pipe.execute()

        record, result, recent, entry = await h._retry(read, "reading a job")
        state = _state(record)
        if state is None:
            return None
        if result is not None:
            state.terminal = json.loads(result)
        usable = state.terminal is None  # newest first: once ended, only what came before the end marker
        for _, fields in recent:  # the last progress before the end (a late worker may add some after it)
            usable = usable or "t" in fields
            event = json.loads(fields["e"]) if "e" in fields and usable else {}
            if event.get("type") == "progress":
                state.progress = {"step": event["step"], "total": event["total"]}
                break
        if state.terminal is None and state.started is None and entry:
            ahead = await h._retry(lambda: h.redis.xpending_range(h.stream, h.group, "-", f"({entry}", h.max_depth,
                                                                  scripts.QUEUED), "reading a position")
            state.position = len(ahead)
        return state

    async def states(self, owner: str, limit: int, status: str | None = None) -> list[JobState]:
        """Through the owner's index, newest first, a page at a time, until `limit` match (looking at the newest
        `LISTED` at most); records gone (expired) leave the index."""
        h = self.host
        index = h.key("owned", owner)
        states: list[JobState] = []
        start, page = 0, max(limit, 20)
        while len(states) < limit and start < LISTED:
            ids = await h._retry(lambda at=start: h.redis.zrevrange(index, at, at + page - 1), "listing jobs")
            if not ids:
                break
            start += len(ids)

            async def read(ids: list[str] = ids) -> list[Any]:
                async with h.redis.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        pipe.hgetall(h.key("job", job_id))
                    return await pipe.execute()

            expired = []
            for job_id, record in zip(ids, await h._retry(read, "listing jobs"), strict=True):
                state = _state(record)
                if state is None:
                    expired.append(job_id)
                elif status is None or state.state == status:
                    states.append(state)
            if expired:
                await h._retry(lambda gone=expired: h.redis.zrem(index, *gone), "listing jobs")
                start -= len(expired)
        states = states[:limit]
        failed = [s for s in states if s.state in ("failed", "cancelled")]
        if failed:  # their errors are small; successes' results are read one job at a time
            errors = await h._retry(lambda: h.redis.mget([h.key("result", s.id) for s in failed]), "listing jobs")
            for s, error in zip(failed, errors, strict=True):
                s.terminal = json.loads(error) if error else None
        return states

    async def take_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        h = self.host
        taken = await h._retry(lambda: self._take(keys=[h.key("hooks")], args=[limit, ms(lease), h.key("job", "")]),
                               "taking webhook deliveries")
        return [Delivery(job_id, url, int(tries)) for job_id, url, tries in taken]

    async def delivery_done(self, job_id: str) -> None:
        await self.host._retry(lambda: self.host.redis.zrem(self.host.key("hooks"), job_id), "recording a delivery")

    async def delivery_retry(self, job_id: str, delay: float) -> None:
        hooks = self.host.key("hooks")
        await self.host._retry(lambda: self._retry_later(keys=[hooks], args=[job_id, int(delay * 1000)]),
                               "scheduling a delivery")


def _state(record: dict[str, str]) -> JobState | None:
    """A job record (hash) as a `JobState` without its terminal event; None for no record."""
    if not record or "meta" not in record:
        return None
    meta = json.loads(record["meta"])
    state = JobState(meta["id"], meta["owner"], meta["surface"], float(meta["created"]), float(meta["deadline"]),
                     meta.get("render") or {}, meta.get("webhook"))
    state.started = float(record["started"]) if "started" in record else None
    state.finished = float(record["finished"]) if "finished" in record else None
    state.status = record.get("status")
    return state
