"""Scheduler unit tests: no model, no tensors; build sequences, feed fake tokens, check the plans."""

from __future__ import annotations

import pytest

from janus_core.lru import ByteLRU
from janus_core.scheduler import RowPool, Scheduler, Sequence, Status

EOS = 2


def understand(rid: str, prompt: int = 10, max_tokens: int = 4) -> Sequence:
    return Sequence(rid, "understand", num_rows=1, prompt_tokens=prompt, max_tokens=max_tokens, stop_token=EOS)


def generate(rid: str, n: int = 1, prompt: int = 10, steps: int = 3) -> Sequence:
    return Sequence(rid, "generate", num_rows=2 * n, prompt_tokens=2 * prompt, max_tokens=steps)


def make(u_rows: int = 4, g_rows: int = 8, running: int = 8, budget: int = 1000) -> Scheduler:
    return Scheduler({"understand": u_rows, "generate": g_rows}, max_running=running, max_prefill_tokens=budget)


def ids(seqs: list[Sequence]) -> list[str]:
    return [s.request_id for s in seqs]


def test_admits_in_order_until_rows_run_out_then_keeps_fifo():
    sched = make(g_rows=4)
    for seq in (generate("a"), generate("b", n=2), generate("c")):
        sched.add(seq)
    plan = sched.schedule()
    assert ids(plan.prefill) == ["a"]  # b needs 4 rows, only 2 left; c must not jump ahead of b
    assert ids(plan.decode["generate"]) == ["a"]
    assert plan.prefill[0].rows == [0, 1]
    for _ in range(3):
        sched.update(plan.prefill[0], 7)
    assert plan.prefill[0].status is Status.FINISHED
    plan = sched.schedule()
    assert ids(plan.prefill) == ["b"]
    assert plan.prefill[0].rows == [0, 1, 2, 3]


def test_understanding_stops_on_eos_or_length():
    sched = make()
    a, b = understand("a", max_tokens=3), understand("b", max_tokens=3)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert not sched.update(a, 5)
    assert sched.update(a, EOS) and a.finish_reason == "stop" and a.num_generated == 1
    assert not sched.update(b, 5) and not sched.update(b, 6)
    assert sched.update(b, 7) and b.finish_reason == "length" and b.num_generated == 3
    assert not sched.has_work()
    assert sched.pools["understand"].free == 4


def test_join_at_any_step_and_lowest_rows_first():
    sched = make(u_rows=3)
    a, b = understand("a"), understand("b")
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert (a.rows, b.rows) == ([0], [1])
    sched.update(a, EOS)  # a leaves; the next arrival takes row 0 while b keeps running
    c = understand("c")
    sched.add(c)
    plan = sched.schedule()
    assert ids(plan.prefill) == ["c"] and c.rows == [0]
    assert ids(plan.decode["understand"]) == ["b", "c"]
    assert sched.decode_width("understand") == 2


def test_cancel_waiting_and_running_frees_rows_and_leaves_others():
    sched = make(g_rows=2)
    a, b, c = generate("a"), generate("b"), understand("c")
    for seq in (a, b, c):
        sched.add(seq)
    sched.schedule()
    sched.cancel("a")
    sched.cancel("unknown")
    plan = sched.schedule()
    assert ids(plan.cancelled) == ["a"] and a.finish_reason == "cancelled"
    assert ids(plan.prefill) == ["b"] and b.rows == [0, 1]  # a's rows went straight to b
    assert ids(plan.decode["understand"]) == ["c"]
    sched.cancel("b")
    sched.cancel("c")
    plan = sched.schedule()
    assert set(ids(plan.cancelled)) == {"b", "c"}
    assert not sched.has_work()


def test_max_running_and_prefill_budget():
    sched = make(u_rows=8, running=3, budget=25)
    for i in range(5):
        sched.add(understand(f"u{i}", prompt=10))
    plan = sched.schedule()
    assert ids(plan.prefill) == ["u0", "u1"]  # the third would pass the 25-token budget
    plan = sched.schedule()
    assert ids(plan.prefill) == ["u2"]  # max_running=3
    big = make(budget=5)
    big.add(understand("huge", prompt=100))
    assert ids(big.schedule().prefill) == ["huge"]  # one admission per step always goes through


def test_kinds_take_turns():
    sched = make(running=2)
    for i in range(3):
        sched.add(generate(f"g{i}"))
        sched.add(understand(f"u{i}"))
    assert ids(sched.schedule().prefill) == ["u0", "g0"]


def test_fail_releases_rows_and_oversized_requests_are_refused():
    sched = make(g_rows=2)
    a = generate("a")
    sched.add(a)
    sched.schedule()
    sched.fail(a)
    assert sched.pools["generate"].free == 2 and not sched.has_work()
    with pytest.raises(ValueError, match="needs 4 rows"):
        sched.add(generate("big", n=2))


def test_row_pool_high_water():
    pool = RowPool(4)
    first, second = pool.allocate(2), pool.allocate(1)
    assert (first, second, pool.high_water) == ([0, 1], [2], 3)
    pool.release(second)
    assert pool.high_water == 2 and pool.allocate(5) is None


def test_byte_lru_evicts_least_recent_and_counts():
    lru: ByteLRU[str] = ByteLRU(10)
    lru.put("a", "A", 4)
    lru.put("b", "B", 4)
    assert lru.get("a") == "A"  # a is now the most recent
    lru.put("c", "C", 4)  # evicts b
    assert "b" not in lru and lru.get("c") == "C" and lru.get("b") is None
    assert (lru.hits, lru.misses, lru.evictions, lru.bytes) == (2, 1, 1, 8)
    assert not lru.put("huge", "H", 11) and len(lru) == 2
