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
- ``job:{id}``: an async job's record (hash: ``meta`` JSON, ``ttl``, ``webhook``, ``idem``, ``started``,
  ``finished``, ``status``, ``hook_tries``), kept as long as its result; ``owned:{owner}``: an owner's async
  jobs by creation time (the newest `MAX_OWNED`); ``hooks``: webhook deliveries by due time (ms), each
  taken with a lease by any frontend (`take_deliveries`) until done.
- ``cancel:{id}``, ``idem:{key}`` (TTL; "<fingerprint> <job id>" under a hash of caller and key);
  ``workers`` (heartbeat times, Redis clock), ``worker:{id}``.
- ``wake:{uuid}``: each frontend's private wake-up stream for its event reader (`EventHub`; TTL).
- ``fair:q:{owner}`` (the entry ids of an owner's waiting jobs, in order), ``fair:owners`` (the ring of
  owners with jobs waiting), ``fair:active``, ``fair:weights``, ``fair:credits``, and ``fair:wake`` (a
  list a submit pushes to, so an idle worker wakes).
- ``quota:{key name}:...``: API key quotas (`server.queue.redis.quotas`).

Delivery: `submit` delivers the new entry at once to the holding consumer ``~queued`` and queues its id
under its owner (the API key's name). `claim` first takes over the jobs of workers whose heartbeat is
older than `dead_worker_timeout` (and removes such workers from the group once they hold nothing), then
entries a worker has left idle for `claim_idle_timeout` (the backstop; never ``~queued``'s), then takes
waiting jobs in weighted round-robin across owners (moving each from ``~queued`` to itself), so one
owner's flood does not stand in front of the others, whichever frontends they came through. Entries a
frontend of an earlier version added undelivered are read in stream order after those.
A job seen more than `max_deliveries` times is dead-lettered and its follower gets an `internal`
error; expired or cancelled jobs are answered and acknowledged instead of being returned.

Failures: the frontend keeps each job it submitted until its follower ends; a job that vanishes from
Redis (a restart without persistence, a failover) is submitted again under the same id, so its
client still gets one answer. A circuit breaker remembers that Redis is down: `submit` then fails at
once with `QueueUnavailable` (one probe per `probe_interval`), while calls that must not be lost
(a worker storing a result) retry for up to `reconnect_timeout` seconds. Authentication and TLS
failures are not retried: `verify` names them at start-up.
This module knows nothing about models or HTTP; it moves `Job`s and event dicts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from server.jobs import CANCELLED, DEADLINE_EXCEEDED, INTERNAL, Job, JobState, error_event, is_terminal, terminal_status
from server.queue.base import Delivery, IdempotencyConflict, JobQueue, QueueFull, QueueMisconfigured, QueueUnavailable
from server.queue.breaker import CircuitBreaker
from server.queue.redis import scripts
from server.queue.redis.errors import DOWN, config_problem, describe, ms, pool_exhausted, redact
from server.queue.redis.events import EventHub
from server.queue.redis.follow import Follower
from server.queue.redis.records import JobRecords

T = TypeVar("T")
log = logging.getLogger(__name__)

_FORGET_WORKER_AFTER = 3600.0  # seconds without a heartbeat before a worker leaves the registry


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
    run: str  # tags published events so followers can tell this run's replays from another's
    idempotency_key: str | None = None  # released if the job fails
    seq: int = 0
    ttl: float | None = None  # an async job's: its events are kept as long as its result


MAX_OWNED = 10_000  # async jobs an owner's index keeps (the oldest leave first)


MEMORY_ADMIT = 0.8  # share of Redis' maxmemory past which new jobs are refused


class RedisQueue(JobQueue):
    OPTIONS = ("prefix", "stream", "group", "dead_stream", "max_depth", "max_wait", "result_ttl",
               "max_deliveries", "claim_idle_timeout", "dead_worker_timeout", "reconnect_timeout",
               "poll_interval", "lost_grace", "retry_after", "socket_timeout", "dead_maxlen",
               "probe_interval", "password", "tls_ca_certs", "max_connections")

    def __init__(self, url: str, *, prefix: str = "janus:", stream: str | None = None,
                 group: str = "janus-workers", dead_stream: str | None = None, max_depth: int = 256,
                 max_wait: float | None = None, result_ttl: float = 600.0, max_deliveries: int = 3,
                 claim_idle_timeout: float = 60.0, dead_worker_timeout: float = 10.0,
                 reconnect_timeout: float = 10.0, poll_interval: float = 1.0, lost_grace: float = 5.0,
                 retry_after: float = 2.0, socket_timeout: float = 5.0, dead_maxlen: int = 1000,
                 probe_interval: float = 0.5, password: str | None = None,
                 tls_ca_certs: str | None = None, max_connections: int = 64) -> None:
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, got {max_deliveries}")
        if not 0 < poll_interval < socket_timeout:
            # Blocking reads wait up to poll_interval; a shorter socket timeout would cut them off.
            raise ValueError(f"poll_interval ({poll_interval}) must be positive and below "
                             f"socket_timeout ({socket_timeout})")
        if max_connections < 2:  # the event hub's blocking read holds one
            raise ValueError(f"max_connections must be at least 2, got {max_connections}")
        if tls_ca_certs and not url.startswith("rediss://"):
            raise ValueError(f"a TLS CA file was given but the queue URL {redact(url)} is not rediss://")
        self.url = redact(url)
        self.prefix = prefix
        self.stream = stream or f"{prefix}jobs"
        self.group = group
        self.dead_stream = dead_stream or f"{prefix}dead"
        self.max_depth = max_depth
        self.max_wait = max_wait
        self.result_ttl = result_ttl
        self.max_deliveries = max_deliveries
        self.claim_idle_timeout = claim_idle_timeout
        self.dead_worker_timeout = dead_worker_timeout
        self.reconnect_timeout = reconnect_timeout
        self.poll_interval = poll_interval
        self.lost_grace = lost_grace
        self.retry_after = retry_after
        self.socket_timeout = socket_timeout
        self.dead_maxlen = dead_maxlen
        self.breaker = CircuitBreaker(probe_interval)
        # Counters for metrics (this process only, like a Prometheus counter).
        self.redeliveries = 0
        self.dead_letters = 0
        self.expired = 0
        self.resubmissions = 0
        connection: dict[str, Any] = {}
        if password:  # else whatever the URL says (redis://user:pass@host)
            connection["password"] = password
        if tls_ca_certs:
            connection["ssl_ca_certs"] = tls_ca_certs
        # One pool per process, bounded: a command waits for a free connection (up to socket_timeout)
        # instead of failing, and followers share one reader (`EventHub`), so the connections in use do
        # not grow with the requests in flight. redis-py retries a little on its own; the bounded loop
        # in `_retry` does the rest.
        self.max_connections = max_connections
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=socket_timeout, decode_responses=True, protocol=2,
            socket_timeout=socket_timeout, socket_connect_timeout=min(socket_timeout, 2.0),
            retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.25), retries=2), **connection)
        self.redis: Redis = Redis.from_pool(pool)
        self.hub = EventHub(self.redis, self.key("wake:"), block=poll_interval)
        self._submit = self.redis.register_script(scripts.SUBMIT)
        self._take_fair = self.redis.register_script(scripts.TAKE_FAIR)
        self._reclaim_idle_script = self.redis.register_script(scripts.RECLAIM_IDLE)
        # the owners ring, the active owners, their weights and credits (see redis_scripts.TAKE_FAIR), the wake-up
        # list, and the prefix of the per-owner lists
        self._fair_keys = [self.key("fair", name) for name in ("owners", "active", "weights", "credits")]
        self._fair_wake, self._fair_lists = self.key("fair", "wake"), self.key("fair", "q:")
        self._finish = self.redis.register_script(scripts.FINISH)
        self._publish_preview = self.redis.register_script(scripts.PUBLISH_PREVIEW)
        self.records = JobRecords(self)
        self._touch = self.redis.register_script(scripts.TOUCH)
        self._beat = self.redis.register_script(scripts.HEARTBEAT)
        self._live = self.redis.register_script(scripts.LIVE_WORKERS)
        self._reclaim_dead = self.redis.register_script(scripts.RECLAIM_DEAD)
        self._group_ready = False
        self._autoclaim_cursor = "0-0"
        self._claims: dict[str, _Claim] = {}
        self._held: dict[str, Job] = {}  # jobs submitted here, until their follower ends
        self._memory_checked = -math.inf
        self._memory_lock = asyncio.Lock()
        self._memory = (0, 0)  # Redis' used_memory and maxmemory, as last read

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def counters(self) -> dict[str, int]:
        return {"redeliveries": self.redeliveries, "dead_letters": self.dead_letters,
                "expired": self.expired, "resubmissions": self.resubmissions}

    async def verify(self) -> None:
        """One PING at start-up: raises `QueueMisconfigured` for refused credentials or a failed TLS
        handshake (no retry fixes those); an unreachable Redis is only logged, as it may come up later."""
        try:
            await asyncio.wait_for(self.redis.ping(), self.socket_timeout + 1.0)
        except (*DOWN, redis_errors.RedisError) as exc:
            problem = config_problem(exc)
            if problem is not None:
                raise QueueMisconfigured(f"{problem} (queue {self.url})") from exc
            log.warning("Redis at %s is not reachable yet (%s); carrying on", self.url, describe(exc))

    # --- frontend side -------------------------------------------------------------------------

    async def submit(self, job: Job) -> str:
        await self._check_memory()
        try:
            status, value = await self._retry(lambda: self._submit_once(job), "submitting a job", fail_fast=True)
        except redis_errors.ResponseError as exc:
            if "OOM" not in str(exc):
                raise
            raise QueueFull("the queue's Redis is at its memory limit (maxmemory)", self.retry_after) from exc
        if status == "full":
            raise QueueFull(f"queue is full ({value} jobs waiting or running, limit {self.max_depth})",
                            retry_after=self.retry_after)
        if status == "lagging":
            raise QueueFull(f"queue is lagging: the oldest waiting job has waited {int(value) / 1000:.1f}s "
                            f"(limit {self.max_wait}s)", retry_after=self.retry_after)
        if status == "conflict":
            raise IdempotencyConflict(value)
        # A joined job is held too (the same request, so the same payload): if Redis loses it, this
        # frontend can submit it again even when the one that first submitted it is gone.
        self._hold(job if value == job.id else replace(job, id=value))
        return value

    async def _check_memory(self) -> None:
        """Admission by bytes: with a `maxmemory`, new jobs stop at `MEMORY_ADMIT` of it, so the results and
        events of the jobs already admitted still fit (Redis refuses every write past maxmemory). Read at most
        once a second."""
        async with self._memory_lock:  # one read at a time: a submit never judges by the figures it replaces
            if time.monotonic() - self._memory_checked >= 1.0:
                try:
                    info = await self.redis.info("memory")
                    self._memory = (int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)))
                except (*DOWN, redis_errors.RedisError):  # the submit that follows reports an unreachable Redis
                    self._memory = (0, 0)
                self._memory_checked = time.monotonic()
        used, limit = self._memory
        if limit and used >= MEMORY_ADMIT * limit:
            raise QueueFull(f"the queue's Redis holds {used} of its {limit} bytes (maxmemory); new jobs wait until "
                            "results drain", self.retry_after)

    def _submit_once(self, job: Job, *, admit: bool = True) -> Awaitable[Any]:
        ttl = self.result_ttl if job.ttl is None else job.ttl
        pending = max(job.deadline - time.time(), 0.0)
        idem_ttl = ms(pending + ttl) if job.idempotency_key else 0
        keys = [self.stream, self.key("entry"), self.key("result", job.id),
                self.key("idem", job.idempotency_key or ""), *self._fair_keys[:3], self._fair_wake,
                self.key("job", job.id), self.key("owned", job.owner or "")]
        # A job submitted again was admitted once already: no depth or lag check the second time.
        depth, wait = (self.max_depth, ms(self.max_wait) if self.max_wait else 0) if admit else (2**62, 0)
        meta = json.dumps(JobState.of(job).meta()) if job.is_async else ""
        args = [job.id, json.dumps(job.to_dict()), depth, wait, idem_ttl, self.group, job.fingerprint or "",
                job.owner or "", job.weight, self._fair_lists, meta, ms(pending + ttl + 60.0), ms(ttl),
                job.webhook or "", job.created, MAX_OWNED]
        return self._submit(keys=keys, args=args)

    def holds(self, job_id: str) -> bool:
        return job_id in self._held

    async def resubmit(self, job_id: str) -> bool:
        """Submit a held job again under its id, after Redis lost it; one attempt (the follower retries)."""
        job = self._held.get(job_id)
        if job is None or job.expired():
            return False
        await self._submit_once(job, admit=False)
        self.resubmissions += 1
        log.warning("job %s vanished from Redis (a restart or failover); submitted it again", job_id)
        return True

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        job = self._held.get(job_id)
        follower = Follower(self, job_id, job.deadline if job else None)
        try:
            while not follower.done:
                for event in await follower.next_events():
                    yield event
        finally:
            follower.close()
            self._held.pop(job_id, None)

    async def cancel(self, job_id: str) -> None:
        await self._retry(lambda: self.redis.set(self.key("cancel", job_id), 1, px=ms(self.result_ttl)),
                          "cancelling a job")

    async def depth(self) -> int:
        return int(await self._retry(lambda: self.redis.xlen(self.stream), "reading the queue depth",
                                     fail_fast=True))

    async def ping(self) -> bool:
        if not self.breaker.allow():
            return False
        try:
            ok = bool(await asyncio.wait_for(self.redis.ping(), self.socket_timeout))
        except (*DOWN, redis_errors.RedisError):
            self.breaker.failure()
            return False
        self.breaker.success()
        return ok

    async def live_workers(self, max_age: float) -> set[str]:
        ids = await self._retry(lambda: self._live(keys=[self.key("workers")], args=[max_age]),
                                "reading heartbeats", fail_fast=True)
        return set(ids)

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

    async def end(self, job_id: str, event: dict[str, Any]) -> bool:
        idem = await self._retry(lambda: self.redis.hget(self.key("job", job_id), "idem"), "ending a job")
        await self.cancel(job_id)
        key = idem.removeprefix(self.key("idem", "")) if idem else None
        return await self._store_terminal(job_id, event, "", idempotency_key=key)

    # --- async jobs (server.queue.redis.records) ---------------------------------------------------

    async def job_state(self, job_id: str) -> JobState | None:
        return await self.records.state(job_id)

    async def job_states(self, owner: str, limit: int, status: str | None = None) -> list[JobState]:
        return await self.records.states(owner, limit, status)

    async def take_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        return await self.records.take_deliveries(limit, lease)

    async def delivery_done(self, job_id: str) -> None:
        await self.records.delivery_done(job_id)

    async def delivery_retry(self, job_id: str, delay: float) -> None:
        await self.records.delivery_retry(job_id, delay)

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
            raise ValueError("publish takes delta/progress/preview events; use finish for the result or error")
        claim = self._claims.get(job_id)
        run, seq = (claim.run, claim.seq) if claim else ("0", 0)
        if claim:
            claim.seq += 1
        fields = {"e": json.dumps(event), "r": run, "s": seq}
        ttl = max(self.result_ttl, claim.ttl or 0.0) if claim else self.result_ttl
        if event.get("type") == "preview":  # listed, so the job's end deletes it
            keys = [self.key("events", job_id), self.key("previews", job_id), self.key("result", job_id)]
            args = [fields["e"], run, seq, ms(ttl)]
            await self._retry(lambda: self._publish_preview(keys=keys, args=args), "publishing a preview")
            return
        await self._retry(lambda: self._publish(self.key("events", job_id), fields, ttl), "publishing an event")

    async def finish(self, job_id: str, event: dict[str, Any]) -> None:
        if not is_terminal(event):
            raise ValueError(f"finish needs a result or error event, got type {event.get('type')!r}")
        claim = self._claims.pop(job_id, None)
        await self._store_terminal(job_id, event, claim.entry_id if claim else "",
                                   idempotency_key=claim.idempotency_key if claim else None)

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
        args = [worker_id, json.dumps(info or {}), ms(_FORGET_WORKER_AFTER), _FORGET_WORKER_AFTER]
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
            idle = ms(self.claim_idle_timeout + 1.0)
            await self._retry(lambda: self.redis.xclaim(self.stream, self.group, worker_id, 0, entries,
                                                        idle=idle, justid=True), "releasing jobs")
        return True

    async def close(self) -> None:
        await self.hub.close()
        await self.redis.aclose()

    # --- internals -----------------------------------------------------------------------------

    async def _retry(self, call: Callable[[], Awaitable[T]], doing: str, *, fail_fast: bool = False) -> T:
        """Run `call`, retrying with backoff while Redis is unreachable, for `reconnect_timeout` s.

        `fail_fast` (a new request, a probe): while the breaker is open, raise at once, and stop
        retrying as soon as it opens (Redis failing for `open_after` s with no success in between),
        so a client learns of an outage in well under a second, while a busy but working Redis (a
        timeout here and there, other calls succeeding) still gets the full retry time.
        """
        if fail_fast and not self.breaker.allow():
            raise QueueUnavailable(f"Redis is unreachable ({doing}; down for {self.breaker.down_for():.1f}s)",
                                   retry_after=self.retry_after)
        give_up = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                result = await call()
            except DOWN as exc:
                problem = config_problem(exc)
                if problem is not None:  # a wrong password or certificate: retrying will not help
                    raise QueueMisconfigured(problem) from exc
                busy = pool_exhausted(exc)  # our own pool is busy, Redis is not down
                if not busy:
                    self.breaker.failure()
                if time.monotonic() + delay > give_up or (fail_fast and self.breaker.is_open):
                    if busy:
                        message = (f"this server's {self.max_connections} connections to Redis stayed busy "
                                   f"for {self.reconnect_timeout:.0f}s ({doing}); Redis itself is reachable "
                                   "(more connections: JANUS_QUEUE_MAX_CONNECTIONS)")
                    else:
                        message = f"Redis is unreachable ({doing}): {describe(exc)}"
                    raise QueueUnavailable(message, retry_after=self.retry_after) from exc
            else:
                self.breaker.success()
                return result
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1 if fail_fast else 1.0)  # fail_fast: notice the breaker opening soon

    async def _publish(self, key: str, fields: dict[str, Any], ttl: float) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(key, fields)
            pipe.pexpire(key, ms(ttl))
            await pipe.execute()

    async def _store_terminal(self, job_id: str, event: dict[str, Any], entry_hint: str,
                              dead_reason: str = "", job_json: str = "", idempotency_key: str | None = None) -> bool:
        keys = [self.stream, self.key("entry"), self.key("result", job_id), self.key("events", job_id),
                self.dead_stream, self.key("idem", idempotency_key or ""), self.key("job", job_id),
                self.key("hooks"), self.key("previews", job_id)]
        release = "1" if idempotency_key and event.get("type") == "error" else ""
        args = [self.group, job_id, json.dumps(event), ms(self.result_ttl), entry_hint, dead_reason,
                job_json, self.dead_maxlen, release, terminal_status(event)]
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
            found = await self._take_from_dead(worker_id, max_jobs)
            if len(found) < max_jobs:
                found += await self._reclaim_idle(worker_id, max_jobs - len(found))
            if len(found) < max_jobs:
                block = None if found else self._block_ms(give_up)
                found += await self._read_new(worker_id, max_jobs - len(found), block)
            return found
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            self._group_ready = False  # Redis restarted empty: make the group again on the next try
            return []

    def _block_ms(self, give_up: float) -> int | None:
        remaining = min(give_up - time.monotonic(), self.poll_interval)
        return ms(remaining) if remaining > 0 else None  # never BLOCK 0: that waits forever

    async def _take_from_dead(self, worker_id: str, count: int) -> list[_Delivery]:
        """Jobs of workers whose heartbeat stopped: taken over now, not after the idle timeout."""
        taken = await self._reclaim_dead(keys=[self.stream, self.key("workers")],
                                         args=[self.group, worker_id, ms(self.dead_worker_timeout), count])
        found = _deliveries(taken)
        if found:
            log.warning("took over %d job(s) from a worker whose heartbeat stopped", len(found))
        return found

    async def _reclaim_idle(self, worker_id: str, count: int) -> list[_Delivery]:
        """Entries another consumer has left idle for `claim_idle_timeout` (XAUTOCLAIM, but never the waiting
        jobs the holding consumer keeps for fair dispatch)."""
        cursor, taken = await self._reclaim_idle_script(
            keys=[self.stream], args=[self.group, worker_id, ms(self.claim_idle_timeout), self._autoclaim_cursor,
                                      count])
        self._autoclaim_cursor = cursor
        return _deliveries(taken)

    async def _read_new(self, worker_id: str, count: int, block: int | None) -> list[_Delivery]:
        """Waiting jobs in fair order across owners; entries no fair submit queued (a frontend of an earlier
        version) in stream order. With nothing waiting, waits up to `block` ms for a submit's wake-up."""
        for attempt in range(2):
            taken = _deliveries(await self._take_fair(keys=[self.stream, *self._fair_keys, self._fair_wake],
                                                      args=[self.group, worker_id, count, self._fair_lists]))
            if taken:
                return taken
            reply = await self.redis.xreadgroup(self.group, worker_id, {self.stream: ">"}, count=count)
            strays = [_Delivery(entry_id, fields, 1) for _, entries in reply or [] for entry_id, fields in entries]
            if strays or block is None or attempt:
                return strays
            await self.redis.blpop([self._fair_wake], timeout=block / 1000)
        return []

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
            run = f"{worker_id}/{delivery.deliveries}/{uuid.uuid4().hex[:8]}"
            self._claims[job.id] = _Claim(worker_id, delivery.entry_id, run, job.idempotency_key, ttl=job.ttl)
            jobs.append(job)
        await self.records.mark_started([job for job in jobs if job.is_async])
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
                                   delivery.fields.get("job", "") if dead_reason else "",
                                   job.idempotency_key if job is not None else None)

    def _hold(self, job: Job) -> None:
        if len(self._held) > 4096:  # followers normally drop these; drop the long-expired rest
            cutoff = time.time() - 60.0
            self._held = {k: v for k, v in self._held.items() if v.deadline > cutoff}
        self._held[job.id] = job


def _deliveries(taken: list[Any]) -> list[_Delivery]:
    """A script's {{entry id, {field, value, ...}, times delivered}, ...} as deliveries (an entry deleted meanwhile
    comes back without fields: left out)."""
    return [_Delivery(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)), int(delivered))
            for entry_id, flat, delivered in taken if flat]


def _decode_job(fields: dict[str, str]) -> Job | None:
    try:
        return Job.from_dict(json.loads(fields["job"]))
    except (KeyError, TypeError, ValueError):
        return None
