"""The engine: accepts understanding and generation requests from any thread and runs them batched.

Requests go in with `add_request(request, sink)`; everything the engine has to say about a request
reaches `sink` (called on the engine thread): `TokenOutput` / `ProgressOutput` while it runs, then
exactly one `FinishedOutput` or `FailedOutput`. `cancel(request_id)` removes a request at its next
step without disturbing the others.

Each `step` is: take in new requests (validate, tokenize), let the `Scheduler` (plain Python)
drop cancelled requests and admit waiting ones, prefill the admitted ones, run one decode step per
kind over every running request (`GenerationBatch`, `UnderstandingBatch` on one `ModelRunner`),
then update from the sampled tokens: stream them, finish requests, VQ-decode finished images
together. The engine knows tokens, pixels and tensors; not HTTP, queues or PNG encoding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from janus_core.batch_generation import GenerationBatch, GenerationState
from janus_core.batch_understanding import UnderstandingBatch, UnderstandingState
from janus_core.conversation import Message
from janus_core.errors import InvalidRequestError
from janus_core.generation import GenerateResult
from janus_core.loading import LoadedModel
from janus_core.runner import ModelRunner
from janus_core.sampling import SamplingParams
from janus_core.scheduler import KINDS, Scheduler, Sequence, Status
from janus_core.stops import StopMatcher
from janus_core.understanding import UnderstandResult

log = logging.getLogger(__name__)

@dataclass
class UnderstandRequest:
    """One prompt about `images`, or (with `messages`) a whole conversation whose images are `images`
    in order; `prompt` is then unused. The answer ends at EOS, `max_new_tokens` or a `stop` string."""

    request_id: str
    prompt: str
    images: list[Image.Image]
    max_new_tokens: int = 256
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[Message] | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerateRequest:
    request_id: str
    prompt: str
    n: int = 1
    cfg_weight: float = 5.0
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0))


Request = UnderstandRequest | GenerateRequest


@dataclass
class TokenOutput:
    request_id: str
    token_id: int
    delta: str


@dataclass
class ProgressOutput:
    request_id: str
    step: int
    total: int


@dataclass
class FinishedOutput:
    request_id: str
    result: UnderstandResult | GenerateResult


@dataclass
class FailedOutput:
    request_id: str
    reason: str  # "invalid" (bad request), "cancelled" or "internal"
    message: str


EngineOutput = TokenOutput | ProgressOutput | FinishedOutput | FailedOutput
Sink = Callable[[EngineOutput], None]


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16  # running requests (both kinds); also the understanding KV rows
    max_images: int = 4  # images per understanding request
    max_new_tokens: int = 2048
    max_generation_images: int | None = None  # images decoding at once (2 KV rows each); None: max_batch_size
    max_context: int | None = None  # understanding KV length per row; None: the model's, at most 4096
    max_generation_prompt: int = 512  # generation prompt tokens; the row length adds the image tokens
    max_prefill_tokens: int = 8192  # prompt tokens admitted per step (at least one request always is)
    vision_cache_bytes: int = 256 * 2**20
    prefix_cache_bytes: int = 512 * 2**20
    compile: bool = False  # CUDA only: static-shape decode step under torch.compile + CUDA graphs
    pack_cpu_linears: bool = True  # CPU fp32 only: oneDNN-packed weights (janus_core.packed_linear)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_generation_images is not None and self.max_generation_images < 1:
            raise ValueError(f"max_generation_images must be at least 1, got {self.max_generation_images}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {self.max_context}")
        if self.max_generation_prompt < 1:
            raise ValueError(f"max_generation_prompt must be at least 1, got {self.max_generation_prompt}")
        if min(self.vision_cache_bytes, self.prefix_cache_bytes) < 0:
            raise ValueError("cache sizes must be >= 0 bytes")

    @property
    def generation_images(self) -> int:
        return self.max_generation_images or self.max_batch_size


@dataclass
class EngineStats:
    """Plain counters; the server turns them into metrics."""

    waiting: int = 0
    running: dict[str, int] = field(default_factory=lambda: {"understand": 0, "generate": 0})
    finished: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    images_generated: int = 0
    batch_sizes: list[tuple[str, int]] = field(default_factory=list)  # drained by the server
    step_seconds: list[tuple[str, float]] = field(default_factory=list)  # drained by the server
    vision_cache_hits: int = 0
    vision_cache_misses: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    prefix_tokens_reused: int = 0  # image prefixes and shared preambles (system prompt) together
    preamble_hits: int = 0
    kv_cache_bytes: int = 0


class Engine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None) -> None:
        self.lm = lm
        self.config = cfg = config or EngineConfig()
        self.runner = ModelRunner(lm, compile=cfg.compile, pack_cpu_linears=cfg.pack_cpu_linears)
        # Rows are allocated up front (rows x length x layers); 4096 keeps a 7B at 16 rows near 16 GB in bf16.
        understand_len = min(cfg.max_context or 4096, lm.max_context)
        generate_len = min(cfg.max_generation_prompt + lm.num_image_tokens, lm.max_context)
        self.understanding = UnderstandingBatch(
            lm, self.runner, self.runner.new_cache(cfg.max_batch_size, understand_len),
            vision_cache_bytes=cfg.vision_cache_bytes, prefix_cache_bytes=cfg.prefix_cache_bytes,
            max_images=cfg.max_images, max_new_tokens=cfg.max_new_tokens)
        self.generation = GenerationBatch(lm, self.runner,
                                          self.runner.new_cache(2 * cfg.generation_images, generate_len))
        self.scheduler = Scheduler({"understand": cfg.max_batch_size, "generate": 2 * cfg.generation_images},
                                   max_running=cfg.max_batch_size, max_prefill_tokens=cfg.max_prefill_tokens)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: deque[tuple[Request, Sink]] = deque()
        self._cancelled: set[str] = set()
        self._sinks: dict[Sequence, Sink] = {}  # requests not yet answered
        self._stops: dict[Sequence, StopMatcher] = {}  # understanding requests with stop strings
        self._stats = EngineStats(
            kv_cache_bytes=self.understanding.cache.nbytes + self.generation.cache.nbytes)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- any thread -------------------------------------------------------------------------------
    def add_request(self, request: Request, sink: Sink) -> None:
        with self._wakeup:
            self._inbox.append((request, sink))
            self._wakeup.notify()

    def cancel(self, request_id: str) -> None:
        with self._wakeup:
            self._cancelled.add(request_id)
            self._wakeup.notify()

    def free_slots(self) -> int:
        with self._lock:
            busy = len(self._inbox) + self._stats.waiting + sum(self._stats.running.values())
        return max(self.config.max_batch_size - busy, 0)

    def stats(self) -> EngineStats:
        """A snapshot; per-step samples are handed over once."""
        with self._lock:
            s = self._stats
            snap = EngineStats(**{**s.__dict__, "waiting": s.waiting + len(self._inbox), "running": dict(s.running)})
            s.batch_sizes, s.step_seconds = [], []
        return snap

    def clear_caches(self) -> None:
        """Forget every cached prefix and vision feature (benchmarks measure the cold path with it).
        Call it while no request runs: the engine thread reads the caches without a lock. Results
        never depend on the caches, only the work done does."""
        self.understanding.prefixes.clear()
        self.understanding.vision.clear()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="janus-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def warm_up(self) -> None:
        """Compile the decode steps before the first request (no-op unless `compile` is on CUDA)."""
        self.runner.warm_up(self.understanding.cache, self.runner.embed_text)
        self.runner.warm_up(self.generation.cache, self.runner.embed_image_tokens)

    # --- engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        self.warm_up()
        while True:
            with self._wakeup:
                while not (self._inbox or self._cancelled or self.scheduler.has_work() or self._stopping):
                    self._wakeup.wait()
                if self._stopping and not self._inbox and not self.scheduler.has_work():
                    return
            self.step()

    def run_until_idle(self) -> None:
        """Step on the calling thread until nothing is left (for tests and benchmarks without `start`)."""
        while self.step():
            pass

    def step(self) -> bool:
        """One engine iteration over every request; False when there was nothing to do."""
        self._intake()
        plan = self.scheduler.schedule()
        if plan.empty:
            self._sync_counts()
            return False
        for seq in plan.cancelled:
            self._fail(seq, "cancelled", "the request was cancelled")
        for seq in plan.prefill:
            self._guard(self._prefill, [seq], seq)
        for kind in KINDS:
            running = [s for s in plan.decode[kind] if s.status is Status.RUNNING]
            if running:
                self._guard(self._decode, running, kind, running)
        self._sync_counts()
        return True

    def _intake(self) -> None:
        """Move new requests into the scheduler (validated and tokenized) and pass on cancellations."""
        with self._lock:
            inbox, self._inbox = self._inbox, deque()
            cancelled, self._cancelled = self._cancelled, set()
        for request, sink in inbox:
            if request.request_id in cancelled:
                cancelled.discard(request.request_id)
                self._emit(sink, FailedOutput(request.request_id, "cancelled", "the request was cancelled"))
                self._count(failed=True)
                continue
            try:
                seq = self._prepare(request)
            except InvalidRequestError as exc:
                self._emit(sink, FailedOutput(request.request_id, "invalid", str(exc)))
                self._count(failed=True)
                continue
            except Exception as exc:  # a request must never take the engine down
                log.exception("request %s could not be prepared", request.request_id)
                self._emit(sink, FailedOutput(request.request_id, "internal", f"{type(exc).__name__}: {exc}"))
                self._count(failed=True)
                continue
            self._sinks[seq] = sink
            if isinstance(request, UnderstandRequest) and request.stop:
                self._stops[seq] = StopMatcher(request.stop)
            self.scheduler.add(seq)
        for request_id in cancelled:
            self.scheduler.cancel(request_id)

    def _prepare(self, request: Request) -> Sequence:
        if isinstance(request, UnderstandRequest):
            return self.understanding.prepare(request.request_id, request.images, request.prompt,
                                              request.max_new_tokens, request.params, messages=request.messages)
        return self.generation.prepare(request.request_id, request.prompt, request.n, request.cfg_weight,
                                       request.params)

    def _prefill(self, seq: Sequence) -> None:
        if seq.kind == "understand":
            self._on_tokens(seq, self.understanding.prefill(seq))
        else:
            self._on_codes([seq], [self.generation.prefill(seq)])

    def _decode(self, kind: str, seqs: list[Sequence]) -> None:
        started = time.perf_counter()
        width = self.scheduler.decode_width(kind)
        if kind == "understand":
            tokens = self.understanding.decode(seqs, width)
            self._record_step(kind, len(seqs), time.perf_counter() - started)
            for seq, token in zip(seqs, tokens, strict=True):
                self._on_tokens(seq, token)
        else:
            codes = self.generation.decode(seqs, width)
            self._record_step(kind, len(seqs), time.perf_counter() - started)
            self._on_codes(seqs, codes)

    # --- update from output -----------------------------------------------------------------------
    def _on_tokens(self, seq: Sequence, token: int) -> None:
        state: UnderstandingState = seq.data
        done = self.scheduler.update(seq, token)
        stops = self._stops.get(seq)
        if seq.finish_reason != "stop":
            delta = self.understanding.push(seq, token)
            if stops is not None:
                delta = stops.feed(delta)
                if stops.stopped and not done:
                    self.scheduler.stop(seq)
                    done = True
                elif stops.stopped:  # the stop string ended on the last token allowed
                    seq.finish_reason = "stop"
            self._emit(self._sinks[seq], TokenOutput(seq.request_id, token, delta))
        if done:
            text = stops.text if stops is not None and stops.stopped else state.decoder.text
            self._stops.pop(seq, None)
            result = UnderstandResult(text, seq.finish_reason or "length", len(state.ids),
                                      len(state.out), list(state.out), state.seed)
            with self._lock:
                self._stats.prompt_tokens += result.prompt_tokens
                self._stats.generated_tokens += result.completion_tokens
            self._succeed(seq, result)

    def _on_codes(self, seqs: list[Sequence], codes: list[list[int]]) -> None:
        finished = []
        total = self.lm.num_image_tokens
        for seq, step_codes in zip(seqs, codes, strict=True):
            if self.scheduler.update(seq, step_codes[0]):
                finished.append(seq)
            self._emit(self._sinks[seq], ProgressOutput(seq.request_id, seq.data.steps, total))
        if finished:
            self._guard(self._finish_images, finished, finished)

    def _finish_images(self, seqs: list[Sequence]) -> None:
        for seq, pixels in zip(seqs, self.generation.decode_pixels(seqs), strict=True):
            state: GenerationState = seq.data
            with self._lock:
                self._stats.images_generated += state.n
            self._succeed(seq, GenerateResult(state.seed, state.tokens, pixels))

    # --- helpers ----------------------------------------------------------------------------------
    def _guard(self, fn: Callable[..., None], seqs: list[Sequence], *args) -> None:
        """Run `fn`; if it raises, fail `seqs` (the batch it was running) and keep the engine going."""
        try:
            fn(*args)
        except Exception as exc:
            log.exception("step failed for %s", [s.request_id for s in seqs])
            for seq in seqs:
                self.scheduler.fail(seq)
                if seq in self._sinks:
                    self._fail(seq, "internal", f"{type(exc).__name__}: {exc}")

    def _succeed(self, seq: Sequence, result: UnderstandResult | GenerateResult) -> None:
        self._count(failed=False)
        self._emit(self._sinks.pop(seq), FinishedOutput(seq.request_id, result))

    def _fail(self, seq: Sequence, reason: str, message: str) -> None:
        self._stops.pop(seq, None)
        self._count(failed=True)
        self._emit(self._sinks.pop(seq), FailedOutput(seq.request_id, reason, message))

    @staticmethod
    def _emit(sink: Sink, output: EngineOutput) -> None:
        try:
            sink(output)
        except Exception:  # a broken sink must not stop the other requests
            log.exception("sink for %s raised", output.request_id)

    def _sync_counts(self) -> None:
        c = self.understanding.counters
        with self._lock:
            s = self._stats
            s.waiting = self.scheduler.num_waiting()
            s.running = {kind: self.scheduler.num_running(kind) for kind in KINDS}
            s.vision_cache_hits, s.vision_cache_misses = c.vision_hits, c.vision_misses
            s.prefix_cache_hits, s.prefix_cache_misses = c.prefix_hits, c.prefix_misses
            s.prefix_tokens_reused, s.preamble_hits = c.prefix_tokens_reused, c.preamble_hits

    def _record_step(self, kind: str, batch: int, seconds: float) -> None:
        with self._lock:
            if len(self._stats.step_seconds) < 10_000:
                self._stats.step_seconds.append((kind, seconds))
                self._stats.batch_sizes.append((kind, batch))

    def _count(self, failed: bool) -> None:
        with self._lock:
            if failed:
                self._stats.failed += 1
            else:
                self._stats.finished += 1
