"""Fair dispatch (server.queue.fair) and the in-process queue's bounds (server.queue.memory)."""

from __future__ import annotations

import asyncio

import pytest

from server.jobs import GenerateParams, Job, UnderstandParams, error_event, generate_result
from server.queue.fair import FairQueue
from server.queue.memory import MemoryQueue


def test_a_newcomer_waits_one_turn_not_behind_a_flood():
    queue: FairQueue[str] = FairQueue()
    for i in range(100):
        queue.push("flood-a", f"a{i}")
        queue.push("flood-b", f"b{i}")
    assert [queue.pop() for _ in range(3)] == ["a0", "b0", "a1"]
    queue.push("third", "c0")
    assert [queue.pop() for _ in range(3)] == ["b1", "a2", "c0"]
    assert len(queue) == 195


def test_weights_share_the_turns():
    queue: FairQueue[str] = FairQueue()
    for i in range(30):
        queue.push("heavy", f"h{i}", weight=2)
        queue.push("light", f"l{i}", weight=0.5)
        queue.push("plain", f"p{i}")
    first = [queue.pop() for _ in range(14)]
    counts = {name: sum(item.startswith(name[0]) for item in first) for name in ("heavy", "light", "plain")}
    assert counts == {"heavy": 8, "light": 2, "plain": 4}
    assert [i for i in first if i.startswith("h")] == [f"h{i}" for i in range(8)]  # each owner's order kept
    with pytest.raises(IndexError):
        FairQueue().pop()


def job(owner: str, images: int = 0) -> Job:
    return Job("understand", UnderstandParams("q", [b"x" * 1000] * images), owner=owner)


def test_memory_queue_claims_fairly():
    async def run():
        queue = MemoryQueue(max_depth=100)
        flood = [await queue.submit(job("key:a")) for _ in range(40)]
        lone = await queue.submit(job("key:b"))
        claimed = await queue.claim("w", 3, timeout=1)
        await queue.close()
        return flood, lone, [j.id for j in claimed]

    flood, lone, claimed = asyncio.run(run())
    assert claimed == [flood[0], lone, flood[1]]


def test_memory_queue_bounds_finished_results_in_count_bytes_and_time():
    async def run():
        queue = MemoryQueue(max_results=3, max_result_bytes=10_000, result_ttl=0.2)
        ids = []
        for i in range(5):
            j = job("o", images=2)
            ids.append(await queue.submit(j))
            await queue.finish(j.id, error_event("internal", "x") if i == 0 else
                               generate_result(0, [b"p" * 100]))
            assert j.params.images == []  # inputs dropped once finished
        kept_by_count = [i for i in ids if i in queue._entries]
        big = Job("generate", GenerateParams("p"), owner="o")
        await queue.submit(big)
        await queue.finish(big.id, generate_result(0, [b"p" * 9000]))
        kept_by_bytes = [i for i in ids if i in queue._entries]
        await asyncio.sleep(0.5)  # no submit: the timer alone expires the rest
        left = len(queue._entries)
        events = [e async for e in queue.events(ids[0])]
        await queue.close()
        return ids, kept_by_count, kept_by_bytes, left, events

    ids, kept_by_count, kept_by_bytes, left, events = asyncio.run(run())
    assert kept_by_count == ids[2:]
    assert len(kept_by_bytes) < len(kept_by_count)
    assert left == 0
    assert events[0]["type"] == "error" and "no longer kept" in events[0]["message"]
