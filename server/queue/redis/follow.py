"""Following one job's events in Redis for `RedisQueue.events`: replay hiding, loss and outages.

A follower reads the job's ``events:{id}`` stream from its start, so it sees everything however late
it arrives (through the process's `EventHub`: one XREAD for every followed job, so followers hold no
connection while they wait), and turns it into the events one run of the job would have produced:

- a job run more than once (a dead worker's job reclaimed; a job submitted again after Redis lost
  it) repeats its progress and text; `Replay` passes on only what moves forward;
- when nothing arrives it checks whether the job is still queued, running or answered; a job that
  vanished (a Redis restart without persistence, a failover) is submitted again by `resubmit` when
  this process still holds its payload, and otherwise reported lost after `lost_grace`;
- while Redis is unreachable it keeps trying (until the deadline for jobs it can resubmit, else for
  `reconnect_timeout`) and tells the circuit breaker what it saw.

It knows the key layout of `server.queue.redis.queue` through the `FollowHost` it is given, nothing else.
`close` ends its subscription.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Protocol

from redis.asyncio import Redis

from server.jobs import DEADLINE_EXCEEDED, UNAVAILABLE, error_event, is_terminal
from server.queue.breaker import CircuitBreaker
from server.queue.redis.errors import DOWN, describe, ms
from server.queue.redis.events import EventHub


class FollowHost(Protocol):
    """What a follower needs from its queue."""

    redis: Redis
    hub: EventHub
    breaker: CircuitBreaker
    poll_interval: float
    socket_timeout: float
    lost_grace: float
    reconnect_timeout: float

    def key(self, *parts: str) -> str: ...

    def holds(self, job_id: str) -> bool:
        """This process still has the job's payload and can submit it again."""
        ...

    async def resubmit(self, job_id: str) -> bool:
        """Submit the held job again under its id (one attempt; raises on a connection error)."""
        ...


class Replay:
    """Hides what a repeated run of a job repeats, so a follower sees one coherent stream.

    A repeated run starts over: its progress restarts at step 0 and its text deltas repeat the
    text already sent. Progress (and each image's previews) is passed on only when it moves forward, and
    deltas only for text beyond what was already sent (runs are told apart by the `r` field, duplicates by `s`).
    """

    def __init__(self) -> None:
        self.last_seq: dict[str, int] = {}
        self.texts: dict[str, str] = {}
        self.sent_chars = 0
        self.step = -1
        self.preview_steps: dict[int, int] = {}  # image -> the step of its last preview passed on

    def accept(self, fields: dict[str, str]) -> dict[str, Any] | None:
        event: dict[str, Any] = json.loads(fields["e"])
        run, seq = fields.get("r", "0"), int(fields.get("s", "-1"))
        if seq >= 0:
            if seq <= self.last_seq.get(run, -1):
                return None
            self.last_seq[run] = seq
        if event.get("type") == "delta":
            text = self.texts.get(run, "") + event.get("text", "")
            self.texts[run] = text
            if len(text) <= self.sent_chars:
                return None
            event = {**event, "text": text[self.sent_chars:]}
            self.sent_chars = len(text)
        elif event.get("type") == "progress":
            if event.get("step", 0) <= self.step:
                return None
            self.step = event.get("step", 0)
        elif event.get("type") == "preview":  # an image's previews only move forward, across runs too
            image, step = event.get("image", 0), event.get("step", 0)
            if step <= self.preview_steps.get(image, 0):
                return None
            self.preview_steps[image] = step
        return event


class Follower:
    """Reads one job's event stream, one poll per `next_events` call, until `done`."""

    def __init__(self, host: FollowHost, job_id: str, deadline: float | None) -> None:
        self.host = host
        self.job_id = job_id
        self.deadline = deadline
        self.key = host.key("events", job_id)
        self.subscription = host.hub.subscribe(self.key)
        self.replay = Replay()
        self.done = False
        self.outage_since: float | None = None
        self.outage_retries = 0
        self.missing_since: float | None = None
        self.resubmitted = 0

    async def next_events(self) -> list[dict[str, Any]]:
        if self.deadline is not None and time.time() >= self.deadline + self.host.poll_interval:
            # The caller normally gives up at the deadline; this is the backstop so we never hang.
            return self._end(error_event(DEADLINE_EXCEEDED, "the request's deadline passed"))
        block = self._block_ms()
        try:
            events = await asyncio.wait_for(self._poll(block), block / 1000 + self.host.socket_timeout)
        except DOWN as exc:
            return await self._on_outage(exc)
        self.outage_since, self.outage_retries = None, 0
        self.host.breaker.success()
        return events

    def _block_ms(self) -> int:
        wait = self.host.poll_interval
        if self.deadline is not None:  # wake up in time for the backstop in `next_events`
            wait = min(wait, self.deadline + self.host.poll_interval - time.time())
        return ms(wait)

    def close(self) -> None:
        self.subscription.close()

    async def _poll(self, block: int) -> list[dict[str, Any]]:
        entries = await self.subscription.read(block / 1000)
        if not entries:
            return await self._check_job()
        events: list[dict[str, Any]] = []
        for _, fields in entries:
            if "t" in fields:  # the terminal marker: the event itself is under the result key
                return self._end_after([*events, await self._stored_result()])
            event = self.replay.accept(fields)
            if event is not None:
                events.append(event)
                if is_terminal(event):
                    return self._end_after(events)
        return events

    async def _stored_result(self) -> dict[str, Any]:
        result = await self.host.redis.get(self.host.key("result", self.job_id))
        if result is None:
            return error_event(UNAVAILABLE, f"the result of job {self.job_id} has expired")
        return json.loads(result)

    async def _check_job(self) -> list[dict[str, Any]]:
        """Nothing new: is the job still queued or running, already answered, or lost?"""
        h = self.host
        # One transaction: submit and finish change these keys atomically, so "none of the three"
        # really means Redis no longer has the job.
        async with h.redis.pipeline(transaction=True) as pipe:
            pipe.get(h.key("result", self.job_id))
            pipe.hexists(h.key("entry"), self.job_id)
            pipe.exists(self.key)
            result, queued, streaming = await pipe.execute()
        if result and not streaming:  # the events stream is gone but the answer is stored
            return self._end(json.loads(result))
        if result or queued or streaming:
            self.missing_since = None
            return []
        if h.holds(self.job_id) and await h.resubmit(self.job_id):
            self.resubmitted += 1
            return []
        now = time.monotonic()
        self.missing_since = self.missing_since or now
        if now - self.missing_since < h.lost_grace:
            return []
        return self._end(error_event(UNAVAILABLE, f"job {self.job_id} is no longer in the queue "
                                                  "(lost in a Redis restart, or its result expired)"))

    async def _on_outage(self, exc: BaseException) -> list[dict[str, Any]]:
        self.host.breaker.failure()
        now = time.monotonic()
        self.outage_since = self.outage_since or now
        out_for = now - self.outage_since
        past_deadline = self.deadline is not None and time.time() >= self.deadline
        # A job this process can submit again is worth waiting for until its deadline.
        gives_up = not self.host.holds(self.job_id) and out_for >= self.host.reconnect_timeout
        if gives_up or past_deadline:
            message = f"the job queue (Redis) is unreachable: {describe(exc)}"
            return self._end(error_event(UNAVAILABLE, message))
        await asyncio.sleep(min(0.05 * 2 ** self.outage_retries, 1.0))
        self.outage_retries += 1
        return []

    def _end(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        return self._end_after([event])

    def _end_after(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.done = True
        return events
