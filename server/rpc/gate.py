"""The gate every gRPC call passes (`StatusInterceptor`): the API key in `authorization` metadata, the
key's quotas while a Janus rpc runs, its access-log line and metrics, and exceptions turned into gRPC
statuses in one place (`status_for`). Health, and reflection where opened, need no key."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from server import jobs, tracing
from server.keys import Key, KeyRing, Lease, Quotas, RateLimited, Unauthorized, admit, current_key
from server.logs import log_access
from server.metrics import Metrics
from server.queue import QueueFull, QueueMisconfigured, QueueUnavailable
from server.rpc.gen.janus.v1 import janus_pb2
from server.service import BadRequest, ServiceUnavailable

log = logging.getLogger(__name__)

SERVICE_NAME: str = janus_pb2.DESCRIPTOR.services_by_name["Janus"].full_name  # "janus.v1.Janus"
METHOD_PREFIX = f"/{SERVICE_NAME}/"
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
        gate = _Gate(self._keys, self._quotas if method.startswith(METHOD_PREFIX) else None)
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
    refusal in janus_rate_limited_total, writes its access log line (the REST middleware's format: a
    refusal with its reason, and the key's name once the key is known), and gives its status to its span
    (`span`: server.tracing's, while tracing is on)."""

    def __init__(self, metrics: Metrics | None, method: str, access_log: bool = False) -> None:
        self.metrics, self.method, self.access_log = metrics, method, access_log
        self.span: Any = None

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
        if self.span is not None:
            tracing.rpc_status(self.span, code, grpc.StatusCode[code].value[0], str(message) if message else None)
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
    either becomes the call's status. The quota slot is given back however the call ends, cancels included.
    With tracing on, the call's server span covers all of it, refusals included, and is current in `run()`."""
    with tracing.rpc_span(recorder.method, context.invocation_metadata()) as recorder.span:
        return await _admit_and_run(gate, recorder, context, run)


async def _admit_and_run(gate: _Gate, recorder: _Recorder, context: grpc.aio.ServicerContext,
                         run: Callable[[], Awaitable[Any]]) -> Any:
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
