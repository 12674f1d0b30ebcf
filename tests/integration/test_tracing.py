"""Traces end to end: real `janus-server serve` processes export over OTLP/HTTP to a real receiver
(tests/support/otlp.py). A client's traceparent is continued by the HTTP or gRPC server span, carried through the
Redis queue, and the worker's job and phase spans join the same trace from the other process; in-process serve
traces the same way and flushes its spans when it stops. Without the tracing extra the flag is refused, naming it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from server.rpc.gen.janus.v1 import janus_pb2, janus_pb2_grpc
from tests.support import redis_fixture
from tests.support.images import b64, png_bytes
from tests.support.otlp import OtlpReceiver, Span
from tests.support.servers import ServerProcess, free_port, start_server

redis_server = redis_fixture.redis_server

REPO = Path(__file__).resolve().parents[2]
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # batches go out every 0.1 s (5 s by default)
GENERATE_PHASES = {"queue wait", "prefill", "decode", "image decode", "encode"}
UNDERSTAND_PHASES = {"queue wait", "prefill", "decode", "encode"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def redis_stack(tiny_hf_dir: Path, redis_server: redis_fixture.RedisServer, receiver: OtlpReceiver,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """serve over Redis with one worker process: the api's spans and the worker's come from two processes."""
    args = ["serve", "--model", str(tiny_hf_dir), "--queue", redis_server.url, "--workers", "1",
            "--otlp-traces-endpoint", receiver.endpoint]
    proc = start_server(args, tmp_path_factory.mktemp("tracing-redis"),
                        {"JANUS_METRICS_PORT": str(free_port()), **FAST_EXPORT})
    yield proc
    proc.stop()


def client_traceparent() -> tuple[str, str, str]:
    """A client's traceparent, its trace id and its span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def names(spans: Iterable[Span]) -> set[str]:
    return {s.name for s in spans}


def one(spans: Iterable[Span], name: str) -> Span:
    (found,) = [s for s in spans if s.name == name]
    return found


def assert_job_spans(spans: list[Span], parent: Span, kind: str, phases: set[str], job_id: str, role: str) -> None:
    """The job's span under `parent`, its phases under it, all from the process of `role`."""
    job = one(spans, f"janus.job {kind}")
    assert job.parent_id == parent.span_id and job.kind == "CONSUMER" and job.role == role
    assert job.attributes["janus.job_id"] == job_id and job.attributes["janus.status"] == "succeeded"
    assert job.status == "UNSET"
    for name in phases:
        phase = one(spans, name)
        assert phase.parent_id == job.span_id and phase.role == role, name
        assert job.start_ns <= phase.start_ns <= phase.end_ns <= job.end_ns, name


def test_one_trace_holds_the_http_request_and_the_workers_phases(redis_stack: ServerProcess,
                                                                 receiver: OtlpReceiver) -> None:
    header, trace_id, client_span = client_traceparent()
    r = httpx.post(redis_stack.url + "/v1/generate", json={"prompt": "a red fox", "seed": 7},
                   headers={"traceparent": header}, timeout=120)
    assert r.status_code == 200, r.text
    spans = receiver.wait_for(lambda s: {"POST /v1/generate", "janus.job generate"} | GENERATE_PHASES <= names(s),
                              trace_id=trace_id)
    http = one(spans, "POST /v1/generate")
    assert http.kind == "SERVER" and http.parent_id == client_span  # the client's trace, continued
    assert http.role == "serve" and http.resource["process.pid"] == redis_stack.proc.pid
    assert http.attributes["http.response.status_code"] == 200
    assert_job_spans(spans, http, "generate", GENERATE_PHASES, r.json()["id"], role="worker")
    worker = one(spans, "janus.job generate").resource
    assert worker["process.pid"] != redis_stack.proc.pid  # another process: the worker serve started
    assert worker["service.name"] == http.resource["service.name"] == "janus-server"
    assert receiver.refused == []


def test_a_grpc_call_continues_the_trace_to_the_worker(redis_stack: ServerProcess, receiver: OtlpReceiver) -> None:
    header, trace_id, client_span = client_traceparent()
    with grpc.insecure_channel(f"127.0.0.1:{redis_stack.grpc_port}") as channel:
        stub = janus_pb2_grpc.JanusStub(channel)
        reply = stub.Understand(janus_pb2.UnderstandRequest(prompt="What is this?", images=[png_bytes()],
                                                            max_new_tokens=4),
                                metadata=[("traceparent", header)], timeout=120)
        stream_header, stream_trace, _ = client_traceparent()  # a streaming call: its generator runs in the span
        chunks = list(stub.UnderstandStream(janus_pb2.UnderstandRequest(prompt="What is this?", images=[png_bytes()],
                                                                        max_new_tokens=4),
                                            metadata=[("traceparent", stream_header)], timeout=120))
        refused_header, refused_trace, _ = client_traceparent()
        with pytest.raises(grpc.RpcError) as info:  # a bad request: its span says so, without an error status
            stub.Understand(janus_pb2.UnderstandRequest(prompt=""), metadata=[("traceparent", refused_header)],
                            timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rpc_name = "janus.v1.Janus/Understand"
    spans = receiver.wait_for(lambda s: {rpc_name, "janus.job understand"} | UNDERSTAND_PHASES <= names(s),
                              trace_id=trace_id)
    rpc = one(spans, rpc_name)
    assert rpc.kind == "SERVER" and rpc.parent_id == client_span and rpc.role == "serve"
    assert rpc.attributes["rpc.system"] == "grpc" and rpc.attributes["rpc.grpc.status_code"] == 0
    assert_job_spans(spans, rpc, "understand", UNDERSTAND_PHASES, reply.id, role="worker")
    streamed = receiver.wait_for(lambda s: {f"{rpc_name}Stream", "janus.job understand"} <= names(s),
                                 trace_id=stream_trace)
    assert_job_spans(streamed, one(streamed, f"{rpc_name}Stream"), "understand", UNDERSTAND_PHASES, chunks[0].id,
                     role="worker")
    (refused,) = receiver.wait_for(lambda s: rpc_name in names(s), trace_id=refused_trace)
    assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused.status == "UNSET"  # the client's fault, not the server's


def test_in_process_serve_traces_the_request_and_flushes_when_it_stops(tiny_hf_dir: Path, receiver: OtlpReceiver,
                                                                       tmp_path: Path) -> None:
    """One process (the in-process queue): the HTTP span and the job's, all of role serve. Batches wait a
    minute here, so the spans arrive only because stopping the server flushes them."""
    proc = start_server(["serve", "--model", str(tiny_hf_dir), "--otlp-traces-endpoint", receiver.endpoint],
                        tmp_path, {"OTEL_BSP_SCHEDULE_DELAY": "60000"})
    try:
        header, trace_id, client_span = client_traceparent()
        r = httpx.post(proc.url + "/v1/understand", json={"prompt": "What is this?", "images": [b64(png_bytes())],
                                                          "max_new_tokens": 4},
                       headers={"traceparent": header}, timeout=120)
        assert r.status_code == 200, r.text
        assert receiver.spans(trace_id) == []  # still batched
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
    spans = receiver.wait_for(lambda s: {"POST /v1/understand", "janus.job understand"} <= names(s),
                              trace_id=trace_id, timeout=5)
    http = one(spans, "POST /v1/understand")
    assert http.parent_id == client_span and http.role == "serve"
    assert_job_spans(spans, http, "understand", UNDERSTAND_PHASES, r.json()["id"], role="serve")
    assert {s.resource["process.pid"] for s in spans} == {proc.proc.pid}


BLOCKED = ("import runpy, sys\n"
           "sys.modules['opentelemetry.sdk'] = sys.modules['opentelemetry.exporter'] = None  # the extra is missing\n"
           "sys.argv = ['janus-server', *sys.argv[1:]]\n"
           "runpy.run_module('server.cli', run_name='__main__')\n")


@pytest.mark.parametrize("command", [["serve", "--model", "/nonexistent"], ["api", "--queue", "redis://127.0.0.1:1/0"],
                                     ["worker", "--queue", "redis://127.0.0.1:1/0", "--model", "/nonexistent"]])
def test_the_flag_without_the_extra_is_refused_naming_it(command: list[str]) -> None:
    run = subprocess.run([sys.executable, "-c", BLOCKED, *command, "--otlp-traces-endpoint",
                          "http://127.0.0.1:4318/v1/traces"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "pip install 'janus-server[tracing]'" in run.stderr
    assert "Traceback" not in run.stderr


def test_opentelemetrys_variable_turns_it_on_too() -> None:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}
    env.pop("JANUS_OTLP_TRACES_ENDPOINT", None)
    run = subprocess.run([sys.executable, "-c", BLOCKED, "api", "--queue", "redis://127.0.0.1:1/0"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "janus-server[tracing]" in run.stderr, run.stderr[-3000:]
