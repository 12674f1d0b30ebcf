"""The scheduler: which requests run this step, in plain Python (no tensors, no model).

Two kinds of sequence share the engine, each with its own pool of KV-cache rows: understanding
(one row per request) and generation (two rows, cond + uncond, per image). Every step the
scheduler (1) drops cancelled requests, (2) admits waiting requests first-come first-served
while their pool has rows, the running count stays under `max_running` and the prefill-token
budget lasts, and (3) lists every running sequence for a decode step. `update` records one
sampled token per sequence and says when it is done; finished rows go back to the pool.

It knows counts (rows, prompt tokens, tokens to make, the stop token), not what the tokens mean
or what the runner keeps for each sequence (`Sequence.data`, which the scheduler never reads).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

KINDS = ("understand", "generate")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    kind: str  # "understand" | "generate"
    num_rows: int
    prompt_tokens: int  # tokens the prefill will process (both CFG rows count for generation)
    max_tokens: int  # max_new_tokens, or image tokens per image
    stop_token: int | None = None  # understanding's EOS; generation has none
    status: Status = Status.WAITING
    rows: list[int] = field(default_factory=list)
    num_generated: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    data: Any = None  # the engine's per-request state

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.num_rows < 1:
            raise ValueError(f"num_rows must be at least 1, got {self.num_rows}")


class RowPool:
    """KV-cache rows of one kind; hands out the lowest free rows so the batch stays dense."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = set(range(size))

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        rows = sorted(self._free)[:n]
        self._free.difference_update(rows)
        return rows

    def release(self, rows: list[int]) -> None:
        self._free.update(rows)

    @property
    def high_water(self) -> int:
        """One past the highest row in use: a decode step covers rows [0, high_water)."""
        used = set(range(self.size)) - self._free
        return max(used) + 1 if used else 0


@dataclass
class StepPlan:
    cancelled: list[Sequence] = field(default_factory=list)  # to report; their rows are already free
    prefill: list[Sequence] = field(default_factory=list)  # admitted now, rows assigned
    decode: dict[str, list[Sequence]] = field(default_factory=lambda: {k: [] for k in KINDS})

    @property
    def empty(self) -> bool:
        return not (self.cancelled or self.prefill or any(self.decode.values()))


class Scheduler:
    def __init__(self, rows: dict[str, int], *, max_running: int, max_prefill_tokens: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        self.pools = {kind: RowPool(rows[kind]) for kind in KINDS}
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: dict[str, deque[Sequence]] = {kind: deque() for kind in KINDS}
        self.running: dict[str, list[Sequence]] = {kind: [] for kind in KINDS}
        self._cancel: set[str] = set()

    # --- bookkeeping ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.num_rows > self.pools[seq.kind].size:
            raise ValueError(f"{seq.request_id} needs {seq.num_rows} rows; the {seq.kind} pool has "
                             f"{self.pools[seq.kind].size}")
        self.waiting[seq.kind].append(seq)

    def cancel(self, request_id: str) -> None:
        """Mark a request; it leaves at the next `schedule` (waiting or running)."""
        self._cancel.add(request_id)

    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def num_running(self, kind: str | None = None) -> int:
        kinds = KINDS if kind is None else (kind,)
        return sum(len(self.running[k]) for k in kinds)

    def has_work(self) -> bool:
        return self.num_waiting() > 0 or self.num_running() > 0

    # --- one step ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan(cancelled=self._drop_cancelled())
        self._admit(plan)
        for kind in KINDS:
            plan.decode[kind] = list(self.running[kind])
        return plan

    def _drop_cancelled(self) -> list[Sequence]:
        dropped: list[Sequence] = []
        if not self._cancel:
            return dropped
        for kind in KINDS:
            for seq in [s for s in self.waiting[kind] if s.request_id in self._cancel]:
                self.waiting[kind].remove(seq)
                dropped.append(seq)
            for seq in [s for s in self.running[kind] if s.request_id in self._cancel]:
                self._finish(seq, "cancelled")
                dropped.append(seq)
        for seq in dropped:
            seq.status, seq.finish_reason = Status.FINISHED, "cancelled"
        self._cancel.clear()  # ids not found were finished already, or not yet added (the engine handles those)
        return dropped

    def _admit(self, plan: StepPlan) -> None:
        budget = self.max_prefill_tokens
        blocked = set()
        # Round-robin over kinds so a long generation queue never starves understanding (and back).
        while len(blocked) < len(KINDS):
            for kind in KINDS:
                if kind in blocked:
                    continue
                queue = self.waiting[kind]
                over_budget = plan.prefill and queue and queue[0].prompt_tokens > budget
                if not queue or self.num_running() >= self.max_running or over_budget:
                    blocked.add(kind)
                    continue
                rows = self.pools[kind].allocate(queue[0].num_rows)
                if rows is None:  # first come, first served: no skipping ahead of a big request
                    blocked.add(kind)
                    continue
                seq = queue.popleft()
                seq.rows, seq.status = rows, Status.RUNNING
                self.running[kind].append(seq)
                plan.prefill.append(seq)
                budget -= seq.prompt_tokens

    def update(self, seq: Sequence, token: int) -> bool:
        """Record one sampled token (one step, for generation); True when `seq` has just finished."""
        if seq.stop_token is not None and token == seq.stop_token:
            self._finish(seq, "stop")
            return True
        seq.num_generated += 1
        if seq.num_generated >= seq.max_tokens:
            self._finish(seq, "length")
            return True
        return False

    def stop(self, seq: Sequence) -> None:
        """Finish a running sequence as "stop" for a reason the scheduler cannot see (a stop string)."""
        if seq.status is Status.RUNNING:
            self._finish(seq, "stop")

    def fail(self, seq: Sequence) -> None:
        """Take a running sequence out after an error; its rows go back to the pool."""
        if seq.status is Status.RUNNING:
            self._finish(seq, "error")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.running[seq.kind].remove(seq)
        self.pools[seq.kind].release(seq.rows)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def decode_width(self, kind: str) -> int:
        """Rows a decode step of `kind` covers: [0, high_water) of its pool."""
        return self.pools[kind].high_water
