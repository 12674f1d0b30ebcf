"""The worker: pulls jobs from a `JobQueue`, runs them on the `Engine`, sends events back.

One worker owns one engine (one GPU). It claims as many jobs as the engine has free slots, drops
expired or cancelled ones without running them, decodes images, and forwards engine outputs to the
queue. PNG encoding and image decoding run in threads, never on the engine thread or the event
loop. Cancellation and deadlines are checked while jobs run; the engine stops them at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from janus_core import (
    IMAGE_FORMATS,
    Engine,
    EngineOutput,
    FailedOutput,
    FinishedOutput,
    GenerateRequest,
    GenerateResult,
    InvalidRequestError,
    PreviewOutput,
    ProgressOutput,
    SamplingParams,
    TokenOutput,
    UnderstandRequest,
    UnderstandResult,
    decode_image,
    encode_image,
    gpu_memory_allocated,
)
from server import jobs as J
from server import tracing
from server.gpus import device_label
from server.jobs import MAX_PREVIEWS, GenerateParams, Job, UnderstandParams
from server.logs import request_id_var
from server.metrics import Metrics
from server.queue import JobQueue
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Running:
    job: Job
    outputs: asyncio.Queue[EngineOutput] = field(default_factory=asyncio.Queue)
    started: float = field(default_factory=time.time)  # claimed: epoch seconds
    first_token: bool = True
    streamed: str = ""  # text already sent as deltas
    stop_reason: str | None = None  # set when we asked the engine to stop the job
    stamps: dict[str, float] = field(default_factory=dict)  # its phases (server.jobs.PHASES), once it has a result
    previewing: asyncio.Task | None = None  # encoding and sending a preview
    # One publish at a time: a queue numbers a job's events as they are sent, and a preview (hundreds of KB) sent
    # beside a progress event could arrive after it and be taken for a repeat.
    publishing: asyncio.Lock = field(default_factory=asyncio.Lock)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, queue: JobQueue, engine: Engine, settings: Settings, *, worker_id: str | None = None,
                 metrics: Metrics | None = None) -> None:
        self.queue = queue
        self.engine = engine
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self.metrics = metrics
        self._running: dict[str, _Running] = {}
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        device = engine.lm.device
        self.gpu = device_label(device.type, device.index)  # its heartbeat says where it runs: /ready counts it

    async def run(self, stop: asyncio.Event) -> None:
        """Serve jobs until `stop` is set, then finish the running ones (graceful drain)."""
        loop = asyncio.get_running_loop()
        background = [loop.create_task(self._heartbeats(stop)), loop.create_task(self._watchdog(stop))]
        try:
            while not stop.is_set():
                slots = self.engine.free_slots()
                if slots == 0:
                    self._slot_freed.clear()
                    await _wait_any(self._slot_freed, stop, timeout=0.5)
                    continue
                try:
                    claimed = await self.queue.claim(self.worker_id, slots, timeout=0.5)
                except Exception as exc:  # the backend is down: keep trying, never die
                    log.warning("claim failed: %s", exc)
                    await _wait_any(stop, timeout=1.0)
                    continue
                for job in claimed:
                    await self._start_or_release(job)
            await self.drain(timeout=self.settings.request_timeout)
        finally:
            for task in background:
                task.cancel()

    async def drain(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while self._tasks and time.time() < deadline:
            await asyncio.wait(set(self._tasks), timeout=max(deadline - time.time(), 0.01))

    # --- one job ----------------------------------------------------------------------------------
    async def _start_or_release(self, job: Job) -> None:
        """Start `job`; if that fails unexpectedly (a payload the frontends never produce, e.g. a
        non-numeric temperature), hand it back instead of letting the worker die, so a malformed job
        ends in the dead-letter stream after `max_deliveries` tries."""
        try:
            await self._start(job)
        except Exception as exc:
            log.exception("job %s could not be started; handing it back", job.id)
            try:
                if not await self.queue.release(self.worker_id, [job.id]):
                    await self.queue.finish(job.id, J.error_event(J.INTERNAL, f"the job could not be started: {exc}"))
            except Exception:
                log.exception("job %s: could not hand it back", job.id)

    async def _start(self, job: Job) -> None:
        request_id_var.set(job.request_id or job.id)  # this claim loop's context; _pump copies it
        if self.metrics:
            self.metrics.queue_wait.labels(job.kind).observe(max(time.time() - job.created, 0.0))
        running = _Running(job)
        if job.expired():
            await self._end(running, J.error_event(J.DEADLINE_EXCEEDED, "the deadline passed while queued"))
            return
        if await self.queue.is_cancelled(job.id):
            await self._end(running, J.error_event(J.CANCELLED, "the request was cancelled"))
            return
        try:
            request = await asyncio.to_thread(self._to_request, job)
        except InvalidRequestError as exc:
            await self._end(running, J.error_event(J.INVALID_ARGUMENT, str(exc)))
            return
        self._running[job.id] = running
        loop = asyncio.get_running_loop()
        self.engine.add_request(request, lambda out: loop.call_soon_threadsafe(running.outputs.put_nowait, out))
        task = loop.create_task(self._pump(running))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _to_request(self, job: Job) -> UnderstandRequest | GenerateRequest:
        p = job.params
        if isinstance(p, UnderstandParams):
            images = [decode_image(data, max_pixels=self.settings.max_image_pixels,
                                   min_side=self.settings.min_image_side, label=f"images[{i}]")
                      for i, data in enumerate(p.images)]
            messages = J.job_messages(p.messages) if p.messages is not None else None
            return UnderstandRequest(job.id, p.prompt, images, p.max_new_tokens, SamplingParams(**p.sampling()),
                                     messages=messages, stop=[s for s in p.stop if isinstance(s, str) and s],
                                     raw=bool(p.raw), prompt_ids=p.prompt_ids)
        assert isinstance(p, GenerateParams)
        if p.output_format not in IMAGE_FORMATS:
            raise InvalidRequestError(f"output_format must be one of {', '.join(IMAGE_FORMATS)}")
        given = frozenset(name for name in ("temperature", "top_p") if getattr(p, name) is not None)
        sampling = SamplingParams(1.0 if p.temperature is None else p.temperature, 1.0 if p.top_p is None else p.top_p,
                                  p.seed)
        return GenerateRequest(job.id, p.prompt, p.n, p.cfg_weight, sampling, steps=p.steps, given=given,
                               previews=min(max(p.previews, 0), MAX_PREVIEWS) if job.stream else 0)

    async def _pump(self, running: _Running) -> None:
        job = running.job
        log.info("running %s job %s", job.kind, job.id)
        try:
            while True:
                out = await running.outputs.get()
                if isinstance(out, TokenOutput):
                    self._first_token(running)
                    if job.stream and out.delta:
                        running.streamed += out.delta
                        await self._publish(running, J.delta_event(out.delta))
                elif isinstance(out, ProgressOutput):
                    if job.stream:
                        await self._publish(running, J.progress_event(out.step, out.total))
                elif isinstance(out, PreviewOutput):
                    self._preview(running, out)
                elif isinstance(out, FinishedOutput):
                    await self._flush_text(running, out)
                    await self._end(running, await self._result_event(running, out))
                    log.info("finished job %s in %.3f s", job.id, time.time() - running.started)
                    return
                elif isinstance(out, FailedOutput):
                    await self._stop_preview(running)  # before a hand-back, too
                    if out.reason == "internal" and await self.queue.release(self.worker_id, [job.id]):
                        log.warning("job %s failed (%s); handed back for another delivery", job.id, out.message)
                        return
                    event = self._failure_event(running, out)
                    log.info("stopped job %s after %.3f s: %s", job.id, time.time() - running.started,
                             event.get("code"))
                    await self._end(running, event)
                    return
        except Exception as exc:  # report, so the client never waits in silence
            log.exception("job %s: forwarding its result failed", job.id)
            try:
                await self._end(running, J.error_event(J.INTERNAL, f"worker failed: {exc}"))
            except Exception:
                log.exception("job %s: could not report the failure", job.id)
        finally:
            self._running.pop(job.id, None)
            self._slot_freed.set()

    def _preview(self, running: _Running, out: PreviewOutput) -> None:
        """Encode and send a preview beside the job (never before its next outputs); skipped while the last one
        is still being encoded."""
        if running.previewing is not None and not running.previewing.done():
            return
        job = running.job
        assert isinstance(job.params, GenerateParams)
        fmt, quality = job.params.output_format, job.params.output_compression

        async def send() -> None:
            encoded = await asyncio.to_thread(lambda: [encode_image(img, fmt, quality) for img in out.images])
            for i, data in enumerate(encoded):
                await self._publish(running, J.preview_event(out.step, out.total, i, data))

        running.previewing = asyncio.get_running_loop().create_task(send())
        running.previewing.add_done_callback(_log_failure)

    async def _publish(self, running: _Running, event: dict) -> None:
        async with running.publishing:
            await self.queue.publish(running.job.id, event)

    @staticmethod
    async def _stop_preview(running: _Running) -> None:
        """A preview still on its way when the job ends is dropped: the result is what the client waits for."""
        task = running.previewing
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])  # its end, not its outcome (a cancel of this task itself still raises)

    async def _flush_text(self, running: _Running, out: FinishedOutput) -> None:
        """Send the text the incremental decoder held back (an unfinished UTF-8 sequence at the end)."""
        result = out.result
        if running.job.stream and isinstance(result, UnderstandResult) and result.text.startswith(running.streamed):
            rest = result.text[len(running.streamed):]
            if rest:
                running.streamed += rest
                await self._publish(running, J.delta_event(rest))

    def _first_token(self, running: _Running) -> None:
        if running.first_token:
            running.first_token = False
            if self.metrics:
                self.metrics.ttft.observe(time.time() - running.started)

    async def _result_event(self, running: _Running, out: FinishedOutput) -> dict:
        """The result event, with its `timings` (the phases of the job, `server.jobs.PHASES`)."""
        result, job = out.result, running.job
        if isinstance(result, UnderstandResult):
            event = J.understand_result(result.text, result.finish_reason, result.prompt_tokens,
                                        result.completion_tokens)
        else:
            assert isinstance(result, GenerateResult) and isinstance(job.params, GenerateParams)
            fmt, quality = job.params.output_format, job.params.output_compression
            event = await asyncio.to_thread(
                lambda: J.generate_result(result.seed, [encode_image(img, fmt, quality) for img in result.images],
                                          fmt, result.prompt_tokens, result.image_tokens))
        running.stamps = {"created": job.created, "claimed": running.started, **out.stamps}
        if job.kind == "generate":
            running.stamps["decoded"] = out.stamps["done"]
        running.stamps["encoded"] = time.time()
        event["timings"] = J.timings_ms(J.phase_seconds(running.stamps))
        return event

    async def _end(self, running: _Running, event: dict) -> None:
        """Store the job's terminal event; record its phases (metrics, and spans when tracing is on)."""
        await self._stop_preview(running)
        await self.queue.finish(running.job.id, event)
        job, stamps = running.job, running.stamps or {"created": running.job.created, "claimed": running.started}
        try:
            if event["type"] == "result" and self.metrics:
                for phase, seconds in J.phase_seconds(stamps).items():
                    self.metrics.request_phase.labels(job.kind, phase).observe(seconds)
            tracing.record_job(job, stamps if event["type"] == "result" else {**stamps, "ended": time.time()},
                               J.terminal_status(event))
        except Exception:  # the job has ended well; what records it must not say otherwise
            log.exception("job %s: recording its phases failed", job.id)

    @staticmethod
    def _failure_event(running: _Running, out: FailedOutput) -> dict:
        if out.reason == "invalid":
            return J.error_event(J.INVALID_ARGUMENT, out.message)
        if out.reason == "cancelled":
            if running.stop_reason == J.DEADLINE_EXCEEDED:
                return J.error_event(J.DEADLINE_EXCEEDED, "the request's deadline passed while it ran")
            return J.error_event(J.CANCELLED, out.message)
        return J.error_event(J.INTERNAL, out.message)

    # --- background -------------------------------------------------------------------------------
    async def _watchdog(self, stop: asyncio.Event) -> None:
        """Stop running jobs whose client cancelled or whose deadline passed."""
        while True:
            await asyncio.sleep(0.1)
            now = time.time()
            live = {job_id: r for job_id, r in self._running.items() if r.stop_reason is None}
            if not live:
                continue
            try:
                cancelled = await self.queue.cancelled(list(live))
            except Exception:  # the queue is unreachable: deadlines still apply
                cancelled = set()
            for job_id, running in live.items():
                reason = J.DEADLINE_EXCEEDED if running.job.expired(now) else (
                    J.CANCELLED if job_id in cancelled else None)
                if reason:
                    running.stop_reason = reason
                    self.engine.cancel(job_id)

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while True:
            stats = self.engine.stats()
            if self.metrics:
                self.metrics.observe_engine(stats)
                self.metrics.observe_queue(self.queue.counters())
                self.metrics.heartbeat.labels(self.worker_id).set(time.time())
                gpu_bytes = gpu_memory_allocated(self.engine.lm.device)
                if gpu_bytes is not None:
                    self.metrics.gpu_memory.labels(self.worker_id).set(gpu_bytes)
            try:
                await self.queue.heartbeat(self.worker_id, {"running": sum(stats.running.values()),
                                                            "waiting": stats.waiting, "gpu": self.gpu})
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_interval)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a preview could not be sent: %s", task.exception())


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
