"""gRPC against the real `janus-server serve`: same outputs as REST, streaming, health, cancellation."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.rpc.client import JanusClient, Progress
from tests.support.images import b64, png_bytes
from tests.support.metrics import scrape, value
from tests.support.servers import metric, start_server, tokens_after_stop

IMAGE = png_bytes()


@pytest.fixture(scope="module")
def client(server):
    with JanusClient(f"127.0.0.1:{server.grpc_port}", timeout=60) as c:
        yield c


def test_health_is_serving(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="janus.v1.Janus"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_understand_equals_rest(server, client):
    answer = client.understand("What is in the image?", [IMAGE], max_new_tokens=12, temperature=0.7, top_p=0.9,
                               seed=5)
    rest = httpx.post(server.url + "/v1/understand", json={
        "prompt": "What is in the image?", "images": [b64(IMAGE)], "max_new_tokens": 12, "temperature": 0.7,
        "top_p": 0.9, "seed": 5}, timeout=60).json()
    assert answer.text == rest["text"]
    assert answer.finish_reason == rest["finish_reason"]
    assert answer.completion_tokens == rest["usage"]["completion_tokens"]


def test_understand_stream_adds_up(client):
    chunks = list(client.understand_stream("Describe", [IMAGE], max_new_tokens=8))
    whole = client.understand("Describe", [IMAGE], max_new_tokens=8)
    assert "".join(c.delta for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason


def test_generate_equals_rest(server, client):
    images = client.generate("a red fox", n=2, seed=11, temperature=0.8)
    rest = httpx.post(server.url + "/v1/generate", json={"prompt": "a red fox", "n": 2, "seed": 11,
                                                         "temperature": 0.8}, timeout=60).json()
    assert images.seed == 11
    assert [base64.b64encode(p).decode() for p in images.pngs] == [i["b64_png"] for i in rest["images"]]


def test_generate_stream_progress_then_result(client):
    events = list(client.generate_stream("a fox", seed=3))
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert steps == list(range(1, 17))
    assert len(events[-1].pngs) == 1 and events[-1].seed == 3


def test_cancel_stops_the_job(server, client):
    tokens_before = metric(server.url, "janus_generated_tokens_total")
    stream = client.understand_stream("Describe every detail", [IMAGE], max_new_tokens=880)
    next(iter(stream))  # the job runs
    stream.cancel() if hasattr(stream, "cancel") else stream.close()
    # Had the cancel not reached the engine, the job would have written all 880 tokens.
    assert tokens_after_stop(server.url, tokens_before) < 880 / 2


def test_bad_input_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as info:
        client.generate("a fox", n=1000)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "n must be between" in info.value.details()


def test_grpc_requests_are_counted(server, client):
    before = value(scrape(server.url), "janus_requests_total", endpoint="/janus.v1.Janus/Generate", status="OK")
    client.generate("a fox", seed=1)
    after = value(scrape(server.url), "janus_requests_total", endpoint="/janus.v1.Janus/Generate", status="OK")
    assert after - before == 1


def test_command_line_names_each_image_with_its_own_seed(server, tmp_path, capsys):
    """Image i of seed s is image 0 of seed s + i (README, Seeds): the CLI labels each file so."""
    from server.rpc.client import main

    prefix = str(tmp_path / "fox")
    assert main(["--target", f"127.0.0.1:{server.grpc_port}", "--timeout", "60", "generate", "a fox", "-n", "2",
                 "--seed", "7", "-o", prefix]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{prefix}-0.png (seed 7)", f"{prefix}-1.png (seed 8)"]
    alone = httpx.post(server.url + "/v1/generate", json={"prompt": "a fox", "seed": 8}, timeout=60,
                       headers={"Accept": "image/png"})
    assert (tmp_path / "fox-1.png").read_bytes() == alone.content


def test_a_refused_call_is_in_the_access_log(server, client):
    """gRPC calls get the REST access log's line: the rpc, its status and the refusal's reason."""
    import json
    import time

    with pytest.raises(grpc.RpcError):
        client.generate("a fox", n=999)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the line is written as the call ends: wait for it to appear
        lines = [json.loads(line) for line in server.log().splitlines()
                 if '"janus.access"' in line and "/janus.v1.Janus/Generate" in line and "n must be" in line]
        if lines:
            break
        time.sleep(0.05)
    assert lines[-1]["status"] == "INVALID_ARGUMENT" and lines[-1]["method"] == "gRPC"
    assert lines[-1]["msg"].startswith("gRPC /janus.v1.Janus/Generate INVALID_ARGUMENT ")


@pytest.fixture(scope="module")
def keyed_server(tiny_hf_dir, tmp_path_factory):
    """`serve` with a keys file: team-a may send one request a minute, team-b has no limit of its own."""
    directory = tmp_path_factory.mktemp("keyed")
    digest = {name: hashlib.sha256(f"{name}-secret".encode()).hexdigest() for name in ("team-a", "team-b")}
    (directory / "keys.yaml").write_text(f"""keys:
  - {{name: team-a, sha256: {digest["team-a"]}, requests_per_minute: 1}}
  - {{name: team-b, sha256: {digest["team-b"]}}}
""")
    proc = start_server(["serve", "--model", str(tiny_hf_dir), "--api-keys-file", str(directory / "keys.yaml")],
                        directory, env={"JANUS_OPEN_METRICS": "true"})
    yield proc
    proc.stop()


def test_keys_file_quotas_apply_over_grpc(keyed_server):
    target = f"127.0.0.1:{keyed_server.grpc_port}"
    with JanusClient(target, api_key="team-a-secret", timeout=60) as team_a, \
            JanusClient(target, api_key="team-b-secret", timeout=60) as team_b, JanusClient(target) as anonymous:
        assert team_a.understand("Describe", [IMAGE], max_new_tokens=4).completion_tokens > 0
        with pytest.raises(grpc.RpcError) as info:
            team_a.understand("Describe", [IMAGE], max_new_tokens=4)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'team-a'" in info.value.details() and "per minute" in info.value.details()
        assert 1 <= int(dict(info.value.trailing_metadata())["retry-after"]) <= 60
        assert team_b.understand("Describe", [IMAGE], max_new_tokens=4).completion_tokens > 0  # served meanwhile
        with pytest.raises(grpc.RpcError) as info:
            anonymous.understand("Describe", [IMAGE], max_new_tokens=4)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert metric(keyed_server.url, "janus_rate_limited_total", key="team-a") == 1

    deadline = time.monotonic() + 30
    while True:  # access lines are written as calls end: wait for the refusal's
        lines = [json.loads(line) for line in keyed_server.log().splitlines() if '"janus.access"' in line]
        refused = [line for line in lines if line["status"] == "RESOURCE_EXHAUSTED"]
        if refused or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [line.get("key") for line in refused] == ["team-a"]
    assert "-secret" not in keyed_server.log()  # names in logs, never keys
