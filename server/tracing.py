"""OpenTelemetry traces, off by default: `--otlp-traces-endpoint URL` (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).

Off, nothing here imports opentelemetry (FastAPI itself imports its API package, never the SDK), FastAPI's
telemetry is off and nothing is added to the gRPC server; `traceparent` only checks the client's header, so a
worker with tracing on still joins the client's trace. On (the optional extra `janus-server[tracing]`), spans
go to the endpoint over OTLP/HTTP (protobuf) through a batching processor that `shutdown` flushes. Each
process says what it is in its resource: service.name "janus-server", janus.role ("serve", "api" or
"worker"), process.pid and host.name.

Spans:
- "POST /v1/generate" (the route's template) and the like: the HTTP server span, FastAPI's own
  (`fastapi_telemetry`); probes and scrapes (/health, /ready, /metrics) are left out.
- "janus.v1.Janus/Generate" and the like: the gRPC server span (`rpc_span`, kind SERVER, rpc.* attributes).
  Both continue the client's W3C `traceparent` and are current while the request runs, so the job takes
  their context (`traceparent`) to the worker through the queue.
- "janus.job understand" / "janus.job generate" (kind CONSUMER), the worker's, under the request's span:
  from the job's submission to its end, with janus.job_id, janus.kind, janus.request_id and janus.status
  (an error status when it failed). Its children, each where both ends were reached: "queue wait"
  (submitted -> prefill began), "prefill" (-> first token or image step), "decode" (-> the engine's last
  step), "image decode" (-> pixels ready; images only) and "encode" (-> the result encoded and sent).
  They are built when the job ends, from its phase stamps (`record_job`): no tracing call runs per step.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SERVICE_NAME = "janus-server"
INSTALL_HINT = "pip install 'janus-server[tracing]'"
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes: no trace each
# (name, start stamp, end stamp) of the job's child spans; the first stamp present of a tuple starts it
PHASE_SPANS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("queue wait", ("created",), "prefill"),
    ("prefill", ("prefill",), "first"),
    ("decode", ("first",), "finished"),
    ("image decode", ("finished",), "decoded"),
    ("encode", ("decoded", "finished"), "encoded"),
)
# gRPC codes that make a server span an error (OpenTelemetry's semantic conventions for RPC servers)
RPC_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                               "DATA_LOSS"})
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")

_provider: Any = None  # the SDK's TracerProvider while tracing is on


class TracingUnavailable(RuntimeError):
    """--otlp-traces-endpoint was given but the opentelemetry packages are not installed."""


def configure(endpoint: str | None, role: str, *, exporter: Any = None) -> None:
    """Turn tracing on in this process, exporting to `endpoint` (None: stay off); `role`: "serve", "api" or
    "worker". `exporter`: a SpanExporter to hand each span to instead (tests). Raises `TracingUnavailable`."""
    global _provider
    if not endpoint or _provider is not None:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(f"--otlp-traces-endpoint needs the tracing extra ({exc}): {INSTALL_HINT}") from None
    resource = Resource.create({"service.name": SERVICE_NAME, "janus.role": role, "process.pid": os.getpid(),
                                "host.name": socket.gethostname()})
    provider = TracerProvider(resource=resource)  # sampling: OTEL_TRACES_SAMPLER, else every trace its parent keeps
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:  # OTEL_BSP_* tune the batches; OTEL_EXPORTER_OTLP_TRACES_HEADERS / _TIMEOUT / _CERTIFICATE apply
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=export_url(endpoint))))
    _provider = provider


def export_url(endpoint: str) -> str:
    """Where spans are POSTed: the URL as given, or with /v1/traces (OTLP/HTTP's path) when it names no path."""
    parts = urlsplit(endpoint)
    return urlunsplit(parts._replace(path="/v1/traces")) if parts.path in ("", "/") else endpoint


def enabled() -> bool:
    return _provider is not None


def shutdown() -> None:
    """Export what is still batched and turn tracing off (at the end of the process)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def valid_traceparent(header: str | None) -> str | None:
    """A W3C traceparent header as version 00, or None if it is not one (W3C Trace Context, level 1)."""
    if not header or len(header) > 512:
        return None
    match = _TRACEPARENT.fullmatch(header.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or not int(trace_id, 16) or not int(span_id, 16):
        return None
    return f"00-{trace_id}-{span_id}-{flags}"


def traceparent(client_header: str | None) -> str | None:
    """The trace context a request's job carries to its worker: on, that of the current (server) span, which
    continued the client's; off, the client's own header if it is valid."""
    if _provider is not None:
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    return valid_traceparent(client_header)


def fastapi_telemetry() -> dict[str, Any]:
    """`FastAPI(telemetry=...)`: FastAPI's own OpenTelemetry server spans, outside all middleware and current
    while a route runs, with our provider when tracing is on; off, none of its telemetry, whatever global
    providers a host process may have set. Metrics stay Prometheus' (server.metrics), logs ours (server.logs)."""
    if _provider is None:
        return {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}
    return {"tracer_provider": _provider, "metrics": False, "logs": False, "auto_configure": False,
            "operation_spans": False, "exclude": _quiet}


def _quiet(scope: dict[str, Any]) -> bool:
    return scope.get("path") in QUIET_PATHS


def rpc_span(method: str, metadata: Iterable[tuple[str, str]] | None) -> contextlib.AbstractContextManager[Any]:
    """The server span of one gRPC call (`method`: "/janus.v1.Janus/Generate"), current while the call runs,
    continuing the `traceparent` in its metadata; yields None when tracing is off. End it with `rpc_status`."""
    if _provider is None:
        return contextlib.nullcontext()
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(dict(metadata or ()))
    name = method.strip("/")
    service, _, rpc = name.rpartition("/")
    return _tracer().start_as_current_span(
        name, context=parent, kind=trace.SpanKind.SERVER, record_exception=False, set_status_on_exception=False,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc})


def rpc_status(span: Any, code: str, number: int, message: str | None = None) -> None:
    """Record a gRPC call's status (`code`: its name, e.g. "INTERNAL"; `number`: its value) on its span."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", number)
    if code in RPC_SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, message or code))


def record_job(job: Any, stamps: dict[str, float], status: str) -> None:
    """The worker's spans of one ended job, built from its phase stamps (epoch seconds), under the span
    `job.traceparent` names (a new trace without one). `status`: "succeeded", "failed" or "cancelled"."""
    if _provider is None or not stamps:
        return
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    def ns(seconds: float) -> int:
        return int(seconds * 1e9)

    # 1. the job's span, from its submission (or its claim) to its last stamp
    start = stamps.get("created", stamps.get("claimed", min(stamps.values())))
    end = max(max(stamps.values()), start)  # the frontend's clock may run ahead of this host's
    parent = TraceContextTextMapPropagator().extract({"traceparent": job.traceparent} if job.traceparent else {})
    attributes = {"janus.job_id": job.id, "janus.kind": job.kind, "janus.status": status}
    if job.request_id:
        attributes["janus.request_id"] = job.request_id
    span = _tracer().start_span(f"janus.job {job.kind}", context=parent, kind=SpanKind.CONSUMER,
                                attributes=attributes, start_time=ns(start))
    if status == "failed":
        span.set_status(Status(StatusCode.ERROR, "the job failed"))
    # 2. one child per phase whose two ends were reached, clamped within the job's span
    inside = trace.set_span_in_context(span)
    for name, starts, stop in PHASE_SPANS:
        begin = next((stamps[s] for s in starts if s in stamps), None)
        if begin is None or stop not in stamps:
            continue
        begin = min(max(begin, start), end)
        child = _tracer().start_span(name, context=inside, start_time=ns(begin))
        child.end(end_time=ns(min(max(stamps[stop], begin), end)))
    span.end(end_time=ns(end))


def _tracer() -> Any:
    return _provider.get_tracer("janus-server")
