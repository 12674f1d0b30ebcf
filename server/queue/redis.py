"""Redis Streams job queue: frontends (`janus-server api`) and GPU workers on different machines.

What lives in Redis (every key under `prefix`, default ``janus:``):

- ``jobs``: a stream with one consumer group (``janus-workers``); one entry per *unfinished* job
  (fields ``id`` and ``job``, the job as JSON). An entry is acknowledged and deleted only once the
  job's terminal event is stored, so XLEN is the depth (waiting + running) and nothing
  unacknowledged is ever trimmed.
- ``entry``: hash job id -> stream entry id, so any process can acknowledge a job by its id.
- ``result:{id}``: the terminal event (TTL). Written with SET NX in the same script that acknowledges
  the job, so when a job runs twice (a stuck worker, then its replacement) only one result is seen.
- ``events:{id}``: a stream of the job's events (TTL), ending with a marker for the terminal event
  (which is not copied: results can be megabytes of PNG). Followers read it with XREAD from the
  start, so a follower that arrives late still sees everything.
- ``dead``: the dead-letter stream: jobs delivered more than `max_deliveries` times (or unreadable).
- ``cancel:{id}``, ``idem:{key}`` (TTL); ``workers`` (heartbeat times, Redis clock), ``worker:{id}``.

Delivery: `claim` first takes over entries another consumer has left idle for `claim_idle_timeout`
(a dead or stuck worker; `heartbeat` keeps a live worker's claimed entries fresh), then reads new
ones. A job seen more than `max_deliveries` times is dead-lettered and its follower gets an
`internal` error; expired or cancelled jobs are answered and acknowledged instead of being returned.

Failures: each call retries on connection errors with backoff for up to `reconnect_timeout` seconds,
then raises `QueueUnavailable`. `ping` returns False instead, and `events` ends with an
`unavailable` error event rather than wait past the job's deadline or for a job Redis has lost.
This module knows nothing about models or HTTP; it moves `Job`s and event dicts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from server.jobs import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    UNAVAILABLE,
    Job,
    error_event,
    is_terminal,
)
from server.queue.base import JobQueue, QueueFull, QueueUnavailable

T = TypeVar("T")

# Errors that mean "Redis is not reachable right now" (BusyLoadingError is a ConnectionError).
_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, asyncio.TimeoutError)
_FORGET_WORKER_AFTER = 3600.0  # seconds without a heartbeat before a worker leaves the registry
_READ_COUNT = 256  # events read per XREAD

# KEYS: stream, entry hash, result key, idempotency key.
# ARGV: job id, job JSON, max depth, max wait ms (0 = off), idempotency TTL ms (0 = no key), group.
_SUBMIT = """
local stream, entries, result, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, max_wait = ARGV[1], tonumber(ARGV[4])
if redis.call('HEXISTS', entries, job_id) == 1 or redis.call('EXISTS', result) == 1 then
  return {'ok', job_id}  -- a retried submit that went through the first time
end
if ARGV[5] ~= '0' then
  local first = redis.call('GET', idem)
  if first then return {'dup', first} end
end
local depth = redis.call('XLEN', stream)
if depth >= tonumber(ARGV[3]) then return {'full', tostring(depth)} end
if max_wait > 0 and depth > 0 then
  local after = '-'
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) == 'table' and not groups.err then
    for _, g in ipairs(groups) do
      local name, last
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
      end
      if name == ARGV[6] then after = '(' .. last end
    end
  end
  local oldest = redis.call('XRANGE', stream, after, '+', 'COUNT', 1)
  if #oldest > 0 then
    local t = redis.call('TIME')
    local waited = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      - tonumber(string.match(oldest[1][1], '^(%d+)'))
    if waited > max_wait then return {'lagging', tostring(waited)} end
  end
end
local entry = redis.call('XADD', stream, '*', 'id', job_id, 'job', ARGV[2])
redis.call('HSET', entries, job_id, entry)
if ARGV[5] ~= '0' then redis.call('SET', idem, job_id, 'PX', ARGV[5]) end
return {'ok', job_id}
"""

# KEYS: stream, entry hash, result key, events stream, dead-letter stream.
# ARGV: group, job id, terminal event JSON, TTL ms, entry id hint, dead reason ('' = not dead),
#       job JSON for the dead letter, dead-letter stream max length.
_FINISH = """
local stored = redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4])
if stored then
  redis.call('XADD', KEYS[4], '*', 't', '1')
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
end
local entry = ARGV[5]  -- the entry this process was handed, else whatever submit recorded
if entry == '' then entry = redis.call('HGET', KEYS[2], ARGV[2]) end
if entry then
  if ARGV[6] ~= '' then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'id', ARGV[2], 'entry', entry,
               'reason', ARGV[6], 'job', ARGV[7])
  end
  redis.call('XACK', KEYS[1], ARGV[1], entry)
  redis.call('XDEL', KEYS[1], entry)
  redis.call('HDEL', KEYS[2], ARGV[2])
end
if stored then return 1 end
return 0
"""

# Resets the idle time of entries this consumer still owns (XCLAIM JUSTID leaves the delivery count
# alone), so a live worker's long-running jobs are not taken over. KEYS: stream. ARGV: group,
# consumer, entry ids...
_TOUCH = """
local touched = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    touched = touched + 1
  end
end
return touched
"""

# Heartbeats use the Redis clock so frontends and workers on different machines agree on ages.
# KEYS: workers zset, worker info key. ARGV: worker id, info JSON, info TTL ms, forget after s.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return tostring(now)
"""

# KEYS: workers zset. ARGV: max age s. -> number of workers seen within max age.
_ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # asyncio's TimeoutError has no message


@dataclass
class _Delivery:
    """One stream entry handed to this consumer, and how many times it has been delivered."""

    entry_id: str
    fields: dict[str, str]
    deliveries: int


@dataclass
class _Claim:
    """A job this process claimed: what `publish`, `finish` and `heartbeat` need to know about it."""

    worker_id: str
    entry_id: str
    run: int  # the delivery number; tags published events so followers can hide replays
    seq: int = 0


class RedisQueue(JobQueue):
    OPTIONS = ("prefix", "stream", "group", "dead_stream", "max_depth", "max_wait", "result_ttl",
               "max_deliveries", "claim_idle_timeout", "reconnect_timeout", "poll_interval",
               "lost_grace", "retry_after", "socket_timeout", "dead_maxlen")

    def __init__(self, url: str, *, prefix: str = "janus:", stream: str | None = None,
                 group: str = "janus-workers", dead_stream: str | None = None, max_depth: int = 256,
                 max_wait: float | None = None, result_ttl: float = 600.0, max_deliveries: int = 3,
                 claim_idle_timeout: float = 60.0, reconnect_timeout: float = 10.0,
                 poll_interval: float = 1.0, lost_grace: float = 5.0, retry_after: float = 2.0,
                 socket_timeout: float = 5.0, dead_maxlen: int = 1000) -> None:
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, got {max_deliveries}")
        if not 0 < poll_interval < socket_timeout:
            # Blocking reads wait up to poll_interval; a shorter socket timeout would cut them off.
            raise ValueError(f"poll_interval ({poll_interval}) must be positive and below "
                             f"socket_timeout ({socket_timeout})")
        self.prefix = prefix
        self.stream = stream or f"{prefix}jobs"
        self.group = group
        self.dead_stream = dead_stream or f"{prefix}dead"
        self.max_depth = max_depth
        self.max_wait = max_wait
        self.result_ttl = result_ttl
        self.max_deliveries = max_deliveries
        self.claim_idle_timeout = claim_idle_timeout
        self.reconnect_timeout = reconnect_timeout
        self.poll_interval = poll_interval
        self.lost_grace = lost_grace
        self.retry_after = retry_after
        self.socket_timeout = socket_timeout
        self.dead_maxlen = dead_maxlen
        # Counters for metrics (this process only, like a Prometheus counter).
        self.redeliveries = 0
        self.dead_letters = 0
        self.expired = 0
        # redis-py retries a little on its own; the bounded loop in `_retry` does the rest.
        self.redis: Redis = Redis.from_url(
            url, decode_responses=True, protocol=2, socket_timeout=socket_timeout,
            socket_connect_timeout=min(socket_timeout, 2.0),
            retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.25), retries=2))
        self._submit = self.redis.register_script(_SUBMIT)
        self._finish = self.redis.register_script(_FINISH)
        self._touch = self.redis.register_script(_TOUCH)
        self._beat = self.redis.register_script(_HEARTBEAT)
        self._alive = self.redis.register_script(_ALIVE)
        self._group_ready = False
        self._autoclaim_cursor = "0-0"
        self._claims: dict[str, _Claim] = {}
        self._deadlines: dict[str, float] = {}  # jobs submitted here, for `events` to bound waits

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def counters(self) -> dict[str, int]:
        return {"redeliveries": self.redeliveries, "dead_letters": self.dead_letters,
                "expired": self.expired}

    # --- frontend side -------------------------------------------------------------------------

    async def submit(self, job: Job) -> str:
        idem_ttl = _ms(max(job.deadline - time.time(), 0.0) + self.result_ttl) if job.idempotency_key else 0
        keys = [self.stream, self.key("entry"), self.key("result", job.id),
                self.key("idem", job.idempotency_key or "")]
        args = [job.id, json.dumps(job.to_dict()), self.max_depth,
                _ms(self.max_wait) if self.max_wait else 0, idem_ttl, self.group]
        status, value = await self._retry(lambda: self._submit(keys=keys, args=args), "submitting a job")
        if status == "full":
            raise QueueFull(f"queue is full ({value} jobs waiting or running, limit {self.max_depth})",
                            retry_after=self.retry_after)
        if status == "lagging":
            raise QueueFull(f"queue is lagging: the oldest waiting job has waited {int(value) / 1000:.1f}s "
                            f"(limit {self.max_wait}s)", retry_after=self.retry_after)
        self._remember_deadline(value, job.deadline)
        return value

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        follower = _Follower(self, job_id, self._deadlines.pop(job_id, None))
        while not follower.done:
            for event in await follower.next_events():
                yield event

    async def cancel(self, job_id: str) -> None:
        await self._retry(lambda: self.redis.set(self.key("cancel", job_id), 1, px=_ms(self.result_ttl)),
                          "cancelling a job")

    async def depth(self) -> int:
        return int(await self._retry(lambda: self.redis.xlen(self.stream), "reading the queue depth"))

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), self.socket_timeout))
        except (*_DOWN, redis_errors.RedisError):
            return False

    async def workers_alive(self, max_age: float) -> bool:
        count = await self._retry(lambda: self._alive(keys=[self.key("workers")], args=[max_age]),
                                  "reading heartbeats")
        return int(count) > 0

    async def workers(self) -> dict[str, dict[str, Any]]:
        """Every worker heard from in the last hour: its info plus `last_seen` (epoch seconds)."""
        seen = await self._retry(lambda: self.redis.zrange(self.key("workers"), 0, -1, withscores=True),
                                 "reading heartbeats")
        if not seen:
            return {}
        infos = await self._retry(lambda: self.redis.mget([self.key("worker", w) for w, _ in seen]),
                                  "reading worker info")
        pairs = zip(seen, infos, strict=True)
        return {w: {**json.loads(info or "{}"), "last_seen": ts} for (w, ts), info in pairs}

    # --- worker side ---------------------------------------------------------------------------

    async def claim(self, worker_id: str, max_jobs: int, timeout: float) -> list[Job]:
        """Up to `max_jobs` jobs: first those a dead worker left behind, then new ones."""
        give_up = time.monotonic() + max(timeout, 0.0)
        while True:
            deliveries = await self._retry(lambda: self._fetch(worker_id, max_jobs, give_up), "claiming jobs")
            jobs = await self._accept(worker_id, deliveries)
            if jobs or time.monotonic() >= give_up:
                return jobs

    async def publish(self, job_id: str, event: dict[str, Any]) -> None:
        if is_terminal(event):  # it would end the follower but leave the job unacknowledged
            raise ValueError("publish takes delta/progress events; use finish for the result or error")
        claim = self._claims.get(job_id)
        run, seq = (claim.run, claim.seq) if claim else (0, 0)
        if claim:
            claim.seq += 1
        fields = {"e": json.dumps(event), "r": run, "s": seq}
        await self._retry(lambda: self._publish(self.key("events", job_id), fields), "publishing an event")

    async def finish(self, job_id: str, event: dict[str, Any]) -> None:
        if not is_terminal(event):
            raise ValueError(f"finish needs a result or error event, got type {event.get('type')!r}")
        claim = self._claims.pop(job_id, None)
        await self._store_terminal(job_id, event, claim.entry_id if claim else "")

    async def is_cancelled(self, job_id: str) -> bool:
        """True once the job is cancelled, or once another run of it has already finished."""
        keys = (self.key("cancel", job_id), self.key("result", job_id))
        return int(await self._retry(lambda: self.redis.exists(*keys), "checking cancellation")) > 0

    async def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        """The subset of `job_ids` that `is_cancelled` would answer True for, in one round trip."""
        ids = list(job_ids)
        if not ids:
            return set()

        async def check() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.exists(self.key("cancel", job_id), self.key("result", job_id))
                return await pipe.execute()

        flags = await self._retry(check, "checking cancellation")
        return {job_id for job_id, flag in zip(ids, flags, strict=True) if int(flag) > 0}

    async def heartbeat(self, worker_id: str, info: dict[str, Any] | None = None) -> None:
        """Record that `worker_id` is alive and keep the jobs it holds from being taken over."""
        keys = [self.key("workers"), self.key("worker", worker_id)]
        args = [worker_id, json.dumps(info or {}), _ms(_FORGET_WORKER_AFTER), _FORGET_WORKER_AFTER]
        await self._retry(lambda: self._beat(keys=keys, args=args), "sending a heartbeat")
        held = [c.entry_id for c in self._claims.values() if c.worker_id == worker_id]
        if held:
            touch_args = [self.group, worker_id, *held]
            try:
                await self._retry(lambda: self._touch(keys=[self.stream], args=touch_args),
                                  "refreshing claimed jobs")
            except redis_errors.ResponseError:  # no group: Redis restarted and the entries are gone
                self._group_ready = False

    async def release(self, worker_id: str, job_ids: Iterable[str]) -> bool:
        """Hand claimed jobs back for another delivery now instead of after the idle timeout
        (e.g. after a failure that may be transient). The next delivery counts towards
        `max_deliveries`, so a job that fails every time ends in the dead-letter stream."""
        entries = [c.entry_id for j in job_ids if (c := self._claims.pop(j, None)) is not None]
        if entries:
            idle = _ms(self.claim_idle_timeout + 1.0)
            await self._retry(lambda: self.redis.xclaim(self.stream, self.group, worker_id, 0, entries,
                                                        idle=idle, justid=True), "releasing jobs")
        return True

    async def close(self) -> None:
        await self.redis.aclose()

    # --- internals -----------------------------------------------------------------------------

    async def _retry(self, call: Callable[[], Awaitable[T]], doing: str) -> T:
        """Run `call`, retrying with backoff while Redis is unreachable, for `reconnect_timeout` s."""
        give_up = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                return await call()
            except _DOWN as exc:
                if time.monotonic() + delay > give_up:
                    raise QueueUnavailable(f"Redis is unreachable ({doing}): {_describe(exc)}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _publish(self, key: str, fields: dict[str, Any]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(key, fields)
            pipe.pexpire(key, _ms(self.result_ttl))
            await pipe.execute()

    async def _store_terminal(self, job_id: str, event: dict[str, Any], entry_hint: str,
                              dead_reason: str = "", job_json: str = "") -> bool:
        keys = [self.stream, self.key("entry"), self.key("result", job_id), self.key("events", job_id),
                self.dead_stream]
        args = [self.group, job_id, json.dumps(event), _ms(self.result_ttl), entry_hint, dead_reason,
                job_json, self.dead_maxlen]
        stored = await self._retry(lambda: self._finish(keys=keys, args=args), "storing a result")
        return bool(stored)

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _fetch(self, worker_id: str, max_jobs: int, give_up: float) -> list[_Delivery]:
        await self._ensure_group()
        try:
            found = await self._reclaim(worker_id, max_jobs)
            if len(found) < max_jobs:
                block = None if found else self._block_ms(give_up)
                found += await self._read_new(worker_id, max_jobs - len(found), block)
            return found
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False  # Redis restarted empty: make the group again on the next try
            return []

    def _block_ms(self, give_up: float) -> int | None:
        remaining = min(give_up - time.monotonic(), self.poll_interval)
        return _ms(remaining) if remaining > 0 else None  # never BLOCK 0: that waits forever

    async def _reclaim(self, worker_id: str, count: int) -> list[_Delivery]:
        cursor, entries, *_ = await self.redis.xautoclaim(
            self.stream, self.group, worker_id, _ms(self.claim_idle_timeout),
            start_id=self._autoclaim_cursor, count=count)
        self._autoclaim_cursor = cursor
        entries = [(entry_id, fields) for entry_id, fields in entries if fields]
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in entries:
                pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
            pending = await pipe.execute()
        counts = {p[0]["message_id"]: int(p[0]["times_delivered"]) for p in pending if p}
        return [_Delivery(entry_id, fields, counts.get(entry_id, 2)) for entry_id, fields in entries]

    async def _read_new(self, worker_id: str, count: int, block: int | None) -> list[_Delivery]:
        reply = await self.redis.xreadgroup(self.group, worker_id, {self.stream: ">"}, count=count,
                                            block=block)
        return [_Delivery(entry_id, fields, 1) for _, entries in reply or [] for entry_id, fields in entries]

    async def _accept(self, worker_id: str, deliveries: list[_Delivery]) -> list[Job]:
        """Jobs to run; the rest (cancelled, expired, over-delivered, unreadable) are answered here."""
        decoded = [(d, _decode_job(d.fields)) for d in deliveries]
        cancelled = await self.cancelled(job.id for _, job in decoded if job is not None)
        jobs: list[Job] = []
        for delivery, job in decoded:
            runnable = job is not None and job.id not in cancelled and not job.expired()
            if job is None or not runnable or delivery.deliveries > self.max_deliveries:
                await self._drop(delivery, job, job is not None and job.id in cancelled)
                continue
            if delivery.deliveries > 1:
                self.redeliveries += 1
            self._claims[job.id] = _Claim(worker_id, delivery.entry_id, delivery.deliveries)
            jobs.append(job)
        return jobs

    async def _drop(self, delivery: _Delivery, job: Job | None, cancelled: bool) -> None:
        job_id = job.id if job is not None else delivery.fields.get("id") or delivery.entry_id
        dead_reason = ""
        if job is None:
            dead_reason = "unreadable job entry"
            event = error_event(INTERNAL, "the job could not be read back from the queue")
        elif cancelled:
            event = error_event(CANCELLED, "the request was cancelled before it ran")
        elif job.expired():
            self.expired += 1
            event = error_event(DEADLINE_EXCEEDED, "the request's deadline passed before a worker took it")
        else:
            failures = delivery.deliveries - 1
            dead_reason = f"delivered {delivery.deliveries} times; failed {failures} times"
            event = error_event(INTERNAL, f"the job failed {failures} times (worker crashed or timed out); "
                                          "it was moved to the dead-letter queue")
        if dead_reason:
            self.dead_letters += 1
        await self._store_terminal(job_id, event, delivery.entry_id, dead_reason,
                                   delivery.fields.get("job", "") if dead_reason else "")

    def _remember_deadline(self, job_id: str, deadline: float) -> None:
        if len(self._deadlines) > 4096:  # followers normally pop these; drop the long-expired rest
            cutoff = time.time() - 60.0
            self._deadlines = {k: v for k, v in self._deadlines.items() if v > cutoff}
        self._deadlines[job_id] = deadline


def _decode_job(fields: dict[str, str]) -> Job | None:
    try:
        return Job.from_dict(json.loads(fields["job"]))
    except (KeyError, TypeError, ValueError):
        return None


class _Replay:
    """Hides what a repeated run of a job repeats, so a follower sees one coherent stream.

    A redelivered job starts over: its progress restarts at step 0 and its text deltas repeat the
    text already sent. Progress is passed on only when it moves forward, and deltas only for text
    beyond what was already sent (runs are told apart by the `r` field, duplicates by `s`).
    """

    def __init__(self) -> None:
        self.last_seq: dict[str, int] = {}
        self.texts: dict[str, str] = {}
        self.sent_chars = 0
        self.step = -1

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
        return event


class _Follower:
    """Reads one job's event stream for `RedisQueue.events`, one poll per `next_events` call."""

    def __init__(self, queue: RedisQueue, job_id: str, deadline: float | None) -> None:
        self.queue = queue
        self.job_id = job_id
        self.deadline = deadline
        self.key = queue.key("events", job_id)
        self.last_id = "0-0"
        self.replay = _Replay()
        self.done = False
        self.outage_since: float | None = None
        self.outage_retries = 0
        self.missing_since: float | None = None

    async def next_events(self) -> list[dict[str, Any]]:
        if self.deadline is not None and time.time() >= self.deadline + self.queue.poll_interval:
            # The caller normally gives up at the deadline; this is the backstop so we never hang.
            return self._end(error_event(DEADLINE_EXCEEDED, "the request's deadline passed"))
        block = self._block_ms()
        try:
            events = await asyncio.wait_for(self._poll(block), block / 1000 + self.queue.socket_timeout)
        except _DOWN as exc:
            return await self._on_outage(exc)
        self.outage_since, self.outage_retries = None, 0
        return events

    def _block_ms(self) -> int:
        wait = self.queue.poll_interval
        if self.deadline is not None:  # wake up in time for the backstop in `next_events`
            wait = min(wait, self.deadline + self.queue.poll_interval - time.time())
        return _ms(wait)

    async def _poll(self, block: int) -> list[dict[str, Any]]:
        reply = await self.queue.redis.xread({self.key: self.last_id}, count=_READ_COUNT, block=block)
        if not reply:
            return await self._check_job()
        events: list[dict[str, Any]] = []
        for entry_id, fields in reply[0][1]:
            self.last_id = entry_id
            if "t" in fields:  # the terminal marker: the event itself is under the result key
                return self._end_after([*events, await self._stored_result()])
            event = self.replay.accept(fields)
            if event is not None:
                events.append(event)
                if is_terminal(event):
                    return self._end_after(events)
        return events

    async def _stored_result(self) -> dict[str, Any]:
        result = await self.queue.redis.get(self.queue.key("result", self.job_id))
        if result is None:
            return error_event(UNAVAILABLE, f"the result of job {self.job_id} has expired")
        return json.loads(result)

    async def _check_job(self) -> list[dict[str, Any]]:
        """Nothing new: is the job still queued or running, already answered, or lost?"""
        q = self.queue
        async with q.redis.pipeline(transaction=False) as pipe:
            pipe.get(q.key("result", self.job_id))
            pipe.hexists(q.key("entry"), self.job_id)
            pipe.exists(self.key)
            result, queued, streaming = await pipe.execute()
        if result and not streaming:  # the events stream is gone but the answer is stored
            return self._end(json.loads(result))
        if result or queued or streaming:
            self.missing_since = None
            return []
        now = time.monotonic()
        self.missing_since = self.missing_since or now
        if now - self.missing_since < q.lost_grace:
            return []
        return self._end(error_event(UNAVAILABLE, f"job {self.job_id} is no longer in the queue "
                                                  "(lost in a Redis restart, or its result expired)"))

    async def _on_outage(self, exc: BaseException) -> list[dict[str, Any]]:
        now = time.monotonic()
        self.outage_since = self.outage_since or now
        out_for = now - self.outage_since
        past_deadline = self.deadline is not None and time.time() >= self.deadline
        if out_for >= self.queue.reconnect_timeout or past_deadline:
            message = f"the job queue (Redis) is unreachable: {_describe(exc)}"
            return self._end(error_event(UNAVAILABLE, message))
        await asyncio.sleep(min(0.05 * 2 ** self.outage_retries, 1.0))
        self.outage_retries += 1
        return []

    def _end(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        return self._end_after([event])

    def _end_after(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.done = True
        return events
