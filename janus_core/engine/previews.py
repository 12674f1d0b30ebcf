"""Previews: what a request's images look like while they form, decoded off the engine thread.

A generation request may ask for k previews (`GenerateRequest.previews`); they fall at k evenly spaced
steps (`preview_steps`). After each step, the engine offers the requests that reached one of their steps
to the `Previews`. What a preview is decoded from is the batch's business (`Batch.snapshot`: a VQ request's
codes so far, a flow request's denoised estimate); taking it is a copy. The decoding (`Batch.render`) runs on a
thread of its own (and on CUDA a stream of its own), one offer at a time, and is never waited for:

- while the decoder is busy, an offer is refused and the requests try again at their next step with what they
  look like then; a preview whose step passed meanwhile is skipped (the next one is due), never queued;
- the decoder may be busy about `share` of the time: a budget that refills at `share` seconds per second, up to
  `BURST` seconds' worth; an offer needs some left, and its decoding stops (skipping the rest) once it has used
  what there was. What previews cost the requests stays near that share on any device (plus encoding them,
  which the server does off the engine thread).

A request whose steps all pass without a free decoder gets fewer previews, as OpenAI's partial images may be.
On CPU each offer gets a fresh thread: a thread that ran torch ops keeps an OpenMP pool for as long as it
lives, which slows every engine step (see `server.runtime.run_on_fresh_thread`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from janus_core.sched.sequence import Sequence
    from janus_core.step.batch import Batch, StepOutput

log = logging.getLogger(__name__)
BURST = 20.0  # seconds of wall time whose share the budget may save up (at 5%: one second of decoding)


def preview_steps(count: int, total: int) -> list[int]:
    """The steps after which `count` previews fall, evenly spaced strictly inside (0, total)."""
    if total < 2:
        return []
    return sorted({min(max(round(total * j / (count + 1)), 1), total - 1) for j in range(1, count + 1)})


@dataclass
class Preview:
    seq: Sequence
    step: int
    total: int
    images: Any  # (n, H, W, 3) uint8, or the exception that failed the decode


class Previews:
    def __init__(self, device: torch.device, share: float, wake: Callable[[], None]) -> None:
        self.share, self.wake = share, wake
        self._due: dict[Sequence, list[int]] = {}  # the steps of each request's previews still to come
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done: list[Preview] = []
        self._credit, self._refilled = share * BURST, time.monotonic()

    def add(self, seq: Sequence, count: int, total: int) -> None:
        steps = preview_steps(count, total)
        if steps:
            self._due[seq] = steps

    @property
    def ready(self) -> bool:
        with self._lock:
            return bool(self._done)

    def offer(self, batch: Batch, outputs: list[StepOutput]) -> None:
        """After a step (engine thread): start decoding the previews now due, if the decoder is free. A failure
        here (a snapshot out of memory, no thread to be had) costs those previews, never a request."""
        if not self._due:
            return
        try:
            self._offer(batch, outputs)
        except Exception:
            log.exception("previews could not be started; the requests go on without them")
            for out in outputs:
                self._due.pop(out.seq, None)

    def _offer(self, batch: Batch, outputs: list[StepOutput]) -> None:
        due = []
        for out in outputs:
            steps = self._due.get(out.seq)
            if steps is None:
                continue
            if out.step >= out.total or out.seq.finish_reason is not None:
                del self._due[out.seq]  # finished (or stopped): its image is what comes next
            elif out.step >= steps[0]:
                due.append(out)
        if not due or not self._free():
            return
        jobs = []
        for out in due:
            steps = self._due[out.seq]
            while steps and steps[0] <= out.step:  # this preview stands for every step it reached
                steps.pop(0)
            if not steps:
                del self._due[out.seq]
            jobs.append((out.seq, out.step, out.total, batch.snapshot(out.seq)))
        ready = None
        if self._stream is not None:  # the preview's stream starts once the model's stream has written the snapshots
            ready = torch.cuda.Event()
            ready.record()
            for _, _, _, snapshot in jobs:
                if snapshot.is_cuda:  # the allocator must not reuse it before the preview's stream is done with it
                    snapshot.record_stream(self._stream)
        self._thread = threading.Thread(target=self._decode, args=(batch, jobs, ready), name="janus-previews",
                                        daemon=True)
        self._thread.start()

    def collect(self) -> list[Preview]:
        """The decoded previews (engine thread); requests that ended meanwhile are the caller's to skip."""
        with self._lock:
            done, self._done = self._done, []
        for preview in done:
            if isinstance(preview.images, BaseException):
                log.warning("a preview of %s could not be decoded: %s", preview.seq.request_id, preview.images)
        return [p for p in done if not isinstance(p.images, BaseException)]

    def forget(self) -> None:
        """Drop the schedules of requests that ended without a last step (cancelled, failed): each step."""
        if self._due:
            for seq in [s for s in self._due if s.finish_reason is not None]:
                del self._due[seq]

    def _free(self) -> bool:
        if self._thread is not None and self._thread.is_alive():
            return False
        now = time.monotonic()
        self._credit = min(self._credit + (now - self._refilled) * self.share, self.share * BURST)
        self._refilled = now
        return self._credit > 0.0

    def _decode(self, batch: Batch, jobs: list[tuple[Sequence, int, int, Any]], ready: torch.cuda.Event | None
                ) -> None:
        started = time.monotonic()
        out = []
        for seq, step, total, snapshot in jobs:
            if time.monotonic() - started > self._credit:  # the budget is spent: the rest are skipped
                break
            try:
                with torch.inference_mode():
                    if self._stream is None:
                        images = batch.render(snapshot)
                    else:
                        with torch.cuda.stream(self._stream):
                            self._stream.wait_event(ready)
                            images = batch.render(snapshot)  # ends with a copy to the host: synchronises this stream
            except Exception as exc:  # a preview must never fail its request
                images = exc
            out.append(Preview(seq, step, total, images))
        with self._lock:
            self._done.extend(out)
            self._credit -= time.monotonic() - started  # may go below zero: the next offers wait for the refill
        self.wake()
