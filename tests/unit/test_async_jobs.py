"""Async jobs without a model: the in-process queue's job records (position, progress, TTL, early drops, the
end of a job from the frontend, webhook deliveries and their leases), and an async job holding its key's
in-flight slot until it ends."""

from __future__ import annotations

import asyncio

import pytest

from server.jobs import CANCELLED, GenerateParams, Job, error_event, generate_result, progress_event
from server.keys import Key, LeaseHolder, RateLimited, current_key, current_lease
from server.queue.memory import MemoryQueue
from server.service import AsyncSpec, JobNotFound, Origin, Service
from server.settings import Settings


def async_job(i: int, owner: str = "key:a", **fields) -> Job:
    return Job("generate", GenerateParams(f"prompt {i}", seed=i), owner=owner, surface="generate", ttl=60.0,
               **fields)


async def test_records_positions_progress_and_the_end_from_the_frontend() -> None:
    queue = MemoryQueue()
    jobs = [async_job(i) for i in range(3)]
    sync = Job("generate", GenerateParams("sync"), owner="key:a")
    for job in [*jobs, sync]:
        await queue.submit(job)
    assert await queue.job_state(sync.id) is None
    assert [(s.state, s.position) for s in [await queue.job_state(j.id) for j in jobs]] == [
        ("queued", 0), ("queued", 1), ("queued", 2)]
    [claimed] = await queue.claim("w", 1, 0.1)
    await queue.publish(claimed.id, progress_event(3, 9))
    state = await queue.job_state(claimed.id)
    assert (state.state, state.progress, state.position) == ("running", {"step": 3, "total": 9}, None)
    assert (await queue.job_state(jobs[1].id)).position == 0

    assert await queue.end(jobs[1].id, error_event(CANCELLED, "cancelled"))
    assert not await queue.end(jobs[1].id, error_event(CANCELLED, "again"))
    assert (await queue.job_state(jobs[1].id)).state == "cancelled"
    assert [j.id for j in await queue.claim("w", 4, 0.1)] == [jobs[2].id, sync.id]  # never the cancelled one
    assert await queue.end(jobs[2].id, error_event(CANCELLED, "cancelled"))
    assert await queue.is_cancelled(jobs[2].id)  # the worker running it stops

    await queue.finish(claimed.id, generate_result(0, [b"png"]))
    listed = await queue.job_states("key:a", 10)
    assert [s.id for s in listed] == [j.id for j in reversed(jobs)]
    assert [s.state for s in listed] == ["cancelled", "cancelled", "succeeded"]
    assert listed[2].terminal is None  # a listing carries no results
    assert await queue.job_states("key:b", 10) == []
    assert [s.id for s in await queue.job_states("key:a", 10, "succeeded")] == [claimed.id]


async def test_results_expire_after_their_ttl_and_early_drops_are_remembered() -> None:
    queue = MemoryQueue(max_results=1)
    first, second = async_job(0), async_job(1)
    short = Job("generate", GenerateParams("x"), owner="key:a", surface="generate", ttl=0.05)
    for job in (first, second):
        await queue.submit(job)
        await queue.claim("w", 1, 0.1)
        await queue.finish(job.id, generate_result(0, [b"png"]))
    gone = await queue.job_state(first.id)
    assert gone is not None and gone.state == "succeeded" and "dropped early" in gone.gone
    assert (await queue.job_state(second.id)).gone is None
    await queue.submit(short)
    await queue.claim("w", 1, 0.1)
    await queue.finish(short.id, generate_result(0, [b"png"]))
    await asyncio.sleep(0.1)
    assert await queue.job_state(short.id) is None  # its TTL passed: unknown, not gone


async def test_deliveries_are_leased_until_done_or_retried() -> None:
    queue = MemoryQueue()
    job = async_job(0, webhook="https://hooks.example/x")
    await queue.submit(job)
    await queue.claim("w", 1, 0.1)
    assert await queue.take_deliveries(5, 30.0) == []  # not before the job ends
    await queue.finish(job.id, generate_result(0, [b"png"]))
    [delivery] = await queue.take_deliveries(5, 30.0)
    assert (delivery.job_id, delivery.url, delivery.attempt) == (job.id, "https://hooks.example/x", 1)
    assert await queue.take_deliveries(5, 30.0) == []  # leased
    await queue.delivery_retry(job.id, 0.0)
    [again] = await queue.take_deliveries(5, 0.0)
    assert again.attempt == 2
    [lapsed] = await queue.take_deliveries(5, 30.0)  # its lease (0 s) ran out: due again, as after a crash
    assert lapsed.attempt == 3
    await queue.delivery_done(job.id)
    await queue.delivery_retry(job.id, 0.0)
    assert await queue.take_deliveries(5, 30.0) == []


async def test_an_async_job_holds_its_keys_slot_until_it_ends() -> None:
    settings = Settings(api_key=["secret"])
    queue = MemoryQueue()
    service = Service(settings, queue)
    key = Key("team", b"", max_in_flight=1)
    current_key.set(key)
    holder = LeaseHolder(await service.quotas.enter(key))  # what the key guard takes for the POST
    current_lease.set(holder)
    spec = AsyncSpec("generate", {})
    ticket = await service.submit_generate(GenerateParams("a cat", seed=1), Origin("/v1/generate", key.caller),
                                           spec=spec)
    assert holder.lease is None  # the job took it
    await asyncio.sleep(0)
    assert service.quotas.in_flight("team") == 1
    with pytest.raises(RateLimited):
        await service.quotas.enter(key)
    assert (await service.job_state(ticket.job_id, key.caller)).state == "queued"
    with pytest.raises(JobNotFound):
        await service.job_state(ticket.job_id, "key:other")
    [job] = await queue.claim("w", 1, 0.1)
    await queue.finish(job.id, generate_result(1, [b"png"]))
    for _ in range(100):
        if service.quotas.in_flight("team") == 0:
            break
        await asyncio.sleep(0.01)
    assert service.quotas.in_flight("team") == 0
    cancelled = await service.cancel_job(ticket.job_id, key.caller)  # ended: left as it is
    assert cancelled.state == "succeeded"
    await service.close()


async def test_a_quiet_event_stream_sends_keepalives_until_the_job_ends(monkeypatch) -> None:
    from server.http import jobs as routes

    monkeypatch.setattr(routes, "KEEPALIVE", 0.01)
    queue = MemoryQueue()
    service = Service(Settings(), queue)
    job = async_job(0)
    await queue.submit(job)
    stream = routes._events(service, await queue.job_state(job.id), job.owner, 0)
    assert await stream.__anext__() == b": keepalive\n\n"  # queued: nothing to say yet, but the line stays open
    await stream.aclose()  # a client that hangs up while its read waits: closed cleanly
    stream = routes._events(service, await queue.job_state(job.id), job.owner, 0)
    [claimed] = await queue.claim("w", 1, 0.1)
    await queue.publish(claimed.id, progress_event(1, 2))
    while (chunk := await stream.__anext__()) == b": keepalive\n\n":
        pass
    assert chunk.startswith(b"id: 1\nevent: progress\n")
    await queue.finish(claimed.id, generate_result(0, [b"png"]))
    while (chunk := await stream.__anext__()) == b": keepalive\n\n":
        pass
    assert chunk.startswith(b"id: 2\nevent: job\n") and b'"status":"succeeded"' in chunk
    await stream.aclose()


async def test_an_ended_job_replays_its_events_long_after_its_deadline() -> None:
    from server.http import jobs as routes

    queue = MemoryQueue()
    service = Service(Settings(), queue)
    job = async_job(0, deadline=0.0)  # its deadline long past, as an hour after it ran
    await queue.submit(job)
    [claimed] = await queue.claim("w", 1, 0.1)
    await queue.publish(claimed.id, progress_event(1, 1))
    await queue.finish(claimed.id, generate_result(0, [b"png"]))
    state = await queue.job_state(job.id)
    chunks = [chunk async for chunk in routes._events(service, state, job.owner, 0)]
    assert [c.split(b"\n")[1] for c in chunks] == [b"event: progress", b"event: job"]
    again = [chunk async for chunk in routes._events(service, state, job.owner, 2)]
    assert again == [chunks[-1]]  # a client that had everything is told again that it ended
