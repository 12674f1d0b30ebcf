"""RedisQueue against a real redis-server: delivery, reclaim, dead letters, admission, restarts."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio

from server.jobs import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    UNAVAILABLE,
    GenerateParams,
    Job,
    UnderstandParams,
    delta_event,
    error_event,
    generate_result,
    is_terminal,
    preview_event,
    progress_event,
    result_images,
    understand_result,
)
from server.queue import IdempotencyConflict, QueueFull, QueueUnavailable, create_queue
from server.queue.memory import MemoryQueue
from server.queue.redis.queue import RedisQueue
from tests.support import redis_fixture

pytestmark = pytest.mark.timeout(30)

redis_server = redis_fixture.redis_server

MakeQueue = Callable[..., RedisQueue]


@pytest.fixture
async def make_queue(redis_server: redis_fixture.RedisServer) -> AsyncIterator[MakeQueue]:
    """Queues (one per simulated process) that share a fresh key prefix, with test-sized timeouts."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    made: list[RedisQueue] = []

    def make(**options: Any) -> RedisQueue:
        # A silent worker's jobs move after 1 s; the idle-time backstop is far enough off (5 s) that a
        # loaded machine's pauses between a live worker's heartbeats never reach it.
        settings = {"prefix": prefix, "claim_idle_timeout": 5.0, "dead_worker_timeout": 1.0,
                    "poll_interval": 0.2, "reconnect_timeout": 2.0, "lost_grace": 1.0, **options}
        queue = RedisQueue(redis_server.url, **settings)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.close()


def understand_job(prompt: str = "describe", *, timeout: float = 30.0, **fields: Any) -> Job:
    params = UnderstandParams(prompt, images=[b"\x89PNG\r\n\x1a\n not really"])
    return Job("understand", params, deadline=time.time() + timeout, **fields)


async def collect(queue: RedisQueue, job_id: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        return [event async for event in queue.events(job_id)]

    return await asyncio.wait_for(read(), timeout)


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta")


async def test_create_queue_dispatches_with_options(redis_server: redis_fixture.RedisServer) -> None:
    queue = create_queue(redis_server.url, max_depth=7, max_queue_depth=1, prefix="x:")
    assert isinstance(queue, RedisQueue)
    assert (queue.max_depth, queue.stream, queue.group, queue.dead_stream) == (7, "x:jobs", "janus-workers",
                                                                              "x:dead")
    assert await queue.ping()
    await queue.close()


async def test_round_trip_streams_events_and_stores_the_result(make_queue: MakeQueue) -> None:
    frontend, worker = make_queue(), make_queue()
    job = understand_job(stream=True)
    assert await frontend.submit(job) == job.id
    assert await frontend.depth() == 1
    reader = asyncio.create_task(collect(frontend, job.id))

    [claimed] = await worker.claim("w1", 4, 1.0)
    assert (claimed.id, claimed.params, claimed.deadline) == (job.id, job.params, job.deadline)
    await worker.publish(job.id, delta_event("Hel"))
    await worker.publish(job.id, delta_event("lo"))
    with pytest.raises(ValueError, match="result or error"):
        await worker.finish(job.id, delta_event("!"))
    with pytest.raises(ValueError, match="use finish"):
        await worker.publish(job.id, understand_result("Hello", "stop", 3, 2))
    await worker.finish(job.id, understand_result("Hello", "stop", 3, 2))

    events = await reader
    assert [e["type"] for e in events] == ["delta", "delta", "result"]
    assert text_of(events) == events[-1]["text"] == "Hello"
    assert await frontend.depth() == 0
    # A follower that starts after the result was stored still sees every event.
    assert await collect(frontend, job.id) == events

    gen = Job("generate", GenerateParams("a cat", n=2, seed=7))
    await frontend.submit(gen)
    [claimed] = await worker.claim("w1", 4, 1.0)
    assert claimed.params == gen.params
    for step in (1, 2):
        await worker.publish(gen.id, progress_event(step, 2))
    await worker.finish(gen.id, generate_result(7, [b"png-a", b"png-b"]))
    events = await collect(frontend, gen.id)
    assert [e.get("step") for e in events[:-1]] == [1, 2]
    assert result_images(events[-1]) == [b"png-a", b"png-b"]


async def test_two_consumers_share_jobs_without_duplicates(make_queue: MakeQueue) -> None:
    frontend, workers = make_queue(), {"a": make_queue(), "b": make_queue()}
    jobs = [understand_job(f"prompt {i}") for i in range(60)]
    for job in jobs:
        await frontend.submit(job)
    readers = [asyncio.create_task(collect(frontend, job.id)) for job in jobs]
    claimed: dict[str, list[str]] = {"a": [], "b": []}
    batch_sizes: list[int] = []

    async def work(name: str) -> None:
        queue = workers[name]
        while sum(len(ids) for ids in claimed.values()) < len(jobs):
            batch = await queue.claim(name, 8, 0.2)
            batch_sizes.append(len(batch))
            claimed[name] += [job.id for job in batch]
            await asyncio.sleep(0.01)  # "running" the batch lets the other worker in
            for job in batch:
                await queue.finish(job.id, understand_result(f"{name}:{job.id}", "stop", 1, 1))

    await asyncio.gather(work("a"), work("b"))
    assert not set(claimed["a"]) & set(claimed["b"])
    assert sorted(claimed["a"] + claimed["b"]) == sorted(job.id for job in jobs)
    assert claimed["a"] and claimed["b"] and max(batch_sizes) > 1
    for job, events in zip(jobs, await asyncio.gather(*readers), strict=True):
        assert [e["type"] for e in events] == ["result"]
        assert events[0]["text"].endswith(job.id)
    assert await frontend.depth() == 0


async def claim_within(queue: RedisQueue, worker_id: str, count: int, timeout: float) -> list[Job]:
    """Claims by `worker_id` until `count` jobs came back or `timeout` passed (polling, for loaded machines)."""
    jobs: list[Job] = []
    give_up = time.monotonic() + timeout
    while len(jobs) < count and time.monotonic() < give_up:
        jobs += await queue.claim(worker_id, count - len(jobs), 0.2)
    return jobs


async def consumers(queue: RedisQueue) -> set[str]:
    return {c["name"] for c in await queue.redis.xinfo_consumers(queue.stream, queue.group)}


async def test_jobs_of_a_dead_worker_are_reclaimed_with_one_result_each(make_queue: MakeQueue) -> None:
    frontend, dead, live = make_queue(), make_queue(), make_queue()
    jobs = [understand_job(f"prompt {i}", stream=True) for i in range(3)]
    for job in jobs:
        await frontend.submit(job)
    readers = [asyncio.create_task(collect(frontend, job.id)) for job in jobs]

    await dead.heartbeat("dead")
    assert len(await dead.claim("dead", 8, 1.0)) == 3
    await dead.publish(jobs[0].id, delta_event("Hel"))  # then it "dies": no ack, no more heartbeats
    died = time.monotonic()
    assert await live.claim("live", 8, 0.1) == []  # its heartbeat is fresh: its jobs stay put
    again = await claim_within(live, "live", 3, 10.0)
    waited = time.monotonic() - died
    assert sorted(job.id for job in again) == sorted(job.id for job in jobs)
    # Taken over once the heartbeat was 1 s old, not after the 5 s idle backstop.
    assert 0.9 <= waited < live.claim_idle_timeout, waited
    assert live.redeliveries == 3
    assert "dead" not in await consumers(frontend)  # it held nothing more, so it left the group
    await live.publish(jobs[0].id, delta_event("Hel"))  # the new run starts the text over
    await live.publish(jobs[0].id, delta_event("lo"))
    for job in again:
        await live.finish(job.id, understand_result(f"live:{job.id}", "stop", 1, 2))

    # The presumed-dead worker wakes up: its job reads as cancelled and its late result is ignored.
    assert await dead.is_cancelled(jobs[1].id)
    await dead.finish(jobs[1].id, understand_result("zombie", "stop", 1, 1))

    results = await asyncio.gather(*readers)
    assert text_of(results[0]) == "Hello"
    for job, events in zip(jobs, results, strict=True):
        assert sum(is_terminal(e) for e in events) == 1
        assert events[-1]["text"] == f"live:{job.id}"
    raw = await frontend.redis.xrange(frontend.key("events", jobs[1].id))
    assert len(raw) == 1  # exactly one terminal event was ever written
    assert await frontend.depth() == 0


async def test_a_worker_that_never_heartbeats_is_reclaimed_by_the_idle_backstop(make_queue: MakeQueue) -> None:
    frontend = make_queue()
    silent, live = make_queue(claim_idle_timeout=1.5), make_queue(claim_idle_timeout=1.5)
    job = understand_job()
    await frontend.submit(job)
    [claimed] = await silent.claim("silent", 1, 1.0)
    assert [j.id for j in await claim_within(live, "live", 1, 10.0)] == [claimed.id]
    assert live.redeliveries == 1


async def test_heartbeats_keep_a_live_workers_jobs_and_report_workers(make_queue: MakeQueue) -> None:
    frontend, busy, idle = make_queue(), make_queue(), make_queue()
    assert not await frontend.workers_alive(5.0)
    job = understand_job()
    await frontend.submit(job)
    assert len(await busy.claim("busy", 1, 1.0)) == 1
    started = time.monotonic()
    # A long-running job outlives both the dead-worker timeout (1 s) and the idle backstop (5 s)
    # while heartbeats continue.
    while time.monotonic() - started < 6.0:
        await busy.heartbeat("busy", {"model": "tiny", "device": "cpu"})
        assert await idle.claim("idle", 1, 0.0) == []
        await asyncio.sleep(0.2)
    assert await frontend.live_workers(5.0) == {"busy"}
    info = (await frontend.workers())["busy"]
    assert info["model"] == "tiny" and abs(info["last_seen"] - time.time()) < 5.0
    # Heartbeats stop (the worker is stuck or dead): it reads as gone, and its job moves on.
    assert [j.id for j in await claim_within(idle, "idle", 1, 10.0)] == [job.id]
    assert not await frontend.workers_alive(1.0)


async def test_poison_job_goes_to_the_dead_letter_stream(make_queue: MakeQueue) -> None:
    queue = make_queue(max_deliveries=2)
    poison, good = understand_job("poison"), understand_job("fine")
    await queue.submit(poison)
    await queue.submit(good)
    reader = asyncio.create_task(collect(queue, poison.id))
    for _ in range(2):  # fails every time; the worker hands it back for another try
        [job] = await queue.claim("w", 1, 1.0)
        assert job.id == poison.id
        await queue.release("w", [job.id])

    assert [job.id for job in await queue.claim("w", 1, 1.0)] == [good.id]
    await queue.finish(good.id, understand_result("ok", "stop", 1, 1))
    [event] = await reader
    assert event["type"] == "error" and event["code"] == INTERNAL and "failed 2 times" in event["message"]
    [(_, letter)] = await queue.redis.xrange(queue.dead_stream)
    assert letter["id"] == poison.id and Job.from_dict(json.loads(letter["job"])).id == poison.id
    assert (queue.dead_letters, queue.redeliveries) == (1, 1)
    assert (await collect(queue, good.id))[-1]["text"] == "ok"
    assert await queue.depth() == 0


async def test_unreadable_entry_is_dead_lettered_and_answered(make_queue: MakeQueue) -> None:
    queue = make_queue()
    await queue.redis.xadd(queue.stream, {"id": "garbled", "job": "{not json"})
    good = understand_job()
    await queue.submit(good)
    assert [job.id for job in await queue.claim("w", 4, 1.0)] == [good.id]
    [event] = await collect(queue, "garbled")
    assert event["code"] == INTERNAL
    [(_, letter)] = await queue.redis.xrange(queue.dead_stream)
    assert (letter["id"], letter["reason"]) == ("garbled", "unreadable job entry")
    assert await queue.depth() == 1  # only the good job, still running


async def test_admission_control_refuses_when_full_or_lagging(make_queue: MakeQueue) -> None:
    queue = make_queue(max_depth=3, retry_after=4.0)
    for _ in range(3):
        await queue.submit(understand_job())
    with pytest.raises(QueueFull) as refused:
        await queue.submit(understand_job())
    assert refused.value.retry_after == 4.0
    [running] = await queue.claim("w", 1, 1.0)
    with pytest.raises(QueueFull):  # a running job still counts
        await queue.submit(understand_job())
    await queue.finish(running.id, understand_result("", "stop", 0, 0))
    await queue.submit(understand_job())

    lagging = make_queue(prefix=f"lag-{uuid.uuid4().hex[:8]}:", max_wait=0.3)
    first = understand_job()
    await lagging.submit(first)
    await asyncio.sleep(0.4)
    with pytest.raises(QueueFull, match="lagging"):
        await lagging.submit(understand_job())
    assert [job.id for job in await lagging.claim("w", 1, 1.0)] == [first.id]
    await lagging.submit(understand_job())  # nothing has waited long any more


async def test_expired_jobs_are_answered_and_never_claimed(make_queue: MakeQueue) -> None:
    queue = make_queue()
    job = understand_job(timeout=0.2)
    await queue.submit(job)
    await asyncio.sleep(0.3)
    assert await queue.claim("w", 4, 0.3) == []
    [event] = await collect(queue, job.id)
    assert event["code"] == DEADLINE_EXCEEDED
    assert (await queue.depth(), queue.expired) == (0, 1)

    # With no worker at all, a follower still ends at the deadline instead of waiting forever.
    orphan = understand_job(timeout=0.3)
    await queue.submit(orphan)
    started = time.monotonic()
    [event] = await collect(queue, orphan.id)
    assert event["code"] == DEADLINE_EXCEEDED and time.monotonic() - started < 1.5


async def test_cancel_sets_a_flag_and_a_queued_job_does_not_run(make_queue: MakeQueue) -> None:
    queue = make_queue()
    kept, cancelled = understand_job(), understand_job()
    await queue.submit(kept)
    await queue.submit(cancelled)
    assert not await queue.is_cancelled(cancelled.id)
    await queue.cancel(cancelled.id)
    assert await queue.is_cancelled(cancelled.id)
    assert await queue.cancelled([kept.id, cancelled.id]) == {cancelled.id}
    assert [job.id for job in await queue.claim("w", 4, 0.5)] == [kept.id]
    [event] = await collect(queue, cancelled.id)
    assert event["code"] == CANCELLED


async def test_idempotency_key_returns_the_first_job(make_queue: MakeQueue) -> None:
    queue = make_queue()
    first, repeat, other = (understand_job(idempotency_key=k) for k in ("k1", "k1", "k2"))
    assert await queue.submit(first) == first.id
    assert await queue.submit(repeat) == first.id
    assert await queue.submit(other) == other.id
    assert await queue.depth() == 2
    [job, _] = await queue.claim("w", 2, 1.0)
    await queue.finish(job.id, understand_result("once", "stop", 1, 1))
    assert await queue.submit(understand_job(idempotency_key="k1")) == first.id  # also after it finished


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_idempotency_key_is_bound_to_its_request_and_released_by_a_failure(make_queue: MakeQueue,
                                                                                 backend: str) -> None:
    queue = MemoryQueue() if backend == "memory" else make_queue()
    first = understand_job(idempotency_key="k", fingerprint="body-a")
    assert await queue.submit(first) == first.id
    assert await queue.submit(understand_job(idempotency_key="k", fingerprint="body-a")) == first.id
    with pytest.raises(IdempotencyConflict) as conflict:  # the same key for another request
        await queue.submit(understand_job(idempotency_key="k", fingerprint="body-b"))
    assert conflict.value.job_id == first.id
    assert await queue.depth() == 1
    [job] = await queue.claim("w", 1, 1.0)
    await queue.finish(job.id, error_event(INVALID_ARGUMENT, "refused"))
    retry = understand_job(idempotency_key="k", fingerprint="body-a")
    assert await queue.submit(retry) == retry.id  # nothing was produced: the retry runs
    [job] = await queue.claim("w", 1, 1.0)
    await queue.finish(job.id, understand_result("once", "stop", 1, 1))
    assert await queue.submit(understand_job(idempotency_key="k", fingerprint="body-a")) == retry.id


async def test_survives_a_redis_crash_and_restart(make_queue: MakeQueue,
                                                  redis_server: redis_fixture.RedisServer) -> None:
    frontend, other_frontend, worker = make_queue(), make_queue(lost_grace=0.5), make_queue()
    assert await worker.claim("w", 1, 0.0) == []  # the consumer group exists before the crash
    job = understand_job(timeout=20.0)
    await frontend.submit(job)
    reader = asyncio.create_task(collect(frontend, job.id, timeout=20.0))
    # Another frontend following the same job cannot submit it again (it never had the payload).
    onlooker = asyncio.create_task(collect(other_frontend, job.id, timeout=20.0))

    # 1. Redis is down: new work is refused at once (the breaker remembers), nothing hangs, and the
    #    follower of a job this frontend holds keeps waiting for Redis instead of giving up.
    redis_server.kill()
    assert not await frontend.ping()
    started = time.monotonic()
    with pytest.raises(QueueUnavailable):
        await frontend.submit(understand_job())
    first_refusal = time.monotonic() - started
    started = time.monotonic()
    with pytest.raises(QueueUnavailable) as refused:
        await frontend.submit(understand_job())
    # "At once": well under the ~9 s a request took to fail before the breaker (0.5 s: a loaded CI machine).
    assert first_refusal < 1.0 and time.monotonic() - started < 0.5, first_refusal
    assert refused.value.retry_after > 0
    with pytest.raises(QueueUnavailable):
        await worker.claim("w", 1, 0.1)
    await asyncio.sleep(2.5)  # longer than reconnect_timeout
    assert not reader.done()

    # 2. Redis comes back empty: the job is submitted again under its id and answered once.
    redis_server.start()
    [claimed] = await claim_within(worker, "w", 1, 10.0)  # the consumer group is made again
    assert claimed.id == job.id and claimed.params == job.params
    await worker.finish(claimed.id, understand_result("back", "stop", 1, 1))
    events = await reader
    assert [e["type"] for e in events] == ["result"] and events[0]["text"] == "back"
    assert frontend.resubmissions == 1
    onlooker_events = await onlooker
    assert onlooker_events[-1]["type"] == "result" or onlooker_events[-1]["code"] == UNAVAILABLE

    # 3. A job nobody here holds, lost in a restart: its follower is told so instead of waiting.
    lost = understand_job(timeout=20.0)
    await other_frontend.submit(lost)
    lost_reader = asyncio.create_task(collect(frontend, lost.id))
    await asyncio.sleep(0.3)
    redis_server.restart()
    started = time.monotonic()
    [event] = await lost_reader
    assert event["code"] == UNAVAILABLE and time.monotonic() - started < 5.0
    await other_frontend.cancel(lost.id)


async def test_raw_client_sees_the_documented_key_layout(make_queue: MakeQueue,
                                                         redis_server: redis_fixture.RedisServer) -> None:
    queue = make_queue(prefix="janus-layout:")
    job = understand_job()
    await queue.submit(job)
    await queue.claim("w", 1, 1.0)
    raw = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        [group] = await raw.xinfo_groups("janus-layout:jobs")
        assert (group["name"], group["pending"]) == ("janus-workers", 1)
        assert await raw.hget("janus-layout:entry", job.id)
    finally:
        await raw.aclose()


async def test_waiting_jobs_leave_in_turns_across_owners_and_frontends(make_queue: MakeQueue) -> None:
    """Two owners flood through two frontends; a third owner's one job is taken within one turn of each, not
    behind the floods. Weights share the turns; each owner's own jobs keep their order."""
    front_a, front_b, worker = make_queue(), make_queue(), make_queue()
    floods = {"key:a": [], "key:b": []}
    for i in range(20):
        for owner, frontend in (("key:a", front_a), ("key:b", front_b)):
            job = understand_job(f"{owner} {i}", owner=owner)
            floods[owner].append(job.id)
            await frontend.submit(job)
    first = [job.id for job in await worker.claim("w", 3, 1.0)]
    assert first == [floods["key:a"][0], floods["key:b"][0], floods["key:a"][1]]
    lone = understand_job("just one", owner="key:c")
    await front_b.submit(lone)
    after = [job.id for job in await worker.claim("w", 3, 1.0)]
    assert after == [floods["key:b"][1], floods["key:a"][2], lone.id]

    heavy = make_queue(prefix=f"weights-{uuid.uuid4().hex[:8]}:")
    owners = {"key:heavy": 2.0, "key:plain": 1.0}
    for i in range(6):
        for owner, weight in owners.items():
            await heavy.submit(understand_job(f"{owner} {i}", owner=owner, weight=weight))
    taken = [job.owner for job in await heavy.claim("w", 9, 1.0)]
    assert taken.count("key:heavy") == 6 and taken.count("key:plain") == 3


async def test_a_worker_waiting_for_work_wakes_on_a_submit(make_queue: MakeQueue) -> None:
    frontend, worker = make_queue(), make_queue(poll_interval=4.0)
    waiting = asyncio.create_task(worker.claim("w", 1, 4.0))
    await asyncio.sleep(0.3)  # the worker is blocked waiting
    job = understand_job()
    started = time.monotonic()
    await frontend.submit(job)
    [claimed] = await waiting
    assert claimed.id == job.id and time.monotonic() - started < 2.0
    for _ in range(5):
        await frontend.submit(understand_job())
    assert len(await worker.claim("w", 8, 1.0)) == 5
    assert await worker.redis.llen(worker.key("fair", "wake")) == 0  # no tokens left for jobs already taken


async def test_a_second_follower_of_a_running_job_still_sees_it_from_the_start(make_queue: MakeQueue) -> None:
    """Two followers of one job in one process (a client re-attaching while the first still follows): the one
    that comes while the hub's read is in flight from further on must still get every event."""
    frontend, worker = make_queue(), make_queue()
    job = Job("generate", GenerateParams("a cat", seed=1), stream=True)
    await frontend.submit(job)
    await worker.claim("w1", 1, 1.0)
    first = frontend.events(job.id).__aiter__()
    for step in (1, 2, 3):
        await worker.publish(job.id, progress_event(step, 9))
    assert [(await first.__anext__())["step"] for _ in range(3)] == [1, 2, 3]
    pending_read = asyncio.ensure_future(first.__anext__())  # the hub now reads after step 3
    await asyncio.sleep(0.05)
    second = asyncio.create_task(collect(frontend, job.id))
    await asyncio.sleep(0.05)
    for step in (4, 5):
        await worker.publish(job.id, progress_event(step, 9))
    await worker.finish(job.id, generate_result(1, [b"png"]))
    assert (await pending_read)["step"] == 4
    events = await second
    assert [e.get("step") for e in events[:-1]] == [1, 2, 3, 4, 5]
    await first.aclose()


async def test_async_job_records_positions_listing_cancel_and_deliveries(make_queue: MakeQueue) -> None:
    frontend, worker = make_queue(), make_queue()
    jobs = [Job("generate", GenerateParams(f"p{i}", seed=i), owner="key:a", surface="generate", ttl=60.0,
                webhook="https://hooks.example/x" if i == 0 else None) for i in range(3)]
    sync = Job("generate", GenerateParams("sync"), owner="key:a")
    for job in [*jobs, sync]:
        await frontend.submit(job)
    assert await frontend.job_state(sync.id) is None  # only async jobs have a record
    states = [await frontend.job_state(job.id) for job in jobs]
    assert [(s.state, s.position) for s in states] == [("queued", 0), ("queued", 1), ("queued", 2)]
    assert [s.id for s in await frontend.job_states("key:a", 10)] == [j.id for j in reversed(jobs)]
    assert await frontend.job_states("key:b", 10) == []

    [claimed] = await worker.claim("w1", 1, 1.0)
    assert claimed.id == jobs[0].id and claimed.is_async and claimed.webhook == "https://hooks.example/x"
    await worker.publish(claimed.id, progress_event(2, 9))
    running = await frontend.job_state(claimed.id)
    assert (running.state, running.progress, running.position) == ("running", {"step": 2, "total": 9}, None)
    assert (await frontend.job_state(jobs[1].id)).position == 0

    assert await frontend.end(jobs[2].id, error_event(CANCELLED, "cancelled"))
    assert not await frontend.end(jobs[2].id, error_event(CANCELLED, "cancelled"))  # already ended
    assert (await frontend.job_state(jobs[2].id)).state == "cancelled"
    assert [j.id for j in await worker.claim("w1", 4, 0.3)] == [jobs[1].id, sync.id]  # not the cancelled one

    assert await frontend.take_deliveries(10, 30.0) == []
    await worker.finish(claimed.id, generate_result(0, [b"png"]))
    done = await frontend.job_state(claimed.id)
    assert done.state == "succeeded" and done.finished >= done.started
    [delivery] = await frontend.take_deliveries(10, 30.0)
    assert (delivery.job_id, delivery.url, delivery.attempt) == (claimed.id, "https://hooks.example/x", 1)
    assert await frontend.take_deliveries(10, 30.0) == []  # leased
    await frontend.delivery_retry(claimed.id, 0.0)
    [again] = await worker.take_deliveries(10, 30.0)  # any process takes it
    assert again.attempt == 2
    await worker.delivery_done(claimed.id)
    await frontend.delivery_retry(claimed.id, 0.0)  # a late retry does not bring a done delivery back
    assert await frontend.take_deliveries(10, 0.01) == []
    listed = await frontend.job_states("key:a", 10, "cancelled")
    assert [(s.id, s.terminal["code"]) for s in listed] == [(jobs[2].id, CANCELLED)]


async def test_an_async_jobs_record_result_and_key_expire_together(make_queue: MakeQueue,
                                                                   redis_server: redis_fixture.RedisServer) -> None:
    frontend, worker = make_queue(), make_queue()
    job = Job("generate", GenerateParams("a cat", seed=1), owner="key:a", surface="generate", ttl=0.5,
              idempotency_key="scoped-key", fingerprint="f1")
    await frontend.submit(job)
    [claimed] = await worker.claim("w1", 1, 1.0)
    await worker.finish(claimed.id, generate_result(1, [b"png"]))
    raw = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        ttls = [await raw.pttl(frontend.key(*parts)) for parts in
                (("job", job.id), ("result", job.id), ("events", job.id), ("idem", "scoped-key"))]
        assert all(0 < t <= 500 for t in ttls), ttls  # all at the job's TTL, the key's no longer its deadline's
    finally:
        await raw.aclose()
    while await frontend.job_state(job.id) is not None:
        await asyncio.sleep(0.05)
    retry = Job("generate", GenerateParams("a cat", seed=1), owner="key:a", surface="generate", ttl=0.5,
                idempotency_key="scoped-key", fingerprint="f1")
    assert await frontend.submit(retry) == retry.id  # a new run, not a job whose record is gone
    assert [s.id for s in await frontend.job_states("key:a", 10)] == [retry.id]  # the old one left the index


async def test_previews_of_every_run_go_when_the_job_ends(make_queue: MakeQueue) -> None:
    """A run handed back (or crashed, or cancelled mid-publish) leaves its previews listed in Redis itself, so
    the job's end deletes them whichever run sent them; a preview after the end is not added."""
    queue = make_queue()
    job = Job("generate", GenerateParams("a fox", previews=2), deadline=time.time() + 30, stream=True)
    await queue.submit(job)
    [first] = await queue.claim("w1", 1, 1.0)
    await queue.publish(job.id, preview_event(144, 576, 0, b"first run"))
    await queue.release("w1", [first.id])
    [second] = await queue.claim("w2", 1, 1.0)
    await queue.publish(job.id, progress_event(1, 576))
    await queue.publish(job.id, preview_event(288, 576, 0, b"second run"))
    live = [json.loads(fields["e"])["type"] for _, fields in await queue.redis.xrange(queue.key("events", job.id))]
    assert live.count("preview") == 2
    await queue.finish(second.id, generate_result(1, [b"png"]))
    await queue.publish(job.id, preview_event(432, 576, 0, b"too late"))
    kept = [fields for _, fields in await queue.redis.xrange(queue.key("events", job.id))]
    assert [json.loads(f["e"])["type"] for f in kept if "e" in f] == ["progress"] and "t" in kept[-1]
    assert not await queue.redis.exists(queue.key("previews", job.id))
    assert [e["type"] for e in await collect(queue, job.id)] == ["progress", "result"]
