"""One reader for the events of every job a process follows: `EventHub`, used by `RedisQueue.events`.

A follower used to hold a connection of its own in a blocking XREAD; a frontend following 250 jobs
then needed 250 connections, and a request failed when the pool had none left while Redis was fine.
The hub reads the events streams of all followed jobs with one blocking XREAD on one connection and
hands each follower the entries of its job (`Subscription.read`), so the connections a frontend uses
no longer grow with the requests it holds.

A follower that subscribes while the XREAD is blocked on the other keys wakes it: the XREAD also
reads a wake stream private to this hub (``{prefix}wake:{uuid}``), and a new subscription appends to
it. The hub reads the wake stream from the last entry it saw, so no wake-up is lost between two reads.
An error of the XREAD (Redis unreachable) is handed to every subscriber, which decides, as before,
whether to wait or give up; the hub retries with backoff while anyone is subscribed and stops reading
when no one is.

It knows Redis streams and asyncio, nothing about jobs or the queue's key layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque

from redis.asyncio import Redis

from server.queue.redis.errors import DOWN

Entry = tuple[str, dict[str, str]]  # (stream entry id, fields)


class Subscription:
    """The entries of one stream after `last_id`, as the hub reads them; `close` when done."""

    def __init__(self, hub: EventHub, key: str, last_id: str) -> None:
        self.hub, self.key, self.last_id = hub, key, last_id
        self._entries: deque[Entry] = deque()
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    async def read(self, timeout: float) -> list[Entry]:
        """The entries that arrived since the last read, waiting up to `timeout` s for the first; []
        if none came. Raises the error the hub's read met (e.g. Redis unreachable) since the last call."""
        if not self._entries and self._error is None:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        entries = list(self._entries)
        self._entries.clear()
        return entries

    def close(self) -> None:
        self.hub._unsubscribe(self)

    def _deliver(self, entries: list[Entry]) -> None:
        self._entries.extend(entries)
        self.last_id = entries[-1][0]
        self._ready.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()


class EventHub:
    """Reads the streams of all open subscriptions with one blocking XREAD at a time."""

    def __init__(self, redis: Redis, wake_key_prefix: str, *, block: float = 1.0, count: int = 256,
                 wake_ttl: float = 600.0) -> None:
        self.redis = redis
        self.block_ms = max(1, int(block * 1000))
        self.count = count
        self.wake_key = f"{wake_key_prefix}{uuid.uuid4().hex}"
        self.wake_ttl_ms = int(wake_ttl * 1000)
        self._wake_id = "0-0"  # the stream is this hub's own: everything in it is news
        self._subs: dict[str, list[Subscription]] = {}
        self._reading: frozenset[str] = frozenset()  # the streams the XREAD in flight waits on
        self._task: asyncio.Task[None] | None = None
        self._waking: asyncio.Task[None] | None = None
        self.reads = 0  # XREADs issued: for tests and benchmarks

    def subscribe(self, key: str, last_id: str = "0-0") -> Subscription:
        sub = Subscription(self, key, last_id)
        self._subs.setdefault(key, []).append(sub)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="janus-redis-events")
        elif self._reading and self._waking is None:
            # the XREAD in flight does not wait on this stream, or (a second follower of a job) reads it from
            # further on than this subscriber needs: wake it (between reads, the next one will)
            self._waking = asyncio.create_task(self._wake())
        return sub

    @property
    def followed(self) -> int:
        return sum(len(subs) for subs in self._subs.values())

    async def close(self) -> None:
        for task in (self._task, self._waking):
            if task is not None:
                task.cancel()
        self._task = self._waking = None

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._subs.pop(sub.key, None)

    async def _wake(self) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self.wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.pexpire(self.wake_key, self.wake_ttl_ms)
                await pipe.execute()
        except DOWN:
            pass  # the blocked read fails too, and its subscribers hear of it from there
        finally:
            self._waking = None

    async def _run(self) -> None:
        failures = 0
        try:
            while self._subs:
                # Each stream from the oldest position any of its subscribers needs.
                streams = {key: min((s.last_id for s in subs), key=_entry_order) for key, subs in self._subs.items()}
                self._reading = frozenset(streams)
                try:
                    self.reads += 1
                    reply = await self.redis.xread({self.wake_key: self._wake_id, **streams}, count=self.count,
                                                   block=self.block_ms)
                except Exception as exc:  # Redis unreachable, or refusing: each subscriber decides what it means
                    for subs in list(self._subs.values()):
                        for sub in subs:
                            sub._fail(exc)
                    failures += 1
                    await asyncio.sleep(min(0.05 * 2 ** (failures - 1), 1.0))
                    continue
                finally:
                    self._reading = frozenset()
                failures = 0
                for key, entries in reply or []:
                    if key == self.wake_key:
                        self._wake_id = entries[-1][0]
                        continue
                    start = _entry_order(streams.get(key, "0-0"))
                    for sub in list(self._subs.get(key, [])):
                        if _entry_order(sub.last_id) < start:  # it came during the read: the next one starts at it
                            continue
                        news = [e for e in entries if _entry_order(e[0]) > _entry_order(sub.last_id)]
                        if news:
                            sub._deliver(news)
        finally:
            self._task = None


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)

