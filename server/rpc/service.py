"""gRPC frontend: `janus.v1.Janus` over `Service`, plus grpc.health.v1 and server reflection.

The servicer only converts protobuf <-> job params and events (`server.rpc.convert`); validation,
queueing and deadlines live in `Service`, exactly as for REST. Every call passes one gate first
(`server.rpc.gate.StatusInterceptor`: the API key, quotas, exceptions turned into statuses); health
has its own servicer (`server.rpc.health`). The client's deadline becomes the job's deadline, and a
call that ends early (client cancel, deadline, disconnect) cancels its job so the worker stops at the
next decode step.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import jobs
from server.jobs import GenerateParams, UnderstandParams
from server.metrics import Metrics
from server.rpc.convert import generate_params, generate_response, preview, understand_params, understand_response
from server.rpc.gate import METHOD_PREFIX, SERVICE_NAME, JobFailed, StatusInterceptor
from server.rpc.gen.janus.v1 import janus_pb2, janus_pb2_grpc
from server.rpc.health import MAX_HEALTH_WATCHES, HealthServicer, Readiness
from server.service import Origin, Service, ServiceUnavailable, Ticket
from server.settings import Settings

log = logging.getLogger(__name__)
_MiB = 1024 * 1024


# --- the Janus servicer --------------------------------------------------------------------------


class JanusServicer(janus_pb2_grpc.JanusServicer):
    def __init__(self, service: Service, readiness: Readiness) -> None:
        self._service = service
        self._readiness = readiness

    async def Understand(self, request: janus_pb2.UnderstandRequest,
                         context: grpc.aio.ServicerContext) -> janus_pb2.UnderstandResponse:
        ticket = await self._submit(context, "Understand", understand_params(request), stream=False)
        return understand_response(ticket, await self._result(ticket, context))

    async def UnderstandStream(self, request: janus_pb2.UnderstandRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[janus_pb2.UnderstandChunk]:
        ticket = await self._submit(context, "UnderstandStream", understand_params(request), stream=True)
        sent = ""
        async for event in self._events(ticket):
            if event["type"] == "delta":
                sent += event["text"]
                yield janus_pb2.UnderstandChunk(id=ticket.job_id, delta=event["text"])
            elif event["type"] == "result":
                _send_timings(context, event)
                # Whatever text the deltas did not carry (a worker that does not stream) goes last.
                text: str = event["text"]
                rest = text[len(sent):] if text.startswith(sent) else ""
                yield janus_pb2.UnderstandChunk(
                    id=ticket.job_id, delta=rest, finish_reason=event["finish_reason"],
                    prompt_tokens=event["prompt_tokens"], completion_tokens=event["completion_tokens"])

    async def Generate(self, request: janus_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> janus_pb2.GenerateResponse:
        ticket = await self._submit(context, "Generate", generate_params(request), stream=False)
        return generate_response(ticket, await self._result(ticket, context))

    async def GenerateStream(self, request: janus_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[janus_pb2.GenerateEvent]:
        ticket = await self._submit(context, "GenerateStream", generate_params(request), stream=True)
        async for event in self._events(ticket):
            if event["type"] == "progress":
                progress = janus_pb2.Progress(step=event["step"], total=event["total"])
                yield janus_pb2.GenerateEvent(progress=progress)
            elif event["type"] == "preview":
                yield janus_pb2.GenerateEvent(preview=preview(event))
            elif event["type"] == "result":
                _send_timings(context, event)
                yield janus_pb2.GenerateEvent(result=generate_response(ticket, event))

    async def _submit(self, context: grpc.aio.ServicerContext, rpc: str, params: UnderstandParams | GenerateParams,
                      *, stream: bool) -> Ticket:
        ready, reason = await self._readiness.check()
        if not ready:
            raise ServiceUnavailable(f"not ready: {reason}")
        metadata = dict(context.invocation_metadata() or ())
        origin = Origin.of(METHOD_PREFIX + rpc, metadata.get("authorization"), metadata.get("idempotency-key"),
                           metadata.get("traceparent"))
        options: dict[str, Any] = {"stream": stream, "timeout": context.time_remaining()}
        if isinstance(params, UnderstandParams):
            return await self._service.submit_understand(params, origin, **options)
        return await self._service.submit_generate(params, origin, **options)

    async def _result(self, ticket: Ticket, context: grpc.aio.ServicerContext) -> dict[str, Any]:
        result: dict[str, Any] | None = None
        async for event in self._events(ticket):  # runs to the end: the result is the last event
            if event["type"] == "result":
                result = event
        if result is None:
            raise JobFailed(jobs.INTERNAL, "the job ended without a result")
        _send_timings(context, result)
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


def _send_timings(context: grpc.aio.ServicerContext, event: dict[str, Any]) -> None:
    """The job's phases as trailing metadata `server-timing` (the REST header's format, ms)."""
    if event.get("timings"):
        context.set_trailing_metadata((("server-timing", jobs.server_timing(event["timings"])),))


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
