"""What both frontends (REST and gRPC) do with a request: validate, submit, follow, cancel.

Frontends convert their wire format into `UnderstandParams` / `GenerateParams`, call `submit`, and
iterate `follow` (events until the terminal one). Validation here is the cheap, synchronous part
that can answer 4xx before a job is queued; images are decoded (in a thread) to reject non-images
and decompression bombs at the edge.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, get_args

from PIL import Image

from janus_core import (
    InvalidRequestError,
    SamplingParams,
    limits,
    load_image,
    open_image,
)
from server import idempotency, tracing
from server.http.schemas import MAX_MESSAGES, NON_BLANK, OutputFormat
from server.jobs import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    MAX_PREVIEWS,
    GenerateParams,
    Job,
    JobState,
    UnderstandParams,
    error_event,
    job_messages,
)
from server.keys import KeyRing, Lease, Quotas, current_key, current_lease
from server.logs import request_id_var
from server.queue import IdempotencyConflict, JobQueue
from server.readiness import ReadyState, ready_state
from server.settings import Settings

log = logging.getLogger(__name__)


_JOB_ID = re.compile(r"[0-9a-f]{32}")


class BadRequest(Exception):
    """Invalid input; `status` is 400, 413 (too large) or 422."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class JobNotFound(Exception):
    """No such job for this caller (unknown, expired, or another key's: all look the same)."""


class JobGone(Exception):
    """The job's result was dropped before its time (the in-process queue's bounds); the message says why."""

    def __init__(self, message: str, state: JobState) -> None:
        super().__init__(message)
        self.state = state


class ServiceUnavailable(Exception):
    def __init__(self, message: str, retry_after: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _check_sampling(temperature: float, top_p: float, seed: int | None, **extensions: Any) -> None:
    """The engine's own rules (SamplingParams), answered at the edge as a 400."""
    try:
        SamplingParams(temperature, top_p, seed, **extensions)
    except (InvalidRequestError, TypeError) as exc:
        raise BadRequest(str(exc)) from exc


# A prompt needs a non-blank character: the class means the same in Python and in the ECMA dialect
# of JSON Schema patterns, so the OpenAPI document (server.http.schemas.NON_BLANK) says exactly this.
_NON_BLANK = re.compile(NON_BLANK)


def _check_prompt(settings: Settings, prompt: str) -> None:
    if not isinstance(prompt, str) or not _NON_BLANK.search(prompt):
        raise BadRequest("prompt must be a non-empty string")
    if len(prompt) > settings.max_prompt_chars:
        raise BadRequest(f"prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars}")


MAX_STOPS = 4  # OpenAI's limit


def _check_messages(settings: Settings, p: UnderstandParams) -> None:
    assert p.messages is not None
    if len(p.messages) > MAX_MESSAGES:
        raise BadRequest(f"the conversation has {len(p.messages)} messages; at most {MAX_MESSAGES} are allowed", 413)
    try:
        messages = job_messages(p.messages)
    except InvalidRequestError as exc:
        raise BadRequest(str(exc)) from exc
    chars = sum(len(m.text) for m in messages)
    if chars > settings.max_prompt_chars:
        raise BadRequest(f"the conversation's text is {chars} characters; the limit is {settings.max_prompt_chars}",
                         413)
    wanted = sum(m.num_images for m in messages)
    if wanted != len(p.images):
        raise BadRequest(f"the messages refer to {wanted} image(s) but {len(p.images)} were sent")


def _check_raw_prompt(settings: Settings, p: UnderstandParams) -> None:
    """A plain completion's prompt: text (with a non-blank character) or token ids, and no images."""
    if p.images or p.messages is not None:
        raise BadRequest("a plain completion takes a prompt only: no images, no messages")
    if p.prompt_ids is None:
        _check_prompt(settings, p.prompt)
        return
    ids = p.prompt_ids
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and 0 <= t < 2**31 for t in ids):
        raise BadRequest("a prompt of token ids must be a non-empty list of non-negative integers")
    if len(ids) > settings.max_prompt_chars:
        raise BadRequest(f"prompt is {len(ids)} tokens; the limit is {settings.max_prompt_chars}", 413)


def validate_understand(settings: Settings, p: UnderstandParams, *, require_image: bool = True) -> None:
    if p.raw or p.prompt_ids is not None:
        _check_raw_prompt(settings, p)
    elif p.messages is not None:
        _check_messages(settings, p)
    else:
        _check_prompt(settings, p.prompt)
        if require_image and not p.images:
            raise BadRequest("at least one image is required")
    if len(p.images) > settings.max_images:
        where = "in one conversation" if p.messages is not None else "per request"
        raise BadRequest(f"{len(p.images)} images given; at most {settings.max_images} {where}")
    if len(p.stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in p.stop):
        raise BadRequest(f"stop takes at most {MAX_STOPS} non-empty strings, got {p.stop!r}")
    for i, data in enumerate(p.images):
        if len(data) > settings.max_image_bytes:
            raise BadRequest(f"images[{i}] is {len(data)} bytes; the limit is {settings.max_image_bytes}", 413)
    if not (1 <= p.max_new_tokens <= settings.max_new_tokens):
        raise BadRequest(f"max_new_tokens must be between 1 and {settings.max_new_tokens}, got {p.max_new_tokens}")
    _check_sampling(**p.sampling())
    if p.min_tokens > p.max_new_tokens:
        raise BadRequest(f"min_tokens ({p.min_tokens}) must be at most the answer's maximum length "
                         f"({p.max_new_tokens})")


OUTPUT_FORMATS = get_args(OutputFormat)  # as janus_core.IMAGE_FORMATS


def validate_generate(settings: Settings, p: GenerateParams, generator: str | None = None) -> None:
    """`generator`: the loaded model's kind ("vq" or "flow"), None when this process does not know it (an API
    in front of Redis workers: the worker's engine refuses what the model cannot use, as a 400 all the same)."""
    _check_prompt(settings, p.prompt)
    if not (1 <= p.n <= settings.max_n):
        raise BadRequest(f"n must be between 1 and {settings.max_n}, got {p.n}")
    try:  # janus_core's bounds and messages, as the engine's batches apply them
        if p.cfg_weight is not None:
            limits.check_generation(p.n, p.cfg_weight)
        if p.steps is not None:
            limits.check_flow_steps(p.steps)
    except InvalidRequestError as exc:
        raise BadRequest(str(exc)) from exc
    if p.output_format not in OUTPUT_FORMATS:
        raise BadRequest(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {p.output_format!r}")
    if p.output_compression is not None and not (0 <= p.output_compression <= 100):
        raise BadRequest(f"output_compression must be between 0 and 100, got {p.output_compression}")
    if not (0 <= p.previews <= MAX_PREVIEWS):
        raise BadRequest(f"previews must be between 0 and {MAX_PREVIEWS}, got {p.previews}")
    _check_sampling(1.0 if p.temperature is None else p.temperature, 1.0 if p.top_p is None else p.top_p, p.seed)
    refusal = generator and limits.generator_refusal(
        generator, [name for name in ("steps", "temperature", "top_p") if getattr(p, name) is not None])
    if refusal:
        raise BadRequest(refusal)


def open_images(settings: Settings, images: list[bytes]) -> list[Image.Image]:
    """Each image with its header read (format and size checked; nothing decoded yet)."""
    try:
        return [open_image(data, max_pixels=settings.max_image_pixels, min_side=settings.min_image_side,
                           label=f"images[{i}]") for i, data in enumerate(images)]
    except InvalidRequestError as exc:
        raise BadRequest(str(exc)) from exc


def check_images(opened: list[Image.Image]) -> None:
    """Decode each opened image once, then let its pixels go, so broken files are refused before queueing."""
    for i, image in enumerate(opened):
        try:
            load_image(image, f"images[{i}]")
        except InvalidRequestError as exc:
            raise BadRequest(str(exc)) from exc
        finally:
            image.close()


class PixelBudget:
    """Pixels being decoded at once in this process, bounded (a decode holds up to 4 bytes a pixel): a request
    whose images would pass the budget waits for others to finish; one larger than it runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            async with self._changed:
                self.used -= pixels
                self._changed.notify_all()


@dataclass(frozen=True)
class Origin:
    """Where a request comes from: its route (or RPC), the caller, and its Idempotency-Key if it sent one."""

    route: str
    caller: str = idempotency.ANONYMOUS
    idempotency_key: str | None = None
    traceparent: str | None = None  # the W3C trace context its job carries to the worker (server.tracing)

    @classmethod
    def of(cls, route: str, authorization: str | None, idempotency_key: str | None,
           traceparent: str | None = None) -> Origin:
        """From the raw header / metadata values (`traceparent`: the client's); a malformed key is a `BadRequest`."""
        try:
            key = idempotency.check_key(idempotency_key)
        except idempotency.InvalidIdempotencyKey as exc:
            raise BadRequest(str(exc)) from exc
        api_key = current_key.get()  # the key's name where keys are checked; else a hash of any token sent
        return cls(route, api_key.caller if api_key else idempotency.caller_of(authorization), key,
                   tracing.traceparent(traceparent))

    def fingerprint(self, params: UnderstandParams | GenerateParams, stream: bool | str) -> str | None:
        return idempotency.fingerprint(self.route, params, stream) if self.idempotency_key is not None else None


@dataclass(frozen=True)
class AsyncSpec:
    """An async request (Prefer: respond-async): the route whose body its result takes, what that body needs
    besides the result, and its checked webhook URL."""

    surface: str
    render: dict[str, Any]
    webhook: str | None = None

    def mode(self) -> str:
        """What an Idempotency-Key's fingerprint adds for an async request: a retry with another webhook (or
        model name) is another request."""
        return "async " + json.dumps([self.surface, self.render, self.webhook], sort_keys=True)


@dataclass(frozen=True)
class Ticket:
    job_id: str
    deadline: float  # absolute, epoch seconds
    # Sent with an Idempotency-Key: the client will retry and re-attach, and other requests may have joined
    # the job, so neither a dropped connection nor this request's deadline cancels it (the job's own does).
    idempotent: bool = False


class Service:
    def __init__(self, settings: Settings, queue: JobQueue, *, expected_workers: int | None = None,
                 local_workers: Callable[[], set[str]] | None = None,
                 expected_by_gpu: dict[str, int] | None = None) -> None:
        """`local_workers`: the ids of the worker processes this process supervises; only those count
        as live (a killed one stops counting at once, not when its heartbeat ages out). `expected_by_gpu`:
        serve's workers per device label, which /ready reports live counts of."""
        self.settings = settings
        self.queue = queue
        self.expected_workers = expected_workers
        self.local_workers = local_workers
        self.expected_by_gpu = expected_by_gpu
        self.decoding = PixelBudget(settings.max_image_pixels)  # images decoded at once at the edge
        # image headers and checks run here: at most two at once, so a flood of heavy images takes two cores'
        # worth of threads, not every thread of the default pool
        self.image_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="janus-images")
        # API keys and their quotas, shared by both frontends (and, over Redis, by every frontend). A key that
        # states no in-flight limit may hold at most 3/4 of the queue, so one client cannot shut the others out.
        self.keys = KeyRing.from_settings(settings)
        share = settings.max_queue_depth * 3 // 4
        default = share if self.keys.enabled and share >= 1 else None
        redis = getattr(queue, "redis", None)
        if redis is not None:
            from server.queue.redis.quotas import RedisQuotas

            self.quotas: Quotas = RedisQuotas(redis, getattr(queue, "prefix", "janus:"),
                                              settings.request_timeout + 60.0, default)
        else:
            self.quotas = Quotas(default)
        # server.http.app.ModelInfo where this process serves the model; its `generator` is known once loaded
        self.model_info: Any = None
        self._watchers: set[asyncio.Task] = set()  # async jobs followed to their end (`_watch`)

    def deadline(self, client_timeout: float | None = None) -> float:
        timeout = self.settings.request_timeout
        if client_timeout is not None:
            timeout = min(timeout, max(client_timeout, 0.0))
        return time.time() + timeout

    async def submit_understand(self, params: UnderstandParams, origin: Origin, *, stream: bool = False,
                                timeout: float | None = None, require_image: bool = True,
                                spec: AsyncSpec | None = None) -> Ticket:
        validate_understand(self.settings, params, require_image=require_image)

        # Off the event loop, on the few threads of the image pool: even a header can be slow to reach (a PNG
        # of a million small chunks before its pixels), and REST, gRPC and probes share this loop. Each header
        # is read once: its size reserves the pixel budget, then the same opened image is decoded.
        loop = asyncio.get_running_loop()
        opened = await loop.run_in_executor(self.image_pool, open_images, self.settings, params.images)

        def check() -> str | None:  # decoding images and hashing them both take a while
            check_images(opened)
            return origin.fingerprint(params, spec.mode() if spec else stream)

        async with self.decoding.hold(sum(image.width * image.height for image in opened)):
            fingerprint = await loop.run_in_executor(self.image_pool, check)
        return await self._submit(Job("understand", params, deadline=self.deadline(timeout), stream=stream),
                                  origin, fingerprint, spec)

    async def submit_generate(self, params: GenerateParams, origin: Origin, *, stream: bool = False,
                              timeout: float | None = None, spec: AsyncSpec | None = None) -> Ticket:
        validate_generate(self.settings, params, getattr(self.model_info, "generator", None))
        if params.previews and not (stream or spec):
            raise BadRequest("previews are sent as events: ask for a stream (stream: true) or an async job (Prefer: "
                             "respond-async)")
        api_key = current_key.get()
        await self.quotas.charge_images(api_key, params.n)
        job = Job("generate", params, deadline=self.deadline(timeout), stream=stream)
        try:
            ticket = await self._submit(job, origin, origin.fingerprint(params, spec.mode() if spec else stream), spec)
        except BaseException:  # refused or unreachable: no images will be made for this request
            await asyncio.shield(self.quotas.refund_images(api_key, params.n))
            raise
        if ticket.job_id != job.id:  # joined an earlier run of the same request: its images were charged then
            await self.quotas.refund_images(api_key, params.n)
        return ticket

    async def _submit(self, job: Job, origin: Origin, fingerprint: str | None, spec: AsyncSpec | None = None) -> Ticket:
        job.owner, job.request_id, job.traceparent = origin.caller, request_id_var.get(), origin.traceparent
        api_key = current_key.get()
        job.weight = api_key.weight if api_key is not None else 1.0
        if origin.idempotency_key is not None:
            job.idempotency_key = idempotency.scoped_key(origin.caller, origin.idempotency_key)
            job.fingerprint = fingerprint
        if spec is not None:  # a job record, its events kept for re-attaching, its result kept job_ttl
            job.surface, job.render, job.webhook = spec.surface, dict(spec.render), spec.webhook
            job.stream, job.ttl = True, self.settings.job_ttl
        try:
            job_id = await self.queue.submit(job)
        except IdempotencyConflict as exc:
            raise BadRequest(str(exc), 422) from exc
        if job_id == job.id:
            log.info("submitted %s job %s%s", job.kind, job_id, " (async)" if spec else "")
        else:
            log.info("joined %s job %s (same Idempotency-Key and request)", job.kind, job_id)
        if spec is not None:
            self._watch(job_id, job.deadline, take_lease=job_id == job.id)
        return Ticket(job_id, job.deadline, idempotent=origin.idempotency_key is not None or spec is not None)

    # --- async jobs ----------------------------------------------------------------------------------

    def _watch(self, job_id: str, deadline: float, *, take_lease: bool) -> None:
        """This frontend follows each async job it accepted until it ends (or its deadline passes): the job
        stays in flight for its key until then (the request's lease moves here; in Redis it also lapses on its
        own), and a Redis queue keeps the job's payload meanwhile, to submit it again if Redis loses it."""
        holder = current_lease.get()
        lease = holder.take() if take_lease and holder is not None else None
        task = asyncio.ensure_future(self._follow_to_end(Ticket(job_id, deadline + 60.0, idempotent=True), lease))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _follow_to_end(self, ticket: Ticket, lease: Lease | None) -> None:
        try:
            async for _ in self.follow(ticket):
                pass
        except Exception as exc:  # the queue went away: the lease lapses with this process, or in Redis
            log.warning("async job %s: stopped following it (%s)", ticket.job_id, exc)
        finally:
            if lease is not None:
                await asyncio.shield(self.quotas.leave(lease))

    async def job_state(self, job_id: str, caller: str | None) -> JobState:
        """An async job of `caller` (None: anyone's, for webhooks); `JobNotFound` or `JobGone`."""
        state = await self.queue.job_state(job_id) if _JOB_ID.fullmatch(job_id) else None
        if state is None or (caller is not None and state.owner != caller):
            raise JobNotFound(f"no job {job_id!r} (unknown, expired, or not yours)")
        if state.gone:
            raise JobGone(f"job {job_id} ended {state.state}, but {state.gone}", state)
        return state

    async def cancel_job(self, job_id: str, caller: str) -> JobState:
        """Cancel an async job of `caller` that has not ended (a worker running it frees its rows within a
        step); an ended one is left as it is."""
        state = await self.job_state(job_id, caller)
        if state.terminal is None:
            await self.queue.end(job_id, error_event(CANCELLED, "the job was cancelled (DELETE /v1/jobs/{id})"))
            log.info("cancelled job %s", job_id)
            state = await self.job_state(job_id, caller)
        return state

    async def close(self) -> None:
        for task in list(self._watchers):
            task.cancel()

    async def follow(self, ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
        """Events of a job; a synthetic `deadline_exceeded` error (and `abandon`) if the request's deadline passes."""
        job_id, deadline = ticket.job_id, ticket.deadline
        events = self.queue.events(job_id).__aiter__()
        try:
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    await self.abandon(ticket)
                    yield error_event(DEADLINE_EXCEEDED, "the request's deadline passed before it finished")
                    return
                try:
                    event = await asyncio.wait_for(events.__anext__(), remaining)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    continue
                yield event
                if event.get("type") in ("result", "error"):
                    return
        finally:
            await events.aclose()

    async def abandon(self, ticket: Ticket) -> None:
        """The client stopped waiting (it hung up, cancelled, or its deadline passed): cancel the job, unless
        the request carried an Idempotency-Key (the client will re-attach, others may share the job, and the
        job still ends at its own deadline)."""
        if not ticket.idempotent:
            await self.queue.cancel(ticket.job_id)

    async def readiness(self) -> tuple[bool, str]:
        state = await self.ready_state()
        return state.ready, state.reason

    async def ready_state(self) -> ReadyState:
        return await ready_state(self.queue, self.settings.heartbeat_max_age, self.expected_workers,
                                 self.local_workers, self.expected_by_gpu)
