"""The engine: accepts understanding and generation requests from any thread and runs them batched.

Requests go in with `add_request(request, sink)`; everything the engine has to say about a request
reaches `sink` (called on the engine thread, by the `OutputProcessor`): `TokenOutput` /
`ProgressOutput` / `PreviewOutput` while it runs, then exactly one `FinishedOutput` or `FailedOutput`.
`cancel(request_id)` removes a request at its next step without disturbing the others.

Each `step` is: take in new requests (validated and tokenized by their batch), let the `Scheduler`
(plain Python) drop cancelled requests, make room in the KV block pool (preempting if it must) and
admit waiting ones; prefill the admitted ones (their first tokens go out before the others' step, as
time to first token wants), then launch one decode step per request kind; copy what the device chose to
the host at once; hand each batch's step outputs to the output processor, which streams them,
finishes requests and answers them. The batches (`janus_core.step`) share one
contract, so the engine never asks which model it runs. With overlap (CUDA), the previous step's
streaming runs while the device computes this one: `outputs.flush()` between launch and update.

KV memory is one pool of blocks (`janus_core.sched.block_pool`) sized at start-up by
`janus_core.engine.memory`: an explicit size, or on CUDA a share of the device after the weights and
a measured activation peak. The engine knows sequences, batches and tensors' lifetimes; not HTTP,
queues or PNG encoding.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque

from janus_core.engine import memory
from janus_core.engine.config import EngineConfig, EngineStats
from janus_core.engine.outputs import OutputProcessor
from janus_core.engine.previews import Previews
from janus_core.errors import InvalidRequestError
from janus_core.models.loader import LoadedModel
from janus_core.requests import GenerateRequest, Request, Sink
from janus_core.sched.block_pool import BLOCK_SIZE, BlockPool
from janus_core.sched.kv_manager import KVManager
from janus_core.sched.scheduler import KINDS, Scheduler
from janus_core.sched.sequence import Sequence, Status
from janus_core.step.batch import Batch, Launch, fetch
from janus_core.step.batches import image_batch
from janus_core.step.runner import ModelRunner
from janus_core.step.text_batch import TextBatch

log = logging.getLogger(__name__)
ROOM_TO_GROW = 64  # blocks (1,024 tokens) kept after an understanding prompt for its answer, CPU attention only


class Engine:
    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None) -> None:
        self.lm = lm
        self.config = cfg = config or EngineConfig()
        self.runner = ModelRunner(lm, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs,
                                  pack_cpu_linears=cfg.pack_cpu_linears, compile_backend=cfg.compile_backend)
        images = image_batch(lm.generator)
        context = min(cfg.max_context or lm.max_context, lm.max_context)
        per_token = memory.kv_bytes_per_token(lm.model.config.text_config, lm.dtype)
        peak = functools.partial(images.profile_peak, lm, self.runner, cfg.max_prefill_tokens)  # (rows) -> bytes
        pool_bytes = memory.engine_pool_bytes(cfg, lm.device, per_token, context, peak)
        self.capacity = memory.capacity(pool_bytes, per_token, lm.num_image_tokens)
        num_blocks = self.capacity.kv_tokens // BLOCK_SIZE
        if num_blocks < 1:
            raise ValueError(f"the KV pool holds no block: {memory.format_size(self.capacity.kv_cache_bytes)} at "
                             f"{per_token} bytes per token; give more --kv-cache-memory")
        log.info("%s (block size %d, %d blocks)", self.capacity.describe(), BLOCK_SIZE, num_blocks)
        self.kv = self.runner.new_kv(num_blocks, BLOCK_SIZE)
        if cfg.attention != "auto":
            self.kv.attention = cfg.attention
        if (cfg.compile or cfg.cuda_graphs) and self.kv.attention == "flex" and num_blocks > 1:
            # The static step pads its batch to a bucket; the padding rows write into the last block.
            num_blocks -= 1
            self.runner.scratch_slot = num_blocks * BLOCK_SIZE
            # the static step's tables: as wide as each kind's longest row (+1 block for images), shapes fixed
            image_row = cfg.max_generation_prompt + lm.num_image_tokens
            self.runner.row_blocks = {"text": -(-context // BLOCK_SIZE), "image": -(-image_row // BLOCK_SIZE) + 1}
        self.pool = BlockPool(num_blocks, BLOCK_SIZE)
        manager = KVManager(self.pool, prefix_caching=cfg.prefix_caching,
                            room_to_grow=ROOM_TO_GROW if self.kv.attention == "runs" else 0)
        self.scheduler = Scheduler(manager, max_running=cfg.max_batch_size, max_prefill_tokens=cfg.max_prefill_tokens)
        self.text = TextBatch(lm, self.runner, self.kv, manager, vision_cache_bytes=cfg.vision_cache_bytes,
                              max_images=cfg.max_images, max_new_tokens=cfg.max_new_tokens, max_context=context,
                              max_running=cfg.max_batch_size)
        generation = images(lm, self.runner, self.kv, max_images=cfg.max_batch_size,
                            max_prompt_tokens=cfg.max_generation_prompt, wake=self._notify)
        self.batches: dict[str, Batch] = {batch.kind: batch for batch in (self.text, generation)}
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: deque[tuple[Request, Sink]] = deque()
        self._cancelled: set[str] = set()
        self._stats = EngineStats(kv_cache_bytes=self.kv.nbytes, kv_blocks_total=num_blocks)
        overlap = cfg.overlap if cfg.overlap is not None else lm.device.type == "cuda"
        self.outputs = OutputProcessor(self.scheduler, lm.tokenizer, self._stats, self._lock, overlap=overlap)
        self.previews = Previews(lm.device, cfg.preview_share, self._notify)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._clear = False

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
        if self._thread is None or not self._thread.is_alive():
            for batch in self.batches.values():
                batch.close()

    def warm_up(self) -> None:
        """Compile the decode step for every batch bucket before requests arrive (`ModelRunner.warm_up`)."""
        self.runner.warm_up(self.kv, self.config.max_batch_size)

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
                           or any(b.ready for b in self.batches.values()) or self.previews.ready):
                    self._wakeup.wait()
                if (self._stopping and not self._inbox and not self.scheduler.has_work()
                        and not any(b.pending for b in self.batches.values())):
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
            for batch in self.batches.values():
                batch.clear_caches()
        self._collect_decoded(wait=False)
        self.outputs.preview(self.previews.collect())
        plan = self.scheduler.schedule()
        self.previews.forget()  # after the plan: it marks the cancelled
        if plan.empty:
            return self._idle()
        for seq in plan.cancelled:
            self.outputs.fail(seq, "cancelled", "the request was cancelled")
        prefills = [self._launch(self.batches[seq.kind], [seq], prefill=True) for seq in plan.prefill]
        self._update([launch for launch in prefills if launch is not None])  # first tokens before the others' step
        launches = [self._launch(self.batches[kind], seqs) for kind, seqs in plan.decode.items() if seqs]
        self.outputs.flush()  # overlap: the previous step's streaming, while the device runs this one
        self._update([launch for launch in launches if launch is not None])
        if not self.scheduler.has_work():  # no next step to overlap with: answer now
            self.outputs.flush()
        self._sync_counts()
        return True

    def _launch(self, batch: Batch, seqs: list[Sequence], prefill: bool = False) -> Launch | None:
        """Queue a prefill or one decode step on the device; a failure fails just these sequences."""
        seqs = [s for s in seqs if s.status is Status.RUNNING]
        if not seqs:
            return None
        started = time.perf_counter()
        if prefill:
            seqs[0].stamps.setdefault("prefill", time.time())
        try:
            chosen = batch.prefill(seqs[0]) if prefill else batch.launch(seqs)
        except Exception as exc:
            if not prefill:
                batch.reset()
            self.outputs.fail_step(seqs, exc)
            return None
        if prefill and chosen is None:  # prompt KV only (flow): nothing to report yet
            return None
        return Launch(batch, seqs, chosen, prefill, time.perf_counter() - started)

    def _update(self, launches: list[Launch]) -> None:
        """Copy what the step chose to the host, then hand each batch's outputs to the output processor."""
        try:
            chosen, waited = fetch(launches, while_waiting=self._intake)
            for launch, tokens in zip(launches, chosen, strict=True):
                if not launch.prefill:
                    self._record_step(launch.batch.kind, len(launch.seqs), launch.seconds + waited)
                outputs = launch.batch.update(launch.seqs, tokens)
                self.outputs.update(launch.batch, outputs, hold=not launch.prefill)
                self.previews.offer(launch.batch, outputs)
        except Exception as exc:  # the rows' device state is suspect now: rebuild it next step
            for batch in self.batches.values():
                batch.reset()
            self.outputs.fail_step([s for launch in launches for s in launch.seqs], exc)

    def _intake(self) -> None:
        """Move new requests into the scheduler (validated and tokenized) and pass on cancellations."""
        with self._lock:
            inbox, self._inbox = self._inbox, deque()
            cancelled, self._cancelled = self._cancelled, set()
        for request, sink in inbox:
            if request.request_id in cancelled:
                cancelled.discard(request.request_id)
                self.outputs.refuse(request.request_id, sink, "cancelled", "the request was cancelled")
                continue
            try:
                seq = self._prepare(request)
            except InvalidRequestError as exc:
                self.outputs.refuse(request.request_id, sink, "invalid", str(exc))
                continue
            except Exception as exc:  # a request must never take the engine down
                log.exception("request %s could not be prepared", request.request_id)
                self.outputs.refuse(request.request_id, sink, "internal", f"{type(exc).__name__}: {exc}")
                continue
            self.outputs.add(seq, sink)
            self.scheduler.add(seq)
            if isinstance(request, GenerateRequest) and request.previews:
                self.previews.add(seq, request.previews, seq.max_steps)
        for request_id in cancelled:
            self.scheduler.cancel(request_id)

    def _prepare(self, request: Request) -> Sequence:
        seq = self.batches[request.kind].prepare(request)
        manager = self.scheduler.kv
        if not manager.fits(seq):
            raise InvalidRequestError(
                f"{seq.layout.describe(seq)} need {manager.blocks_needed(seq) * BLOCK_SIZE} KV positions; the "
                f"engine's KV pool holds {self.pool.num_blocks * BLOCK_SIZE} ({memory.format_size(self.kv.nbytes)})")
        return seq

    def _idle(self) -> bool:
        """Nothing to step: answer what was held back; wait for images still in a background decoder."""
        self.outputs.flush()
        self._sync_counts()
        if not any(batch.pending for batch in self.batches.values()):
            return False
        self._collect_decoded(wait=True)
        return True

    def _collect_decoded(self, wait: bool) -> None:
        for batch in self.batches.values():
            self.outputs.collect(batch, wait=wait and batch.pending)

    # --- counters ---------------------------------------------------------------------------------
    def _sync_counts(self) -> None:
        c = self.text.counters
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
