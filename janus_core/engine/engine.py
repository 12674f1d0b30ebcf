"""The engine: accepts understanding and generation requests from any thread and runs them batched.

Requests go in with `add_request(request, sink)`; everything the engine has to say about a request
reaches `sink` (called on the engine thread): `TokenOutput` / `ProgressOutput` while it runs, then
exactly one `FinishedOutput` or `FailedOutput`. `cancel(request_id)` removes a request at its next
step without disturbing the others.

Each `step` is: take in new requests (validate, tokenize), let the `Scheduler` (plain Python)
drop cancelled requests, make room in the KV block pool (preempting if it must) and admit waiting
ones, prefill the admitted ones, run one decode step per kind over every running request
(`GenerationBatch`, `UnderstandingBatch` on one `ModelRunner`), then update from the sampled
tokens: stream them, finish requests, VQ-decode finished images together. A flow model (JanusFlow)
generates with `FlowBatch` instead: one ODE step per engine step for every running image, its
finished images VAE-decoded together (on CUDA off the model loop, answered at a later step).

KV memory is one pool of blocks (`janus_core.sched.block_pool`) sized at start-up by
`janus_core.engine.memory`: an explicit size, or on CUDA a share of the device after the weights and a
measured activation peak. The engine knows tokens, pixels and tensors; not HTTP, queues or PNG
encoding.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from janus_core.engine import memory
from janus_core.errors import InvalidRequestError
from janus_core.models.loader import LoadedModel
from janus_core.sampling.sampler import SamplingParams
from janus_core.sched.block_pool import BLOCK_SIZE, BlockPool
from janus_core.sched.kv_manager import KVManager
from janus_core.sched.scheduler import KINDS, Scheduler, Sequence, Status
from janus_core.simple.generate import GenerateResult
from janus_core.simple.understand import UnderstandResult
from janus_core.step.flow_batch import FlowBatch, PixelDecoder, flow_profile_peak
from janus_core.step.runner import ModelRunner
from janus_core.step.text_batch import UnderstandingBatch, UnderstandingState
from janus_core.step.vq_batch import GenerationBatch, GenerationState
from janus_core.text.conversation import Message
from janus_core.text.stops import StopMatcher

log = logging.getLogger(__name__)
ROOM_TO_GROW = 64  # blocks (1,024 tokens) kept after an understanding prompt for its answer, CPU attention only

@dataclass
class UnderstandRequest:
    """One prompt about `images`, or (with `messages`) a whole conversation whose images are `images`
    in order; `prompt` is then unused. `raw` (a plain completion): `prompt`, or `prompt_ids`, is the whole
    prompt, without the chat format. The answer ends at EOS, `max_new_tokens` or a `stop` string."""

    request_id: str
    prompt: str
    images: list[Image.Image]
    max_new_tokens: int = 256
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[Message] | None = None
    stop: list[str] = field(default_factory=list)
    raw: bool = False
    prompt_ids: list[int] | None = None


@dataclass
class GenerateRequest:
    """`cfg_weight` None: the model's default (5.0 for VQ models, 2.0 for flow ones). `steps`: a flow model's
    ODE steps (None: 30); a VQ model refuses it. `given`: the sampling parameters the client set (a flow
    model refuses temperature and top_p, which mean nothing to it; only `params.seed` applies)."""

    request_id: str
    prompt: str
    n: int = 1
    cfg_weight: float | None = None
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0))
    steps: int | None = None
    given: frozenset[str] = frozenset()


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
    max_batch_size: int = 16  # running images + understanding sequences; it does not size memory
    max_images: int = 4  # images per understanding request
    max_new_tokens: int = 2048
    max_context: int | None = None  # understanding prompt + new tokens; None: the model's
    max_generation_prompt: int = 512  # generation prompt tokens
    max_prefill_tokens: int = 8192  # prompt tokens admitted per step (at least one request always is)
    kv_cache_memory: int | None = None  # bytes of KV pool; None: from the device (CUDA) or a CPU default
    gpu_memory_utilization: float = 0.90  # CUDA: the share of the device the engine may fill
    prefix_caching: bool = True  # keep full KV blocks for reuse by later prompts with the same start
    attention: str = "auto"  # decode attention over the pool: "runs", "flex", or auto (flex on CUDA)
    vision_cache_bytes: int = 256 * 2**20
    compile: bool = False  # decode steps over flex attention as compiled static functions, one per batch bucket
    compile_backend: str = "inductor"  # torch.compile's backend for them ("eager": trace only, for tests)
    overlap: bool | None = None  # stream step t's outputs while the device runs step t+1; None: on CUDA only
    pack_cpu_linears: bool = True  # CPU fp32 only: oneDNN-packed weights (janus_core.step.packed_linear)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {self.max_context}")
        if self.max_generation_prompt < 1:
            raise ValueError(f"max_generation_prompt must be at least 1, got {self.max_generation_prompt}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.attention not in ("auto", "runs", "flex"):
            raise ValueError(f"attention must be auto, runs or flex, got {self.attention!r}")
        if self.vision_cache_bytes < 0:
            raise ValueError("vision_cache_bytes must be >= 0")


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
    prefix_cache_hits: int = 0  # understanding admissions that reused cached KV blocks
    prefix_cache_misses: int = 0
    prefix_tokens_reused: int = 0
    preemptions: int = 0
    kv_cache_bytes: int = 0
    kv_block_size: int = BLOCK_SIZE
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0  # held by running requests
    kv_blocks_cached: int = 0  # free, but holding reusable content until needed

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_blocks_total * self.kv_block_size

    @property
    def kv_usage_ratio(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class Engine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None) -> None:
        self.lm = lm
        self.config = cfg = config or EngineConfig()
        self.runner = ModelRunner(lm, compile=cfg.compile, pack_cpu_linears=cfg.pack_cpu_linears,
                                  compile_backend=cfg.compile_backend)
        context = min(cfg.max_context or lm.max_context, lm.max_context)
        per_token = memory.kv_bytes_per_token(lm.model.config.text_config, lm.dtype)
        self.capacity = memory.capacity(self._pool_bytes(per_token, context), per_token, lm.num_image_tokens)
        num_blocks = self.capacity.kv_tokens // BLOCK_SIZE
        if num_blocks < 1:
            raise ValueError(f"the KV pool holds no block: {memory.format_size(self.capacity.kv_cache_bytes)} at "
                             f"{per_token} bytes per token; give more --kv-cache-memory")
        log.info("%s (block size %d, %d blocks)", self.capacity.describe(), BLOCK_SIZE, num_blocks)
        self.kv = self.runner.new_kv(num_blocks, BLOCK_SIZE)
        if cfg.attention != "auto":
            self.kv.attention = cfg.attention
        if cfg.compile and self.kv.attention == "flex" and num_blocks > 1:
            # The compiled step pads its batch to a bucket; the padding rows write into the last block.
            num_blocks -= 1
            self.runner.scratch_slot = num_blocks * BLOCK_SIZE
        self.pool = BlockPool(num_blocks, BLOCK_SIZE)
        manager = KVManager(self.pool, prefix_caching=cfg.prefix_caching,
                            room_to_grow=ROOM_TO_GROW if self.kv.attention == "runs" else 0)
        self.understanding = UnderstandingBatch(
            lm, self.runner, self.kv, manager, vision_cache_bytes=cfg.vision_cache_bytes,
            max_images=cfg.max_images, max_new_tokens=cfg.max_new_tokens, max_context=context,
            max_running=cfg.max_batch_size)
        generator = FlowBatch if lm.kind == "flow" else GenerationBatch
        self.generation = generator(lm, self.runner, self.kv, max_images=cfg.max_batch_size,
                                    max_prompt_tokens=cfg.max_generation_prompt)
        self.scheduler = Scheduler(manager, max_running=cfg.max_batch_size, max_prefill_tokens=cfg.max_prefill_tokens)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: deque[tuple[Request, Sink]] = deque()
        self._cancelled: set[str] = set()
        self._sinks: dict[Sequence, Sink] = {}  # requests not yet answered
        self._stops: dict[Sequence, StopMatcher] = {}  # understanding requests with stop strings
        self._stats = EngineStats(kv_cache_bytes=self.kv.nbytes, kv_blocks_total=num_blocks)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._clear = False
        self._overlap = cfg.overlap if cfg.overlap is not None else lm.device.type == "cuda"
        self._pending: list[tuple[Sequence, Callable[[], None]]] = []  # held back while the device runs
        # Flow models on CUDA: VAE decodes off the model loop (janus_core.step.flow_batch.PixelDecoder).
        self.pixels: PixelDecoder | None = None
        if lm.kind == "flow" and lm.device.type == "cuda":
            self.pixels = PixelDecoder(lm.flow, self._notify)

    def _pool_bytes(self, per_token: int, context: int) -> int:
        """The KV pool's size: explicit, a share of the CUDA device, or the CPU default."""
        cfg, device = self.config, self.lm.device
        if cfg.kv_cache_memory is not None:
            return cfg.kv_cache_memory
        if device.type == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info(device)
            weights = torch.cuda.memory_allocated(device)
            others = max(total - free - torch.cuda.memory_reserved(device), 0)  # other processes, CUDA context
            rows = 2 * cfg.max_batch_size
            peak = (flow_profile_peak(self.lm, self.runner, cfg.max_prefill_tokens, rows) if self.lm.kind == "flow"
                    else self.runner.profile_peak(cfg.max_prefill_tokens, rows))
            return memory.pool_bytes(total, cfg.gpu_memory_utilization, weights, peak, others)
        # No device to measure: a laptop's share, or less when the batch cap could never use it.
        return min(memory.CPU_DEFAULT_KV_BYTES, 2 * cfg.max_batch_size * context * per_token)

    # --- any thread -------------------------------------------------------------------------------
    def add_request(self, request: Request, sink: Sink) -> None:
        with self._wakeup:
            self._inbox.append((request, sink))
            self._wakeup.notify()

    def _notify(self) -> None:
        with self._wakeup:
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
        if self.pixels is not None and (self._thread is None or not self._thread.is_alive()):
            self.pixels.close()

    def warm_up(self) -> None:
        """Compile for every batch bucket before requests arrive: on CUDA the flex decode attention, and
        with `compile` (on any device) the static decode step of each head, so serving never compiles.

        If it cannot be compiled on this torch/driver, log why and fall back: the eager step, or the
        per-row attention.
        """
        on_cuda = self.lm.device.type == "cuda"
        if self.kv.attention != "flex" or not (on_cuda or self.runner.compile):
            return
        import torch

        from janus_core.attention.paged import DecodeBatch

        started, rows = time.perf_counter(), 1
        try:
            while rows < 2 * 2 * self.config.max_batch_size:  # up to the bucket of the largest decode batch
                ids, positions = torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
                if self.runner.compile:  # block 0 is free: scratch for the warm-up
                    for head in ("text", "image") if rows <= self.config.max_batch_size else ("image",):
                        self.runner.decode_logits(self.kv, head, [[0]] * rows, [0] * rows, ids, positions)
                else:
                    batch = DecodeBatch.for_rows(self.kv, [[0]] * rows, [0] * rows)
                    self.runner.decode(batch, self.runner.embed_text(ids[:, None]), positions)
                rows *= 2
            if on_cuda:
                torch.cuda.synchronize(self.lm.device)
            log.info("compiled the %s for batches up to %d rows in %.1f s",
                     "static decode step" if self.runner.compile else "flex decode attention", rows // 2,
                     time.perf_counter() - started)
        except Exception:
            if self.runner.compile:
                log.exception("the static decode step failed to compile; decoding eager instead")
                self.runner.compile = False
            else:
                log.exception("flex decode attention failed to compile; using per-row attention instead")
                self.kv.attention = "runs"

    def clear_caches(self) -> None:
        """Forget cached KV blocks and vision features (from any thread; the next step sees it).

        Benchmarks measure the cold path with it; results never depend on the caches, only the work done does.
        """
        with self._lock:
            self._clear = True
            self._wakeup.notify()

    # --- engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        self.warm_up()
        while True:
            with self._wakeup:
                while not (self._inbox or self._cancelled or self.scheduler.has_work() or self._stopping
                           or self._decoded()):
                    self._wakeup.wait()
                if self._stopping and not self._inbox and not self.scheduler.has_work() and not self._decoding():
                    return
            self.step()

    def run_until_idle(self) -> None:
        """Step on the calling thread until nothing is left (for tests and benchmarks without `start`)."""
        while self.step():
            pass

    def step(self) -> bool:
        """One engine iteration over every request; False when there was nothing to do."""
        self._intake()
        if self._clear:
            self._clear = False
            self.pool.clear_cache()
            self.understanding.vision.clear()
        self._answer_decoded(wait=False)
        plan = self.scheduler.schedule()
        if plan.empty:
            self._flush()
            self._sync_counts()
            if self._decoding():  # nothing to step, images still in the VAE: wait for them
                self._answer_decoded(wait=True)
                return True
            return False
        for seq in plan.cancelled:
            self._fail(seq, "cancelled", "the request was cancelled")
        for seq in plan.prefill:
            self._guard(self._prefill, [seq], seq)
        launched = []
        for kind in KINDS:
            running = [s for s in plan.decode[kind] if s.status is Status.RUNNING]
            if running:
                started = time.perf_counter()
                chosen = self._launch(kind, running)
                if chosen is not None:
                    launched.append((kind, running, chosen, time.perf_counter() - started))
        self._flush()  # the previous step's streaming, while the device runs this one (CUDA)
        if launched:
            try:
                self._collect(launched)
            except Exception as exc:  # the rows' device state is suspect now: rebuild it next step
                self.understanding.reset_rows()
                self.generation.reset_rows()
                self._failed([s for _, seqs, _, _ in launched for s in seqs], exc)
        if not self.scheduler.has_work():  # no next step to overlap with: answer now
            self._flush()
        self._sync_counts()
        return True

    def _launch(self, kind: str, seqs: list[Sequence]):
        """Queue one decode step of `kind` on the device; its chosen tokens stay there until `_collect`."""
        batch = self.understanding if kind == "understand" else self.generation
        try:
            return batch.launch(seqs)
        except Exception as exc:
            batch.reset_rows()
            self._failed(seqs, exc)
            return None

    def _collect(self, launched: list) -> None:
        """One copy of every token this step chose, then the bookkeeping. While the device still runs the
        step (CUDA queues it), new requests are validated and tokenized: their host work overlaps it."""
        started = time.perf_counter()
        chosen = torch.cat([c for _, _, c, _ in launched])
        if chosen.is_cuda:
            host = chosen.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._intake()
            done.synchronize()
        else:
            host = chosen
        tokens = host.tolist()
        waited = time.perf_counter() - started
        at = 0
        for kind, seqs, _, seconds in launched:
            rows = len(seqs) if kind == "understand" else sum(s.data.n for s in seqs)
            mine, at = tokens[at:at + rows], at + rows
            self._record_step(kind, len(seqs), seconds + waited)
            if kind == "understand":
                for seq, token in zip(seqs, mine, strict=True):
                    self._on_tokens(seq, token)
            else:
                self._on_codes(seqs, self.generation.record(seqs, mine))

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
            seq = self.understanding.prepare(request.request_id, request.images, request.prompt,
                                             request.max_new_tokens, request.params, messages=request.messages,
                                             raw=request.raw, prompt_ids=request.prompt_ids)
        elif isinstance(self.generation, FlowBatch):
            seq = self.generation.prepare(request.request_id, request.prompt, request.n, request.cfg_weight,
                                          request.steps, request.params.seed, request.given)
        else:
            if request.steps is not None:
                raise InvalidRequestError("steps applies to rectified-flow models (JanusFlow); this model generates "
                                          "VQ tokens, one step per image token: leave it out")
            cfg_weight = 5.0 if request.cfg_weight is None else request.cfg_weight
            seq = self.generation.prepare(request.request_id, request.prompt, request.n, cfg_weight, request.params)
        manager = self.scheduler.kv
        if not manager.fits(seq):
            if seq.kind == "understand":
                what = f"a prompt of {seq.prompt_tokens} tokens plus max_new_tokens {seq.max_tokens}"
            elif seq.flow:
                what = f"a flow prompt of {seq.prompt_tokens} tokens (cond and uncond rows)"
            else:
                what = f"{seq.width} image(s) of {seq.prompt_tokens} prompt + {seq.max_tokens} image tokens with CFG"
            raise InvalidRequestError(
                f"{what} need {manager.blocks_needed(seq) * BLOCK_SIZE} KV positions; the engine's KV pool holds "
                f"{self.pool.num_blocks * BLOCK_SIZE} ({memory.format_size(self.kv.nbytes)})")
        return seq

    def _prefill(self, seq: Sequence) -> None:
        if seq.kind == "understand":
            self._on_tokens(seq, self.understanding.prefill(seq))
        elif seq.flow:  # prompt KV only: its first ODE step is the next step's, with the others
            self.generation.prefill(seq)
        else:
            self._on_codes([seq], [self.generation.prefill(seq)])

    # --- update from output -----------------------------------------------------------------------
    def _on_tokens(self, seq: Sequence, token: int) -> None:
        done = self.scheduler.update(seq, token)
        if self._overlap and seq not in self._stops:  # whether it goes on depends on the token id alone
            self._pending.append((seq, lambda: self._stream_token(seq, token, done)))
        else:
            self._stream_token(seq, token, done)

    def _stream_token(self, seq: Sequence, token: int, done: bool) -> None:
        """Detokenize and stream one token; answer the request when it was its last."""
        state: UnderstandingState = seq.data
        stops = self._stops.get(seq)
        if seq.finish_reason != "stop":
            delta = self.understanding.push(seq, token)
            if stops is not None:
                delta = stops.feed(delta, armed=len(state.out) >= state.params.min_tokens)
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
        for seq, step_codes in zip(seqs, codes, strict=True):  # a flow model's "codes": its steps so far
            done = self.scheduler.update(seq, step_codes[0])
            progress = ProgressOutput(seq.request_id, seq.data.steps, seq.max_tokens)
            if self._overlap:
                self._pending.append((seq, lambda seq=seq, p=progress: self._emit(self._sinks[seq], p)))
            else:
                self._emit(self._sinks[seq], progress)
            if done:
                finished.append(seq)
        if not finished:
            return
        if self._overlap and not isinstance(self.generation, FlowBatch):  # VQ decoding, one image at a time
            for seq in finished:
                self._pending.append((seq, functools.partial(self._guard, self._finish_images, [seq], [seq])))
        else:  # a flow model's VAE decodes the step's finished images together (off the loop on CUDA)
            self._guard(self._finish_images, finished, finished)

    def _flush(self, seq: Sequence | None = None) -> None:
        """Run the streaming and answers held back for overlap: all of them, or those of `seq`."""
        if not self._pending:
            return
        mine = [item for item in self._pending if seq is None or item[0] is seq]
        self._pending = [item for item in self._pending if seq is not None and item[0] is not seq]
        for owner, fn in mine:
            if owner in self._sinks:
                self._guard(fn, [owner])

    def _decoding(self) -> bool:
        return self.pixels is not None and self.pixels.pending

    def _decoded(self) -> bool:
        return self.pixels is not None and self.pixels.ready

    def _answer_decoded(self, wait: bool) -> None:
        """Answer the requests whose VAE decode (off the model loop) has finished."""
        if self.pixels is None:
            return
        for seqs, pixels in self.pixels.done(wait=wait):
            if isinstance(pixels, BaseException):
                log.error("VAE decode failed for %s: %s", [s.request_id for s in seqs], pixels)
                for seq in seqs:
                    self._fail(seq, "internal", f"{type(pixels).__name__}: {pixels}")
                continue
            for seq, one in zip(seqs, pixels, strict=True):
                self._answer_image(seq, one)

    def _answer_image(self, seq: Sequence, pixels) -> None:
        state: GenerationState = seq.data
        with self._lock:
            self._stats.images_generated += state.n
        self._succeed(seq, GenerateResult(state.seed, state.tokens, pixels))

    def _finish_images(self, seqs: list[Sequence]) -> None:
        if self.pixels is not None:
            self.generation.decode_later(seqs, self.pixels)
            return
        for seq, pixels in zip(seqs, self.generation.decode_pixels(seqs), strict=True):
            self._answer_image(seq, pixels)

    # --- helpers ----------------------------------------------------------------------------------
    def _guard(self, fn: Callable[..., None], seqs: list[Sequence], *args) -> None:
        """Run `fn`; if it raises, fail `seqs` (the batch it was running) and keep the engine going."""
        try:
            fn(*args)
        except Exception as exc:
            self._failed(seqs, exc)

    def _failed(self, seqs: list[Sequence], exc: Exception) -> None:
        log.error("step failed for %s", [s.request_id for s in seqs], exc_info=exc)
        for seq in seqs:
            self.scheduler.fail(seq)
            if seq in self._sinks:
                self._fail(seq, "internal", f"{type(exc).__name__}: {exc}")

    def _succeed(self, seq: Sequence, result: UnderstandResult | GenerateResult) -> None:
        self._flush(seq)  # what it streamed before its answer reaches its client first
        self._count(failed=False)
        self._emit(self._sinks.pop(seq), FinishedOutput(seq.request_id, result))

    def _fail(self, seq: Sequence, reason: str, message: str) -> None:
        self._flush(seq)  # what it streamed before the failure reaches its client first
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
            s.prefix_tokens_reused = c.prefix_tokens_reused
            s.preemptions = self.scheduler.preemptions
            s.kv_blocks_used, s.kv_blocks_cached = self.pool.num_used, self.pool.num_cached_free

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
