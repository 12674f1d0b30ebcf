"""The scheduler: which requests run this step, in plain Python (no tensors, no model).

Two kinds of sequence share one pool of KV blocks: understanding (one row that grows as it
decodes) and generation (two rows, cond + uncond, per image, all taken at admission). Every step
the scheduler (1) drops cancelled requests, (2) makes room for every running understanding row's
next position, preempting the newest understanding sequence while the pool is dry (its blocks go
back; it waits at the head of the queue and is recomputed later, its full blocks most likely still
cached), (3) admits waiting requests strictly first-come first-served while their blocks are free,
the running images + sequences stay under `max_running` and the prefill-token budget lasts, and
(4) lists the running sequences for a decode step. `update` records one sampled token per sequence
and says when it is done; a finished sequence's blocks go back to the pool.

It knows counts (blocks, positions, prompt tokens, tokens to make, the stop token), not what the
tokens mean or what the engine keeps for each sequence (`Sequence.data`, which it never reads).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from janus_core.sched.kv_manager import KVManager
from janus_core.sched.sequence import KINDS, Sequence, Status


@dataclass
class StepPlan:
    cancelled: list[Sequence] = field(default_factory=list)  # to report; their blocks are already free
    prefill: list[Sequence] = field(default_factory=list)  # admitted now, tables assigned
    decode: dict[str, list[Sequence]] = field(default_factory=lambda: {k: [] for k in KINDS})
    preempted: list[Sequence] = field(default_factory=list)  # sent back to wait this step

    @property
    def empty(self) -> bool:
        return not (self.cancelled or self.prefill or self.preempted or any(self.decode.values()))


class Scheduler:
    def __init__(self, kv: KVManager, *, max_running: int, max_prefill_tokens: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        self.kv = kv
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()  # arrival order; preempted ones go back to the front
        self.running: dict[str, list[Sequence]] = {kind: [] for kind in KINDS}
        self.preemptions = 0
        self._cancel: set[str] = set()

    # --- bookkeeping ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.width > self.max_running:
            raise ValueError(f"{seq.request_id} has {seq.width} images; at most {self.max_running} run at once")
        if not self.kv.fits(seq):
            raise ValueError(f"{seq.request_id} needs {self.kv.blocks_needed(seq)} KV blocks; the pool has "
                             f"{self.kv.pool.num_blocks}")
        self.waiting.append(seq)

    def cancel(self, request_id: str) -> None:
        """Mark a request; it leaves at the next `schedule` (waiting or running)."""
        self._cancel.add(request_id)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_running(self, kind: str | None = None) -> int:
        kinds = KINDS if kind is None else (kind,)
        return sum(len(self.running[k]) for k in kinds)

    def running_width(self) -> int:
        return sum(s.width for k in KINDS for s in self.running[k])

    def has_work(self) -> bool:
        return self.num_waiting() > 0 or self.num_running() > 0

    # --- one step ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan(cancelled=self._drop_cancelled())
        plan.decode = {kind: list(self.running[kind]) for kind in KINDS}
        plan.preempted = self._make_room()
        for seq in plan.preempted:
            plan.decode["understand"].remove(seq)
        if not plan.preempted:  # a preempting step admits nothing: the blocks just freed are spoken for
            self._admit(plan)
        return plan

    def _drop_cancelled(self) -> list[Sequence]:
        dropped: list[Sequence] = []
        if not self._cancel:
            return dropped
        for seq in [s for s in self.waiting if s.request_id in self._cancel]:
            self.waiting.remove(seq)
            dropped.append(seq)
        for kind in KINDS:
            for seq in [s for s in self.running[kind] if s.request_id in self._cancel]:
                self._finish(seq, "cancelled")
                dropped.append(seq)
        for seq in dropped:
            seq.status, seq.finish_reason = Status.FINISHED, "cancelled"
        self._cancel.clear()  # ids not found were finished already, or not yet added (the engine handles those)
        return dropped

    def _make_room(self) -> list[Sequence]:
        """A slot for every running understanding row's next position; preempt the newest while dry."""
        preempted: list[Sequence] = []
        for seq in list(self.running["understand"]):
            while seq.status is Status.RUNNING and not self.kv.grow(seq):
                victim = max(self.running["understand"], key=lambda s: s.arrival)
                self._preempt(victim)
                preempted.append(victim)
        return preempted

    def _preempt(self, seq: Sequence) -> None:
        self.running[seq.kind].remove(seq)
        self.kv.release(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)  # strict FIFO: everything running arrived before everything waiting

    def _admit(self, plan: StepPlan) -> None:
        budget = self.max_prefill_tokens
        while self.waiting:
            seq = self.waiting[0]
            if self.running_width() + seq.width > self.max_running:
                break
            if plan.prefill and seq.prefill_tokens > budget:
                break
            if not self.kv.admit(seq):  # first come, first served: nobody skips ahead of a big request
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running[seq.kind].append(seq)
            plan.prefill.append(seq)
            budget -= seq.prefill_tokens

    def update(self, seq: Sequence, token: int) -> bool:
        """Record one sampled token (one step, for generation); True when `seq` has just finished."""
        if seq.stop_token is not None and token == seq.stop_token:
            self._finish(seq, "stop")
            return True
        seq.num_generated += 1
        if seq.num_generated >= seq.max_steps:
            self._finish(seq, "length")
            return True
        return False

    def stop(self, seq: Sequence) -> None:
        """Finish a running sequence as "stop" for a reason the scheduler cannot see (a stop string)."""
        if seq.status is Status.RUNNING:
            self._finish(seq, "stop")

    def fail(self, seq: Sequence) -> None:
        """Take a running sequence out after an error; its blocks go back to the pool."""
        if seq.status is Status.RUNNING:
            self._finish(seq, "error")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.running[seq.kind].remove(seq)
        self.kv.register(seq)
        self.kv.release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
