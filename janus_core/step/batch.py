"""The batch contract: what the engine asks of each kind of batch, and the step outputs they give back.

Three batches implement it: `TextBatch` (understanding), `VQBatch` (Janus-Pro's CFG image codes) and
`FlowBatch` (JanusFlow's ODE steps). The engine drives them alike and never asks which one it has:

- `prepare(request)`: validate and tokenize; returns the `Sequence` (with its row layout) that waits
  for blocks, or raises `InvalidRequestError`.
- `prefill(seq)`: compute an admitted sequence's prompt KV; returns what it chose on the device (a
  text row's first token, each image's first code) or None (flow: its first step is the next one).
- `launch(seqs)`: queue one decode step for the running sequences; returns the chosen tokens on the
  device, or None when there are none to copy (flow advances its latents on the device).
- `update(seqs, chosen)`: the host side once the chosen tokens are copied: one `StepOutput` each.
- `finish(seqs)`: the results of finished image sequences, or [] when a background decoder has them
  (`decoded()` hands them over later; `pending` / `ready` say whether any are out / done).
- `snapshot(seq)` / `render(snapshot)`: an image batch's previews (`janus_core.engine.previews`): what a
  running request's images are decoded from now (a copy, on the engine thread), and its pixels (n, H, W, 3),
  on the preview thread.
- `reset()`: forget per-row device state after a failed step; `clear_caches()`: drop what it keeps for
  reuse (vision features); `close()`: stop background work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from janus_core.requests import GenerateResult, Request
    from janus_core.sched.sequence import Sequence

Decoded = list[tuple[list["Sequence"], "list[Any] | BaseException"]]


@dataclass
class StepOutput:
    seq: Sequence
    token: int | None  # a text row's sampled token; None for images (their codes stay with the batch)
    step: int  # decode steps taken so far: tokens, codes per image, or ODE steps
    total: int  # steps it takes at most


def per_sequence(values: Any, seqs: list[Sequence]) -> list[Any]:
    """Split rows that hold `seq.width` consecutive entries per sequence (a request's images) back by sequence."""
    out, at = [], 0
    for seq in seqs:
        out.append(values[at:at + seq.width])
        at += seq.width
    return out


class Batch(Protocol):
    kind: str  # the request kind it serves: "understand" or "generate"
    defer_finish: bool  # finishing may run after the next step is launched (overlap), one sequence at a time

    def prepare(self, request: Request) -> Sequence: ...

    def prefill(self, seq: Sequence) -> torch.Tensor | None: ...

    def launch(self, seqs: list[Sequence]) -> torch.Tensor | None: ...

    def update(self, seqs: list[Sequence], chosen: list[int] | None) -> list[StepOutput]: ...

    def finish(self, seqs: list[Sequence]) -> list[tuple[Sequence, GenerateResult]]: ...

    def decoded(self, wait: bool = False) -> Decoded: ...

    def snapshot(self, seq: Sequence) -> Any: ...

    def render(self, snapshot: Any) -> Any: ...

    @property
    def pending(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    def reset(self) -> None: ...

    def clear_caches(self) -> None: ...

    def close(self) -> None: ...


class Foreground:
    """The defaults of a batch with no background decoder."""

    defer_finish = False
    pending = False
    ready = False

    def decoded(self, wait: bool = False) -> Decoded:
        return []

    def finish(self, seqs: list[Sequence]) -> list[tuple[Sequence, GenerateResult]]:
        return []

    def snapshot(self, seq: Sequence) -> Any:
        raise NotImplementedError(f"{type(self).__name__} makes no previews")

    def render(self, snapshot: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} makes no previews")

    def clear_caches(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Launch:
    """Work queued on the device for some sequences of one batch, not yet seen by the host."""

    batch: Batch
    seqs: list[Sequence]
    chosen: torch.Tensor | None  # what the device chose (tokens, codes), or None (flow: nothing to copy)
    prefill: bool
    seconds: float  # host time to queue it


def fetch(launches: list[Launch], while_waiting: Callable[[], None]) -> tuple[list[list[int] | None], float]:
    """One device-to-host copy of everything a step chose, split back per launch; and the seconds it took.
    While the device still runs the step (CUDA queues it), `while_waiting()` runs: host work that overlaps it."""
    started = time.perf_counter()
    on_device = [launch.chosen for launch in launches if launch.chosen is not None]
    tokens: list[int] = []
    if on_device:
        chosen = torch.cat(on_device)
        if chosen.is_cuda:
            host = chosen.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            while_waiting()
            done.synchronize()
            chosen = host
        tokens = chosen.tolist()
    out: list[list[int] | None] = []
    at = 0
    for launch in launches:
        rows = 0 if launch.chosen is None else launch.chosen.numel()
        out.append(None if launch.chosen is None else tokens[at:at + rows])
        at += rows
    return out, time.perf_counter() - started
