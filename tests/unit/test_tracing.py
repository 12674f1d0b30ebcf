"""server.tracing: W3C traceparent checks, the worker's job spans built from phase stamps, the HTTP and gRPC server
spans, the setting and its OpenTelemetry fallback, the optional extra; and off, nothing of OpenTelemetry's SDK
imported and nothing added. Spans go to an in-memory exporter here (tests/integration/test_tracing.py exports
them over OTLP/HTTP to a real receiver)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from packaging.requirements import Requirement

from server import tracing
from server.jobs import GenerateParams, Job, UnderstandParams
from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every span handed to the returned exporter as it ends."""
    exporter = InMemorySpanExporter()
    tracing.configure("http://127.0.0.1:4318", "worker", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    named = {s.name: s for s in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


# --- traceparent ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, expected", [
    (CLIENT, CLIENT),
    (f"  {CLIENT} ", CLIENT),
    (f"00-{TRACE_ID}-{CLIENT_SPAN}-00", f"00-{TRACE_ID}-{CLIENT_SPAN}-00"),  # not sampled: still carried
    (f"cc-{TRACE_ID}-{CLIENT_SPAN}-01-future-fields", CLIENT),  # a later version is read as version 00
    (f"ff-{TRACE_ID}-{CLIENT_SPAN}-01", None),  # version ff is invalid
    (f"00-{TRACE_ID}-{CLIENT_SPAN}-01-extra", None),  # version 00 has exactly four fields
    (f"00-{'0' * 32}-{CLIENT_SPAN}-01", None),  # all-zero trace id
    (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # all-zero span id
    (CLIENT.upper(), None),  # hex digits are lowercase
    (f"00-{TRACE_ID[:-1]}-{CLIENT_SPAN}-01", None),
    ("", None), (None, None), ("garbage", None), (CLIENT + "-" + "x" * 600, None),
])
def test_valid_traceparent(header, expected):
    assert tracing.valid_traceparent(header) == expected


def test_off_a_job_carries_the_clients_valid_traceparent_only():
    assert not tracing.enabled()
    assert tracing.traceparent(CLIENT) == CLIENT  # a worker with tracing on still joins the client's trace
    assert tracing.traceparent("00-nonsense") is None
    assert tracing.traceparent(None) is None


def test_on_a_job_carries_the_current_spans_traceparent(exported):
    with tracing.rpc_span("/janus.v1.Janus/Generate", [("traceparent", CLIENT)]) as span:
        carried = tracing.traceparent("00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01")
        ctx = span.get_span_context()
    assert carried == f"00-{TRACE_ID}-{ctx.span_id:016x}-01"  # the client's trace, our server span
    assert tracing.traceparent(CLIENT) == CLIENT  # no current span: the client's header


# --- the worker's spans ----------------------------------------------------------------------------------

STAMPS = {"created": 100.0, "claimed": 100.5, "prefill": 101.0, "first": 101.25, "finished": 103.0,
          "done": 103.5, "decoded": 103.5, "encoded": 104.0}


def test_record_job_builds_the_phase_spans_under_the_requests_span(exported):
    job = Job(kind="generate", params=GenerateParams(prompt="a fox"), traceparent=CLIENT, request_id="req-1")
    tracing.record_job(job, dict(STAMPS), "succeeded")
    spans = by_name(exported.get_finished_spans())
    assert set(spans) == {"janus.job generate", "queue wait", "prefill", "decode", "image decode", "encode"}
    root = spans["janus.job generate"]
    assert root.parent is not None and root.parent.span_id == int(CLIENT_SPAN, 16) and root.parent.is_remote
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert root.kind == SpanKind.CONSUMER and root.status.status_code == StatusCode.UNSET
    assert dict(root.attributes) == {"janus.job_id": job.id, "janus.kind": "generate", "janus.status": "succeeded",
                                     "janus.request_id": "req-1"}
    assert (root.start_time, root.end_time) == (100_000_000_000, 104_000_000_000)
    expected = {"queue wait": (100.0, 101.0), "prefill": (101.0, 101.25), "decode": (101.25, 103.0),
                "image decode": (103.0, 103.5), "encode": (103.5, 104.0)}
    for name, (start, end) in expected.items():
        child = spans[name]
        assert child.parent.span_id == root.context.span_id and child.context.trace_id == root.context.trace_id
        assert (child.start_time, child.end_time) == (int(start * 1e9), int(end * 1e9)), name
    assert root.resource.attributes["service.name"] == "janus-server"
    assert root.resource.attributes["janus.role"] == "worker"
    assert root.resource.attributes["process.pid"] == os.getpid()


def test_an_understanding_job_encodes_from_its_last_step(exported):
    job = Job(kind="understand", params=UnderstandParams(prompt="hi"), traceparent=CLIENT)
    stamps = {k: v for k, v in STAMPS.items() if k not in ("decoded", "done")}
    tracing.record_job(job, stamps, "succeeded")
    spans = by_name(exported.get_finished_spans())
    assert set(spans) == {"janus.job understand", "queue wait", "prefill", "decode", "encode"}
    assert (spans["encode"].start_time, spans["encode"].end_time) == (103_000_000_000, 104_000_000_000)
    assert "janus.request_id" not in spans["janus.job understand"].attributes


def test_a_failed_job_is_an_error_with_the_phases_it_reached(exported):
    job = Job(kind="generate", params=GenerateParams(prompt="a fox"), traceparent=CLIENT)
    tracing.record_job(job, {"created": 100.0, "claimed": 100.5, "prefill": 101.0, "ended": 102.0}, "failed")
    spans = by_name(exported.get_finished_spans())
    assert set(spans) == {"janus.job generate", "queue wait"}
    root = spans["janus.job generate"]
    assert root.status.status_code == StatusCode.ERROR and root.attributes["janus.status"] == "failed"
    assert root.end_time == 102_000_000_000


def test_a_cancelled_job_is_not_an_error_and_a_job_without_context_starts_a_trace(exported):
    job = Job(kind="understand", params=UnderstandParams(prompt="hi"))
    tracing.record_job(job, {"created": 100.0, "claimed": 100.5, "ended": 100.75}, "cancelled")
    (root,) = exported.get_finished_spans()
    assert root.parent is None and root.status.status_code == StatusCode.UNSET
    assert root.attributes["janus.status"] == "cancelled"


def test_phase_spans_stay_inside_the_job_when_clocks_disagree(exported):
    """`created` comes from the frontend's host: a clock ahead of the worker's must not make a span end before it
    starts."""
    job = Job(kind="understand", params=UnderstandParams(prompt="hi"), traceparent=CLIENT)
    tracing.record_job(job, {"created": 200.0, "claimed": 100.5, "prefill": 101.0, "first": 101.5,
                             "finished": 102.0, "encoded": 102.5}, "succeeded")
    for span in exported.get_finished_spans():
        assert span.start_time <= span.end_time, span.name
        assert span.start_time >= 200_000_000_000 or span.name == "janus.job understand"


def test_off_record_job_and_rpc_span_do_nothing():
    assert not tracing.enabled()
    tracing.record_job(Job(kind="understand", params=UnderstandParams(prompt="hi")), dict(STAMPS), "failed")
    with tracing.rpc_span("/janus.v1.Janus/Generate", [("traceparent", CLIENT)]) as span:
        assert span is None


# --- server spans ----------------------------------------------------------------------------------------


def test_rpc_span_continues_the_callers_trace_and_takes_the_calls_status(exported):
    with tracing.rpc_span("/janus.v1.Janus/Generate", [("traceparent", CLIENT), ("authorization", "x")]) as span:
        tracing.rpc_status(span, "INTERNAL", 13, "internal error")
    with tracing.rpc_span("/janus.v1.Janus/Understand", ()) as span:
        tracing.rpc_status(span, "INVALID_ARGUMENT", 3, "bad prompt")  # the client's fault: no error
    failed, refused = exported.get_finished_spans()
    assert failed.name == "janus.v1.Janus/Generate" and failed.kind == SpanKind.SERVER
    assert failed.parent.span_id == int(CLIENT_SPAN, 16) and f"{failed.context.trace_id:032x}" == TRACE_ID
    assert dict(failed.attributes) == {"rpc.system": "grpc", "rpc.service": "janus.v1.Janus", "rpc.method": "Generate",
                                       "rpc.grpc.status_code": 13}
    assert failed.status.status_code == StatusCode.ERROR and failed.status.description == "internal error"
    assert refused.parent is None and refused.status.status_code == StatusCode.UNSET
    assert refused.attributes["rpc.grpc.status_code"] == 3


async def test_fastapis_server_span_is_current_in_the_route_and_skips_probes(exported):
    app = FastAPI(telemetry=tracing.fastapi_telemetry())

    @app.post("/v1/things/{thing_id}")
    async def thing(thing_id: str, request: Request):
        return {"traceparent": tracing.traceparent(request.headers.get("traceparent"))}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        carried = (await client.post("/v1/things/7", headers={"traceparent": CLIENT})).json()["traceparent"]
        assert (await client.get("/health")).status_code == 200
    (span,) = exported.get_finished_spans()  # none for the probe
    assert span.name == "POST /v1/things/{thing_id}" and span.kind == SpanKind.SERVER
    assert span.parent.span_id == int(CLIENT_SPAN, 16)
    assert carried == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"


def test_off_fastapi_has_no_telemetry_whatever_the_global_providers():
    assert tracing.fastapi_telemetry() == {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}


OFF_SCRIPT = """
import asyncio, json, sys
import httpx
from server import tracing
from server.http.app import create_app
from server.jobs import Job, UnderstandParams
from server.metrics import Metrics
from server.queue import create_queue
from server.rpc import gate  # the gRPC gate, imported as the server imports it
from server.service import Origin, Service
from server.settings import Settings
before = {m for m in sys.modules if m.startswith("opentelemetry")}
settings = Settings(playground=False)
tracing.configure(settings.otlp_traces_endpoint, "serve")
app = create_app(settings, Service(settings, create_queue("memory")), Metrics())
async def main():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return (await client.get("/health", headers={"traceparent": sys.argv[1]})).status_code
status = asyncio.run(main())
origin = Origin.of("/v1/understand", None, None, sys.argv[1])
tracing.record_job(Job(kind="understand", params=UnderstandParams(prompt="hi")), {"created": 1.0}, "failed")
with tracing.rpc_span("/janus.v1.Janus/Understand", [("traceparent", sys.argv[1])]) as span:
    pass
after = {m for m in sys.modules if m.startswith("opentelemetry")}
print(json.dumps({"enabled": tracing.enabled(), "status": status, "carried": origin.traceparent, "span": span,
                  "new": sorted(after - before), "sdk": sorted(m for m in after if m.startswith("opentelemetry.sdk"))}))
"""


def test_off_imports_nothing_of_opentelemetry_and_adds_nothing():
    """Off: no OpenTelemetry module is imported beyond the API package FastAPI itself imports (never the SDK), and
    a request runs through no telemetry; the client's traceparent still reaches the job."""
    env = {k: v for k, v in os.environ.items() if "OTLP" not in k and not k.startswith("OTEL_")}
    run = subprocess.run([sys.executable, "-c", OFF_SCRIPT, CLIENT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"enabled": False, "status": 200, "carried": CLIENT, "span": None, "new": [], "sdk": []}


# --- the setting and the extra ---------------------------------------------------------------------------


def test_the_flag_wins_over_janus_which_wins_over_opentelemetrys_variable(monkeypatch):
    for key in ("JANUS_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    assert Settings().otlp_traces_endpoint is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://otel:4318/v1/traces")
    assert Settings().otlp_traces_endpoint == "http://otel:4318/v1/traces"
    monkeypatch.setenv("JANUS_OTLP_TRACES_ENDPOINT", "http://janus:4318/v1/traces")
    assert Settings().otlp_traces_endpoint == "http://janus:4318/v1/traces"
    assert Settings(otlp_traces_endpoint="http://flag:4318").otlp_traces_endpoint == "http://flag:4318"
    monkeypatch.setenv("JANUS_OTLP_TRACES_ENDPOINT", "")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    assert Settings().otlp_traces_endpoint is None


@pytest.mark.parametrize("bad", ["collector:4318", "grpc://collector:4317", "http://", "/v1/traces"])
def test_an_endpoint_must_be_an_http_url(bad):
    with pytest.raises(ValueError, match="must be an http:// or https:// URL"):
        Settings(otlp_traces_endpoint=bad)


def test_serve_hands_the_endpoint_to_its_workers():
    from server.supervisor import settings_env

    env = settings_env(Settings(otlp_traces_endpoint="http://collector:4318/v1/traces"))
    assert env["JANUS_OTLP_TRACES_ENDPOINT"] == "http://collector:4318/v1/traces"


@pytest.mark.parametrize("given, url", [
    ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces"),
    ("http://collector:4318", "http://collector:4318/v1/traces"),
    ("https://collector/", "https://collector/v1/traces"),
    ("http://collector:4318/otlp/v1/traces", "http://collector:4318/otlp/v1/traces"),
])
def test_export_url(given, url):
    assert tracing.export_url(given) == url


def test_without_the_extra_configure_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if opentelemetry-sdk were not installed
    with pytest.raises(tracing.TracingUnavailable, match=r"pip install 'janus-server\[tracing\]'"):
        tracing.configure("http://127.0.0.1:4318/v1/traces", "api")
    assert not tracing.enabled()


def test_the_tracing_extra_is_locked_for_both_images():
    """requirements/tracing.in is pyproject.toml's tracing extra; serve.txt and api.txt pin all of it."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tracing"]
    lines = [line.split("#", 1)[0].strip() for line in (REPO / "requirements" / "tracing.in").read_text().splitlines()]
    assert sorted(str(Requirement(r)) for r in extra) == sorted(str(Requirement(r)) for r in lines if r)
    for lock in ("serve.txt", "api.txt", "test.txt"):
        text = (REPO / "requirements" / lock).read_text()
        for req in map(Requirement, extra):
            assert f"\n{req.name}==" in text, f"{lock} does not pin {req.name}"
