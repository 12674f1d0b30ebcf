"""A real OTLP/HTTP trace receiver for tests: an HTTP server on a loopback port, in a thread, that takes what
exporters POST to /v1/traces (`application/x-protobuf`, an ExportTraceServiceRequest) and keeps every span with
its resource's attributes. `wait_for(test)` waits (on a condition, not a sleep loop) until the spans pass `test`.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status as StatusProto

from tests.support.receiver import LoopbackServer, QuietHandler

PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 hex digits, as in a traceparent
    span_id: str  # 16 hex digits
    parent_id: str  # "" for a root span
    name: str
    kind: str  # "SERVER", "CONSUMER", "INTERNAL", ...
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str  # "UNSET", "OK" or "ERROR"
    resource: dict[str, Any]  # its process's: service.name, janus.role, process.pid, ...

    @property
    def role(self) -> str | None:
        return self.resource.get("janus.role")


def _value(any_value: Any) -> Any:
    field = any_value.WhichOneof("value")
    return getattr(any_value, field) if field else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def decode(body: bytes) -> list[Span]:
    """The spans of one ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(Span(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                    name=s.name, kind=SpanProto.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    attributes=_attributes(s.attributes),
                    status=StatusProto.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                    resource=resource))
    return spans


class OtlpReceiver(LoopbackServer):
    """Use as a context manager; `endpoint` is what --otlp-traces-endpoint takes."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._spans: list[Span] = []
        self.refused: list[str] = []  # why a POST was not taken (wrong path or content type, bad body)
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                problem = None
                if self.path != PATH:
                    problem = f"POST to {self.path}"
                elif self.headers.get("content-type") != PROTOBUF:
                    problem = f"content type {self.headers.get('content-type')}"
                try:
                    spans = decode(body) if problem is None else []
                except Exception as exc:  # a body that is not an ExportTraceServiceRequest
                    problem, spans = f"undecodable body: {exc}", []
                with receiver._lock:
                    if problem is not None:
                        receiver.refused.append(problem)
                    receiver._spans.extend(spans)
                    receiver._lock.notify_all()
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(400 if problem else 200)
                self.send_header("content-type", PROTOBUF)
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        super().__init__(Handler)

    @property
    def endpoint(self) -> str:
        return self.url + PATH

    def spans(self, trace_id: str | None = None) -> list[Span]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(self, test: Callable[[list[Span]], bool], trace_id: str | None = None,
                 timeout: float = 30.0) -> list[Span]:
        """The spans received (of `trace_id`, if given) once `test` holds for them; fails after `timeout`."""
        give_up = time.monotonic() + timeout
        with self._lock:
            while True:
                spans = [s for s in self._spans if trace_id is None or s.trace_id == trace_id]
                if test(spans):
                    return spans
                left = give_up - time.monotonic()
                if left <= 0:
                    names = sorted((s.role or "?", s.name) for s in spans)
                    raise AssertionError(f"spans never passed the test in {timeout}s; received {names}, "
                                         f"refused {self.refused}")
                self._lock.wait(left)
