"""gRPC frontend: `janus.v1.Janus` over `Service`, plus grpc.health.v1 and server reflection.

The servicer only converts protobuf <-> job params and events; validation, queueing and deadlines
live in `Service`, exactly as for REST. Every call passes one gate, the `StatusInterceptor`: it checks
`authorization: Bearer KEY` metadata against the service's `KeyRing` (health, and reflection where
opened, excepted), holds a slot of the key's quotas while a Janus rpc runs, and turns exceptions into
gRPC statuses in one place (via `status_for`).
The client's deadline becomes the job's deadline, and a call that ends early (client cancel,
deadline, disconnect) cancels its job so the worker stops at the next decode step.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import struct
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from server import jobs
from server.jobs import GenerateParams, UnderstandParams, result_images
from server.keys import Key, KeyRing, Lease, Quotas, RateLimited, Unauthorized, admit, current_key
from server.logs import log_access
from server.metrics import Metrics
from server.queue import QueueFull, QueueMisconfigured, QueueUnavailable
from server.rpc.gen.janus.v1 import janus_pb2, janus_pb2_grpc
from server.service import BadRequest, Origin, Service, ServiceUnavailable, Ticket
from server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME: str = janus_pb2.DESCRIPTOR.services_by_name["Janus"].full_name  # "janus.v1.Janus"
_METHOD_PREFIX = f"/{SERVICE_NAME}/"
_HEALTH_PREFIX = f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/"
_REFLECTION_PREFIX = f"/{reflection.SERVICE_NAME}/"
_AUTH_HINT = "missing or invalid API key; send metadata 'authorization: Bearer <key>'"
_MiB = 1024 * 1024


# --- errors and the one status mapping ---------------------------------------------------------


class JobFailed(Exception):
    """The job ended with an `error` event; `code` is one of the codes in server/jobs.py."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_JOB_STATUS = {
    jobs.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    jobs.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    jobs.CANCELLED: grpc.StatusCode.CANCELLED,
    jobs.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    jobs.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    jobs.INTERNAL: grpc.StatusCode.INTERNAL,
}

Metadata = tuple[tuple[str, str], ...]


def _retry_after(seconds: float) -> Metadata:
    return (("retry-after", str(max(1, math.ceil(seconds)))),)


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str, Metadata]:
    """The status code, message and trailing metadata a failed call reports for `exc`."""
    if isinstance(exc, BadRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), ()
    if isinstance(exc, Unauthorized):  # one wording for missing and wrong keys, naming gRPC's metadata
        return grpc.StatusCode.UNAUTHENTICATED, _AUTH_HINT, ()
    if isinstance(exc, RateLimited):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), _retry_after(exc.retry_after)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), _retry_after(exc.retry_after)
    if isinstance(exc, ServiceUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc), _retry_after(exc.retry_after)
    if isinstance(exc, QueueUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"the job queue is unavailable: {exc}", _retry_after(exc.retry_after)
    if isinstance(exc, QueueMisconfigured):  # e.g. the Redis password changed under a running server
        return grpc.StatusCode.UNAVAILABLE, f"the job queue refused this server: {exc}", _retry_after(5.0)
    if isinstance(exc, JobFailed):
        return _JOB_STATUS.get(exc.code, grpc.StatusCode.INTERNAL), str(exc), ()
    return grpc.StatusCode.INTERNAL, "internal error", ()


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """The gate every call passes: the API key, the key's quotas, and exceptions turned into statuses.

    Only grpc.health.v1 is open (probes send no key), and server reflection where `open_reflection` says
    so; every other method, of whatever service or shape, needs a key when keys are configured. Janus
    rpcs also take a slot of the key's quotas while they run."""

    def __init__(self, keys: KeyRing, quotas: Quotas, metrics: Metrics | None = None, access_log: bool = False,
                 open_reflection: bool = False) -> None:
        self._keys = keys
        self._quotas = quotas
        self._metrics = metrics
        self._access_log = access_log
        self._open = (_HEALTH_PREFIX, _REFLECTION_PREFIX) if open_reflection else (_HEALTH_PREFIX,)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._open):
            return handler
        gate = _Gate(self._keys, self._quotas if method.startswith(_METHOD_PREFIX) else None)
        return _guard(handler, gate, _Recorder(self._metrics, method, self._access_log))


class _Gate:
    """Admits one call: `identify` finds the key its `authorization` metadata names (None with auth off), and
    with `quotas`, `enter` takes a slot of that key's in-flight and per-minute limits, held until `release`."""

    def __init__(self, keys: KeyRing, quotas: Quotas | None) -> None:
        self._keys = keys
        self._quotas = quotas

    def identify(self, context: grpc.aio.ServicerContext) -> Key | None:
        metadata = dict(context.invocation_metadata() or ())
        return self._keys.identify(metadata.get("authorization"))

    async def enter(self, key: Key | None) -> Lease | None:
        return await admit(self._quotas, key) if self._quotas is not None else None

    async def release(self, lease: Lease | None) -> None:
        if self._quotas is not None:
            await self._quotas.leave(lease)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, grpc.aio.BaseError):  # context.abort() from inside the handler
        raise exc
    code, message, trailing = status_for(exc)
    if code == grpc.StatusCode.INTERNAL and not isinstance(exc, JobFailed):
        log.exception("unexpected error in a gRPC call", exc_info=exc)
    await context.abort(code, message, trailing_metadata=trailing)


class _Recorder:
    """Counts one rpc in janus_requests_total / janus_request_duration_seconds (endpoint = rpc path), a quota
    refusal in janus_rate_limited_total, and writes its access log line (the REST middleware's format: a
    refusal with its reason, and the key's name once the key is known)."""

    def __init__(self, metrics: Metrics | None, method: str, access_log: bool = False) -> None:
        self.metrics, self.method, self.access_log = metrics, method, access_log

    def start(self) -> float:
        return time.perf_counter()

    def done(self, started: float, exc: BaseException | None, context: grpc.aio.ServicerContext,
             key: Key | None) -> None:
        message = None
        if exc is None:
            code = "OK"
        elif isinstance(exc, grpc.aio.BaseError):  # the handler aborted with a status of its own
            code = context.code().name if isinstance(context.code(), grpc.StatusCode) else "UNKNOWN"
            message = context.details() if hasattr(context, "details") else None
        else:
            status, message, _ = status_for(exc)
            code = status.name
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.requests.labels(self.method, code).inc()
            self.metrics.request_duration.labels(self.method).observe(seconds)
            if isinstance(exc, RateLimited):
                self.metrics.rate_limited.labels(exc.key).inc()
        if self.access_log:
            log_access("gRPC", self.method, code, seconds, str(message) if message else None, client=context.peer(),
                       **({"key": key.name} if key is not None else {}))


async def _run_guarded(gate: _Gate, recorder: _Recorder, context: grpc.aio.ServicerContext,
                       run: Callable[[], Awaitable[Any]]) -> Any:
    """`run()` (the handler) for an admitted call, with `current_key` set while it runs; an exception from
    either becomes the call's status. The quota slot is given back however the call ends, cancels included."""
    started = recorder.start()
    key = None
    try:
        key = gate.identify(context)
        lease = await gate.enter(key)
    except Exception as exc:  # not admitted: a refusal over quota is still logged with the key's name
        recorder.done(started, exc, context, key)
        await _abort(context, exc)
    token = current_key.set(key)
    try:
        result = await run()
    except Exception as exc:
        recorder.done(started, exc, context, key)
        await _abort(context, exc)
    else:
        recorder.done(started, None, context, key)
        return result
    finally:
        current_key.reset(token)
        await asyncio.shield(gate.release(lease))  # a cancelled call must not keep the slot


async def _respond(handler: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext) -> None:
    """Runs a streaming-response handler inside this coroutine: an async generator's messages are written from
    here, so the generator runs in the call's task (where `current_key` is set) and, when the call ends early,
    is closed here (its cleanup, e.g. abandoning the job, runs before the quota slot is given back). A handler
    that writes through `context.write` itself is just awaited."""
    responses = handler(request, context)
    if not inspect.isasyncgen(responses):
        await responses
        return
    try:
        async for response in responses:
            await context.write(response)
    finally:
        await responses.aclose()


def _guard(handler: grpc.RpcMethodHandler, gate: _Gate, recorder: _Recorder) -> grpc.RpcMethodHandler | None:
    """Wrap a handler of any of the four shapes with `_run_guarded`. A handler of none of them is refused
    (None: the server answers UNIMPLEMENTED) rather than served without the key check."""
    serializers = {"request_deserializer": handler.request_deserializer,
                   "response_serializer": handler.response_serializer}

    def single(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await _run_guarded(gate, recorder, context, lambda: call(request, context))
        return guarded

    def streaming(call: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> None:
            await _run_guarded(gate, recorder, context, lambda: _respond(call, request, context))
        return guarded

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(single(handler.unary_unary), **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(single(handler.stream_unary), **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **serializers)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **serializers)
    log.error("refusing %s: a handler of no known shape", recorder.method)
    return None


# --- protobuf -> job params (defaults come from the dataclasses, as for REST) -------------------


def _decimal(value: float) -> float:
    """The shortest decimal that the proto's float32 `value` stands for (0.699999988 -> 0.7), so a
    gRPC request samples with exactly the same parameters as the same REST request."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("f", struct.pack("f", candidate))[0] == value:
            return candidate
    return value


def understand_params(request: janus_pb2.UnderstandRequest) -> UnderstandParams:
    fields: dict[str, Any] = {"prompt": request.prompt, "images": list(request.images),
                              "temperature": _decimal(request.temperature)}
    if request.messages:
        if request.prompt or request.images:
            raise BadRequest("send either messages or prompt + images, not both")
        fields["messages"] = [{"role": m.role, "text": m.text, "images": len(m.images)} for m in request.messages]
        fields["images"] = [image for m in request.messages for image in m.images]
    if request.max_new_tokens:
        fields["max_new_tokens"] = request.max_new_tokens
    if request.top_p:
        fields["top_p"] = _decimal(request.top_p)
    if request.HasField("seed"):
        fields["seed"] = request.seed
    return UnderstandParams(**fields)


def generate_params(request: janus_pb2.GenerateRequest) -> GenerateParams:
    fields: dict[str, Any] = {"prompt": request.prompt}
    if request.n:
        fields["n"] = request.n
    if request.cfg_weight:
        fields["cfg_weight"] = _decimal(request.cfg_weight)
    if request.HasField("temperature"):  # explicit 0 means greedy, unset means the default
        fields["temperature"] = _decimal(request.temperature)
    if request.top_p:
        fields["top_p"] = _decimal(request.top_p)
    if request.HasField("seed"):
        fields["seed"] = request.seed
    if request.steps:
        fields["steps"] = request.steps
    return GenerateParams(**fields)


# --- readiness, shared by the servicer (refuse early) and the health service --------------------


class Readiness:
    """`Service.readiness()` cached for `ttl` seconds, so probes and requests don't hammer the queue."""

    def __init__(self, service: Service, ttl: float = 1.0) -> None:
        self._service = service
        self._ttl = ttl
        self._lock = asyncio.Lock()
        self._checked_at = -math.inf
        self._value: tuple[bool, str] = (False, "not checked yet")

    async def check(self) -> tuple[bool, str]:
        async with self._lock:
            if time.monotonic() - self._checked_at >= self._ttl:
                self._value = await self._service.readiness()
                self._checked_at = time.monotonic()
            return self._value


MAX_HEALTH_WATCHES = 256  # health needs no key: this bounds what anonymous watchers can hold


class HealthServicer(health_aio.HealthServicer):
    """grpc.health.v1: SERVING (for "" and janus.v1.Janus) only while `Service.readiness()` holds.

    Check refreshes the status. While any Watch is open, one poller task refreshes it every `poll` seconds
    (started by the first Watch, stopped when the last ends), so many watchers cost what one does. Watch
    streams beyond `max_watches` are refused with RESOURCE_EXHAUSTED: each holds one of the server's call
    slots, and probes need no key."""

    def __init__(self, readiness: Readiness, poll: float = 1.0, max_watches: int = MAX_HEALTH_WATCHES) -> None:
        super().__init__()
        self._readiness = readiness
        self._poll = poll
        self._max_watches = max_watches
        self._watches = 0
        self._poller: asyncio.Task[None] | None = None
        self._serving: int | None = None  # the status last set; unchanged ones wake no watcher
        # one refresh at a time, so an older reading never lands after a newer one
        self._refreshing = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._refreshing:
            ready, _ = await self._readiness.check()
            serving = health_pb2.HealthCheckResponse
            status = serving.SERVING if ready else serving.NOT_SERVING
            if status == self._serving:
                return
            self._serving = status
            for name in ("", SERVICE_NAME):
                await self.set(name, status)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if self._watches >= self._max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self._watches} health Watch streams are open, the most this server keeps; "
                                "retry later or poll Check")
        self._watches += 1
        if self._poller is None:
            self._poller = asyncio.create_task(self._refresh_forever())
        try:
            await self.refresh()
            await super().Watch(request, context)
        finally:
            self._watches -= 1
            if self._watches == 0 and self._poller is not None:
                self._poller.cancel()
                self._poller = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                await self.refresh()
            except Exception:  # a failed probe must not end the Watch streams
                log.exception("health refresh failed")


# --- the Janus servicer --------------------------------------------------------------------------


class JanusServicer(janus_pb2_grpc.JanusServicer):
    def __init__(self, service: Service, readiness: Readiness) -> None:
        self._service = service
        self._readiness = readiness

    async def Understand(self, request: janus_pb2.UnderstandRequest,
                         context: grpc.aio.ServicerContext) -> janus_pb2.UnderstandResponse:
        ticket = await self._submit(context, "Understand", understand_params(request), stream=False)
        return _understand_response(ticket, await self._result(ticket))

    async def UnderstandStream(self, request: janus_pb2.UnderstandRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[janus_pb2.UnderstandChunk]:
        ticket = await self._submit(context, "UnderstandStream", understand_params(request), stream=True)
        sent = ""
        async for event in self._events(ticket):
            if event["type"] == "delta":
                sent += event["text"]
                yield janus_pb2.UnderstandChunk(id=ticket.job_id, delta=event["text"])
            elif event["type"] == "result":
                # Whatever text the deltas did not carry (a worker that does not stream) goes last.
                text: str = event["text"]
                rest = text[len(sent):] if text.startswith(sent) else ""
                yield janus_pb2.UnderstandChunk(
                    id=ticket.job_id, delta=rest, finish_reason=event["finish_reason"],
                    prompt_tokens=event["prompt_tokens"], completion_tokens=event["completion_tokens"])

    async def Generate(self, request: janus_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> janus_pb2.GenerateResponse:
        ticket = await self._submit(context, "Generate", generate_params(request), stream=False)
        return _generate_response(ticket, await self._result(ticket))

    async def GenerateStream(self, request: janus_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[janus_pb2.GenerateEvent]:
        ticket = await self._submit(context, "GenerateStream", generate_params(request), stream=True)
        async for event in self._events(ticket):
            if event["type"] == "progress":
                progress = janus_pb2.Progress(step=event["step"], total=event["total"])
                yield janus_pb2.GenerateEvent(progress=progress)
            elif event["type"] == "result":
                yield janus_pb2.GenerateEvent(result=_generate_response(ticket, event))

    async def _submit(self, context: grpc.aio.ServicerContext, rpc: str, params: UnderstandParams | GenerateParams,
                      *, stream: bool) -> Ticket:
        ready, reason = await self._readiness.check()
        if not ready:
            raise ServiceUnavailable(f"not ready: {reason}")
        metadata = dict(context.invocation_metadata() or ())
        origin = Origin.of(_METHOD_PREFIX + rpc, metadata.get("authorization"), metadata.get("idempotency-key"))
        options: dict[str, Any] = {"stream": stream, "timeout": context.time_remaining()}
        if isinstance(params, UnderstandParams):
            return await self._service.submit_understand(params, origin, **options)
        return await self._service.submit_generate(params, origin, **options)

    async def _result(self, ticket: Ticket) -> dict[str, Any]:
        result: dict[str, Any] | None = None
        async for event in self._events(ticket):  # runs to the end: the result is the last event
            if event["type"] == "result":
                result = event
        if result is None:
            raise JobFailed(jobs.INTERNAL, "the job ended without a result")
        return result

    async def _events(self, ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
        """The job's events up to its result; an error event raises `JobFailed`. If the call ends
        before the job does (client cancel, deadline, disconnect), the job is cancelled."""
        finished = False
        try:
            async for event in self._service.follow(ticket):
                if event["type"] == "error":
                    finished = True
                    raise JobFailed(event.get("code", jobs.INTERNAL), event.get("message", "the job failed"))
                finished = event["type"] == "result"
                yield event
        finally:
            if not finished:
                # shielded: this runs while the call's task is being cancelled
                await asyncio.shield(self._service.abandon(ticket))


def _understand_response(ticket: Ticket, event: dict[str, Any]) -> janus_pb2.UnderstandResponse:
    return janus_pb2.UnderstandResponse(
        id=ticket.job_id, text=event["text"], finish_reason=event["finish_reason"],
        prompt_tokens=event["prompt_tokens"], completion_tokens=event["completion_tokens"])


def _generate_response(ticket: Ticket, event: dict[str, Any]) -> janus_pb2.GenerateResponse:
    return janus_pb2.GenerateResponse(id=ticket.job_id, seed=event["seed"], png=result_images(event))


# --- the server ------------------------------------------------------------------------------------

_health_of: weakref.WeakKeyDictionary[grpc.aio.Server, HealthServicer] = weakref.WeakKeyDictionary()


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        # Requests are bounded like REST bodies; responses carry up to max_n PNGs (~0.5 MiB each).
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", max(settings.max_body_bytes, 64 * _MiB)),
        # Ping idle connections so load balancers keep long generations open and dead peers go away.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may ping every 10 s
        # A port in use must fail loudly, not be shared with another server.
        ("grpc.so_reuseport", 0),
    ]


def create_grpc_server(service: Service, settings: Settings, *, metrics: Metrics | None = None,
                       readiness_ttl: float = 1.0, max_health_watches: int = MAX_HEALTH_WATCHES) -> grpc.aio.Server:
    """Janus + health + reflection on a grpc.aio server, neither bound nor started.

    Keys and quotas are the service's, the ones REST uses (a reloaded keys file applies to both).
    Bind with `server.add_insecure_port("host:port")`, then `await server.start()`; stop with
    `stop_grpc_server`. `start_grpc_server` does all of it from `settings`."""
    interceptor = StatusInterceptor(service.keys, service.quotas, metrics, settings.access_log,
                                    open_reflection=settings.open_reflection)
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(settings),
                             maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs)
    readiness = Readiness(service, ttl=readiness_ttl)
    janus_pb2_grpc.add_JanusServicer_to_server(JanusServicer(service, readiness), server)
    health = HealthServicer(readiness, poll=readiness_ttl, max_watches=max_health_watches)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((SERVICE_NAME, health_name, reflection.SERVICE_NAME), server)
    _health_of[server] = health
    return server


async def start_grpc_server(service: Service, settings: Settings,
                            metrics: Metrics | None = None) -> grpc.aio.Server:
    """Create, bind `settings.host:settings.grpc_port` and start the server."""
    server = create_grpc_server(service, settings, metrics=metrics)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    server.add_insecure_port(f"{host}:{settings.grpc_port}")
    await server.start()
    log.info("gRPC server listening on %s:%d", settings.host, settings.grpc_port)
    return server


async def stop_grpc_server(server: grpc.aio.Server, grace: float = 10.0) -> None:
    """Report NOT_SERVING, refuse new calls, and give running ones `grace` seconds to finish."""
    health = _health_of.get(server)
    if health is not None:
        await health.enter_graceful_shutdown()
    await server.stop(grace)
