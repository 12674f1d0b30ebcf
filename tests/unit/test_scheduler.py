"""Scheduler, KV manager and block pool unit tests: no model, no tensors; build sequences, feed fake
tokens, check the plans, the block tables and the counts."""

from __future__ import annotations

import pytest

from janus_core.engine.memory import image_blocks
from janus_core.sched.block_pool import BlockPool, chain_keys
from janus_core.sched.kv_manager import KVManager
from janus_core.sched.scheduler import Scheduler, Sequence, Status
from janus_core.step.lru import ByteLRU

EOS = 2
BS = 4  # small blocks keep the arithmetic readable


def understand(rid: str, prompt: int = 10, max_tokens: int = 4, keys: list[bytes] | None = None) -> Sequence:
    return Sequence(rid, "understand", prompt_tokens=prompt, max_steps=max_tokens, stop_token=EOS,
                    cache_keys=keys or [])


def generate(rid: str, n: int = 1, prompt: int = 10, steps: int = 3) -> Sequence:
    return Sequence(rid, "generate", prompt_tokens=prompt, max_steps=steps, width=n)


def make(blocks: int = 64, running: int = 8, budget: int = 1000, caching: bool = True) -> Scheduler:
    return Scheduler(KVManager(BlockPool(blocks, BS), prefix_caching=caching), max_running=running,
                     max_prefill_tokens=budget)


def ids(seqs: list[Sequence]) -> list[str]:
    return [s.request_id for s in seqs]


def free(sched: Scheduler) -> int:
    return sched.kv.pool.num_free


def test_generation_takes_all_its_blocks_and_shares_the_prompt_between_images():
    sched = make(blocks=64)
    seq = generate("g", n=3, prompt=10, steps=8)  # rows of 10 + 8 - 1 = 17 positions = 5 blocks
    sched.add(seq)
    plan = sched.schedule()
    assert ids(plan.prefill) == ["g"] and plan.decode["generate"] == []  # it decodes from the next step
    assert len(seq.tables) == 6 and all(len(t) == 5 for t in seq.tables)
    cond, uncond = seq.tables[0::2], seq.tables[1::2]
    for side in (cond, uncond):  # two full prompt blocks (8 positions) held once, by reference
        assert all(t[:2] == side[0][:2] for t in side)
        assert len({b for t in side for b in t[2:]}) == 3 * 3  # the rest is each image's own
    assert cond[0][:2] != uncond[0][:2]
    assert 64 - free(sched) == image_blocks(10, 8, n=3, block_size=BS) == 2 * (2 + 3 * 3)
    assert seq.tables[0] == list(range(seq.tables[0][0], seq.tables[0][0] + 5))  # image 0: consecutive
    for _ in range(8):
        sched.update(seq, 1)
    assert seq.status is Status.FINISHED and free(sched) == 64


def test_admits_in_arrival_order_until_blocks_run_out_then_keeps_fifo():
    sched = make(blocks=16)
    a, b, c = generate("a"), generate("b", n=2), understand("c")  # 6, 8 and 3 blocks
    for seq in (a, b, c):
        sched.add(seq)
    assert ids(sched.schedule().prefill) == ["a", "b"]
    sched.add(understand("d", prompt=4))  # 1 block would fit, but d must not jump ahead of c
    assert ids(sched.schedule().prefill) == [] and free(sched) == 2
    for _ in range(3):
        sched.update(a, 1)
    assert ids(sched.schedule().prefill) == ["c", "d"]


def test_understanding_grows_block_by_block_as_it_decodes():
    sched = make(blocks=16)
    seq = understand("u", prompt=7, max_tokens=10)
    sched.add(seq)
    sched.schedule()
    assert len(seq.tables[0]) == 2  # 7 positions
    sched.update(seq, 5)  # the prefill's token: the next step feeds it at position 7
    sched.schedule()
    assert len(seq.tables[0]) == 2  # 8 positions still fit
    sched.update(seq, 5)
    plan = sched.schedule()
    assert len(seq.tables[0]) == 3 and ids(plan.decode["understand"]) == ["u"]
    assert sched.update(seq, EOS) and seq.finish_reason == "stop" and free(sched) == 16


def test_preemption_frees_the_newest_and_it_comes_back_first():
    sched = make(blocks=6)
    old, new = understand("old", prompt=8, max_tokens=16), understand("new", prompt=8, max_tokens=16)
    sched.add(old)
    sched.add(new)
    assert ids(sched.schedule().prefill) == ["old", "new"]  # 2 blocks each, 2 free
    later = understand("later", prompt=12, max_tokens=2)  # 3 blocks: it waits
    sched.add(later)
    for _ in range(5):  # both take a third block at position 8; at 12 there is no fourth for both
        for seq in list(sched.running["understand"]):
            sched.update(seq, 5)
        plan = sched.schedule()
        if plan.preempted:
            break
    assert ids(plan.preempted) == ["new"] and new.status is Status.WAITING and new.preemptions == 1
    assert ids(plan.decode["understand"]) == ["old"] and plan.prefill == []
    assert list(sched.waiting) == [new, later]  # back at the head, ahead of later arrivals
    assert new.tables == [] and new.kv_len == 8 + 5  # it comes back with every token it had sampled
    assert sched.preemptions == 1 and len(old.tables[0]) == 4
    while old.status is Status.RUNNING:
        sched.update(old, 5)
        if old.status is Status.RUNNING:
            assert ids(sched.schedule().prefill) == []
    assert ids(sched.schedule().prefill) == ["new"] and len(new.tables[0]) == 4


def test_a_lone_sequence_that_cannot_grow_preempts_itself_and_waits_for_room():
    sched = make(blocks=9)
    gen, und = generate("g", prompt=8, steps=9), understand("u", prompt=4, max_tokens=9)  # 8 blocks, 1 block
    sched.add(gen)
    sched.add(und)
    assert ids(sched.schedule().prefill) == ["g", "u"] and free(sched) == 0
    sched.update(und, 5)
    plan = sched.schedule()
    assert ids(plan.preempted) == ["u"] and und.status is Status.WAITING
    assert ids(plan.decode["generate"]) == ["g"] and plan.decode["understand"] == []
    for _ in range(9):
        sched.update(gen, 1)
    assert gen.status is Status.FINISHED
    assert ids(sched.schedule().prefill) == ["u"] and len(und.tables[0]) == 2


def test_cancel_waiting_and_running_frees_blocks_and_leaves_others():
    sched = make(blocks=12)
    a, b, c = generate("a"), generate("b"), understand("c")  # 6, 6 and 3 blocks
    for seq in (a, b, c):
        sched.add(seq)
    assert ids(sched.schedule().prefill) == ["a", "b"]
    sched.cancel("a")
    sched.cancel("unknown")
    plan = sched.schedule()
    assert ids(plan.cancelled) == ["a"] and a.finish_reason == "cancelled"
    assert ids(plan.prefill) == ["c"]  # a's blocks went straight to c
    sched.cancel("b")
    sched.cancel("c")
    plan = sched.schedule()
    assert set(ids(plan.cancelled)) == {"b", "c"}
    assert not sched.has_work() and free(sched) == 12


def test_max_running_counts_images_and_the_prefill_budget_holds():
    sched = make(running=3, budget=25)
    for i in range(5):
        sched.add(understand(f"u{i}", prompt=10))
    assert ids(sched.schedule().prefill) == ["u0", "u1"]  # the third would pass the 25-token budget
    assert ids(sched.schedule().prefill) == ["u2"]  # max_running=3
    wide = make(running=3)
    wide.add(generate("g", n=2))
    wide.add(generate("h", n=2))
    assert ids(wide.schedule().prefill) == ["g"]  # 2 + 2 images > 3
    big = make(budget=5)
    big.add(understand("huge", prompt=100))
    assert ids(big.schedule().prefill) == ["huge"]  # one admission per step always goes through


def test_fail_releases_blocks_and_requests_that_never_fit_are_refused():
    sched = make(blocks=8)
    a = generate("a")
    sched.add(a)
    sched.schedule()
    sched.fail(a)
    assert free(sched) == 8 and not sched.has_work()
    with pytest.raises(ValueError, match="needs 10 KV blocks; the pool has 8"):
        sched.add(generate("big", n=3))
    with pytest.raises(ValueError, match="at most 8 run at once"):
        sched.add(generate("wide", n=9))


def test_cached_blocks_are_shared_by_reference_and_evicted_oldest_first():
    sched = make(blocks=8)
    keys = chain_keys(list(range(12)), BS)
    first = understand("a", prompt=12, max_tokens=2, keys=list(keys))
    sched.add(first)
    sched.schedule()
    sched.kv.register(first)
    assert first.cached_tokens == 0
    second = understand("b", prompt=12, max_tokens=2, keys=list(keys))
    sched.add(second)
    sched.schedule()
    # Two of the three blocks come from the cache (the last position is always computed).
    assert second.cached_tokens == 8 and second.tables[0][:2] == first.tables[0][:2]
    assert second.tables[0][2] != first.tables[0][2]
    pool, table = sched.kv.pool, list(first.tables[0])
    assert pool.blocks[table[0]].ref_count == 2
    for seq in (first, second):
        sched.update(seq, EOS)
    assert pool.num_free == 8 and pool.num_cached_free == 3
    assert pool.allocate(5) is not None and pool.num_cached_free == 3  # plain free blocks go first
    assert pool.allocate(1) is not None and pool.num_cached_free == 2 and pool.evictions == 1
    assert pool.lookup(keys) == table[:2]  # tables are freed tail first: the chain's end goes first


def test_chained_keys_cover_images_and_everything_before():
    ids_ = [1, 2, 3, 4, 9, 9, 9, 9, 5, 6, 7, 8]
    a = chain_keys(ids_, BS, [(4, 8, "image-a")])
    b = chain_keys(ids_, BS, [(4, 8, "image-b")])
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]  # after a different image nothing matches
    c = chain_keys([0, *ids_[1:]], BS, [(4, 8, "image-a")])
    assert all(x != y for x, y in zip(a, c, strict=True))
    assert chain_keys(ids_, BS, [(4, 8, "image-a")], prev=a[0], first=1) == a[1:]


def test_allocation_prefers_consecutive_blocks_and_release_counts_hold():
    pool = BlockPool(10, BS)
    x, y, z = pool.allocate(3), pool.allocate(3), pool.allocate(2)
    assert (x, y, z) == ([0, 1, 2], [3, 4, 5], [6, 7])
    pool.release(y)
    assert pool.allocate(2, after=x[-1]) == [3, 4]  # right after x
    pool.release(z)
    assert pool.allocate(3) == [5, 6, 7]  # the first run of three free ids
    with pytest.raises(ValueError, match="block 9 released more often"):
        pool.release([9])
    assert pool.allocate(99) is None and pool.num_free == 2


def test_byte_lru_evicts_least_recent_and_counts():
    lru: ByteLRU[str] = ByteLRU(10)
    lru.put("a", "A", 4)
    lru.put("b", "B", 4)
    assert lru.get("a") == "A"  # a is now the most recent
    lru.put("c", "C", 4)  # evicts b
    assert "b" not in lru and lru.get("c") == "C" and lru.get("b") is None
    assert (lru.hits, lru.misses, lru.evictions, lru.bytes) == (2, 1, 1, 8)
    assert not lru.put("huge", "H", 11) and len(lru) == 2


def test_room_to_grow_is_kept_for_a_row_and_given_up_under_pressure():
    sched = Scheduler(KVManager(BlockPool(10, BS), room_to_grow=3), max_running=8, max_prefill_tokens=1000)
    a = understand("a", prompt=4, max_tokens=12)  # 1 block now, 4 at most: 3 kept free after it
    sched.add(a)
    sched.schedule()
    assert a.tables == [[0]] and a.reserved == [1, 2, 3]
    b = understand("b", prompt=4, max_tokens=2)
    sched.add(b)
    sched.schedule()
    assert b.tables == [[4]]  # b is placed after a's room
    for _ in range(5):
        sched.update(a, 5)
        sched.schedule()
    assert a.tables == [[0, 1, 2]] and a.reserved == [3]  # a grew into its room: still one run
    c = Sequence("c", "generate", prompt_tokens=8, max_steps=5, width=1)  # 6 blocks: 5 free + a's last one
    sched.add(c)
    sched.schedule()
    assert c.status is Status.RUNNING and sched.kv.pool.num_free == 0  # the room went when nothing else was free
