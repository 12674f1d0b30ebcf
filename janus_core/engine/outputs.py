"""The output processor: everything the engine says to its clients, and in what order.

It owns the sinks of the requests in flight, the text side of an answer (incremental detokenization,
stop strings), the answers themselves (results and failures) and the counters they add to. The engine
hands it each step's `StepOutput`s after the scheduler has seen them; image results come from the
batch that made them (`Batch.finish`, or later from a background decoder).

Overlap (on CUDA by default): a step's streaming and answers are held back (`hold`) and run by
`flush` while the device computes the next step, so host work hides behind device work. What decides
whether a request goes on is never held back: the token ids (the scheduler's) and stop strings (a
request with stop strings streams at once). A request's held-back outputs reach its sink before its
answer does.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from janus_core.engine.config import EngineStats
from janus_core.requests import (
    EngineOutput,
    FailedOutput,
    FinishedOutput,
    GenerateResult,
    PreviewOutput,
    ProgressOutput,
    Sink,
    TokenOutput,
    UnderstandResult,
)
from janus_core.sched.scheduler import Scheduler
from janus_core.sched.sequence import Sequence
from janus_core.step.batch import Batch, StepOutput
from janus_core.text.detok import IncrementalDecoder
from janus_core.text.stops import StopMatcher

if TYPE_CHECKING:
    from janus_core.engine.previews import Preview

log = logging.getLogger(__name__)


@dataclass
class _Text:
    decoder: IncrementalDecoder
    stops: StopMatcher | None  # None: the request has no stop strings


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, tokenizer, stats: EngineStats, lock: threading.Lock, *,
                 overlap: bool) -> None:
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.overlap = overlap
        self._stats, self._lock = stats, lock
        self._sinks: dict[Sequence, Sink] = {}  # requests not yet answered
        self._text: dict[Sequence, _Text] = {}  # understanding requests that have produced a token
        self._held: list[tuple[Sequence, Callable[[], None]]] = []  # run by the next `flush`

    # --- requests in and out ----------------------------------------------------------------------
    def add(self, seq: Sequence, sink: Sink) -> None:
        self._sinks[seq] = sink

    def refuse(self, request_id: str, sink: Sink, reason: str, message: str) -> None:
        """Answer a request that never became a sequence (cancelled or refused at intake)."""
        self._emit(sink, FailedOutput(request_id, reason, message))
        self._count(failed=True)

    def succeed(self, seq: Sequence, result: UnderstandResult | GenerateResult) -> None:
        self.flush(seq)  # what it streamed before its answer reaches its client first
        self._text.pop(seq, None)
        self._count(failed=False)
        now = time.time()
        seq.stamps.setdefault("finished", now)  # a stop string ended it
        seq.stamps["done"] = now
        self._emit(self._sinks.pop(seq), FinishedOutput(seq.request_id, result, dict(seq.stamps)))

    def fail(self, seq: Sequence, reason: str, message: str) -> None:
        self.flush(seq)  # what it streamed before the failure reaches its client first
        self._text.pop(seq, None)
        self._count(failed=True)
        self._emit(self._sinks.pop(seq), FailedOutput(seq.request_id, reason, message))

    def fail_step(self, seqs: list[Sequence], exc: Exception) -> None:
        """`seqs` were in a step that raised: take them out and tell their clients; the engine goes on."""
        log.error("step failed for %s", [s.request_id for s in seqs], exc_info=exc)
        for seq in seqs:
            self.scheduler.fail(seq)
            if seq in self._sinks:
                self.fail(seq, "internal", f"{type(exc).__name__}: {exc}")

    # --- one step's outputs -----------------------------------------------------------------------
    def update(self, batch: Batch, outputs: list[StepOutput], *, hold: bool = True) -> None:
        """Let the scheduler count each output, then stream it; answer the sequences it finished.
        `hold` False: stream now even with overlap (a prefill's first token: nothing to hide behind)."""
        finished = []
        now = time.time()
        for out in outputs:
            done = self.scheduler.update(out.seq, out.token)
            out.seq.stamps.setdefault("first", now)
            if done:
                out.seq.stamps["finished"] = now
            if out.token is not None:
                text = self._text_of(out.seq)
                stream = functools.partial(self._stream_token, out.seq, text, out.token, done)
                self._run(out.seq, stream, hold=hold and text.stops is None)
            else:
                progress = ProgressOutput(out.seq.request_id, out.step, out.total)
                self._run(out.seq, functools.partial(self._emit_to, out.seq, progress), hold=hold)
                if done:
                    finished.append(out.seq)
        if finished and self.overlap and batch.defer_finish:
            for seq in finished:
                self._run(seq, functools.partial(self._answer_images, batch, [seq]), hold=True)
        elif finished:
            self._run(finished, functools.partial(self._answer_images, batch, finished), hold=False)

    def collect(self, batch: Batch, wait: bool = False) -> None:
        """Answer the requests whose pixels a background decoder has finished."""
        for seqs, results in batch.decoded(wait):
            if isinstance(results, BaseException):
                log.error("pixel decode failed for %s: %s", [s.request_id for s in seqs], results)
                for seq in seqs:
                    self.fail(seq, "internal", f"{type(results).__name__}: {results}")
                continue
            for seq, result in zip(seqs, results, strict=True):
                self._answer_image(seq, result)

    def preview(self, previews: list[Preview]) -> None:
        """Send decoded previews to the requests still running."""
        for p in previews:
            if p.seq in self._sinks:
                self._emit(self._sinks[p.seq], PreviewOutput(p.seq.request_id, p.step, p.total, p.images))

    def flush(self, seq: Sequence | None = None) -> None:
        """Run the streaming and answers held back for overlap: all of them, or those of `seq`."""
        if not self._held:
            return
        mine = [item for item in self._held if seq is None or item[0] is seq]
        self._held = [item for item in self._held if seq is not None and item[0] is not seq]
        for owner, fn in mine:
            if owner in self._sinks:
                self._guard([owner], fn)

    # --- text -------------------------------------------------------------------------------------
    def _text_of(self, seq: Sequence) -> _Text:
        text = self._text.get(seq)
        if text is None:
            stop = seq.data.stop
            text = self._text[seq] = _Text(IncrementalDecoder(self.tokenizer), StopMatcher(stop) if stop else None)
        return text

    def _stream_token(self, seq: Sequence, text: _Text, token: int, done: bool) -> None:
        """Detokenize and stream one token; answer the request when it was its last."""
        state, stops = seq.data, text.stops
        if seq.finish_reason != "stop":
            delta = text.decoder.push(token)
            if stops is not None:
                delta = stops.feed(delta, armed=len(state.out) >= state.params.min_tokens)
                if stops.stopped and not done:
                    self.scheduler.stop(seq)
                    done = True
                elif stops.stopped:  # the stop string ended on the last token allowed
                    seq.finish_reason = "stop"
            self._emit(self._sinks[seq], TokenOutput(seq.request_id, token, delta))
        if done:
            answer = stops.text if stops is not None and stops.stopped else text.decoder.text
            result = UnderstandResult(answer, seq.finish_reason or "length", len(state.ids), len(state.out),
                                      list(state.out), state.seed)
            with self._lock:
                self._stats.prompt_tokens += result.prompt_tokens
                self._stats.generated_tokens += result.completion_tokens
            self.succeed(seq, result)

    # --- images -----------------------------------------------------------------------------------
    def _answer_images(self, batch: Batch, seqs: list[Sequence]) -> None:
        for seq, result in batch.finish(seqs):  # nothing yet when a background decoder took them
            self._answer_image(seq, result)

    def _answer_image(self, seq: Sequence, result: GenerateResult) -> None:
        with self._lock:
            self._stats.images_generated += seq.width
        self.succeed(seq, result)

    # --- helpers ----------------------------------------------------------------------------------
    def _run(self, owner: Sequence | list[Sequence], fn: Callable[[], None], *, hold: bool) -> None:
        """Run `fn` now, or (overlap, `hold`) at the next `flush`; if it raises, fail the sequences it served."""
        if hold and self.overlap:
            assert isinstance(owner, Sequence)
            self._held.append((owner, fn))
            return
        seqs = owner if isinstance(owner, list) else [owner]
        for seq in seqs:  # what a request had held back goes first
            self.flush(seq)
        self._guard(seqs, fn)

    def _guard(self, seqs: list[Sequence], fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:
            self.fail_step(seqs, exc)

    def _emit_to(self, seq: Sequence, output: EngineOutput) -> None:
        self._emit(self._sinks[seq], output)

    @staticmethod
    def _emit(sink: Sink, output: EngineOutput) -> None:
        try:
            sink(output)
        except Exception:  # a broken sink must not stop the other requests
            log.exception("sink for %s raised", output.request_id)

    def _count(self, failed: bool) -> None:
        with self._lock:
            if failed:
                self._stats.failed += 1
            else:
                self._stats.finished += 1
