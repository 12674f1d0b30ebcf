"""Previews from a real `janus-server serve` (in-process queue and Redis): native SSE, OpenAI's image stream read by
the official SDK, async job events; and the requests that cannot have them.

The server runs a 384 px tiny checkpoint (576 steps, a few seconds per image on CPU: a preview comes back long
before its image ends) with the preview decoder's share at 1, so the budget never skips one.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
from PIL import Image

from tests.support import redis_fixture
from tests.support.servers import ServerProcess, start_server

redis_server = redis_fixture.redis_server
ASYNC = {"Prefer": "respond-async", "Authorization": "Bearer previews"}


@pytest.fixture(scope="module")
def tiny_384_dir(tmp_path_factory):
    from janus_core.tiny.janus import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-384"), "hf", seed=0, image_size=384)


@pytest.fixture(scope="module", params=["memory", "redis"])
def preview_server(request, tiny_384_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    args = ["serve", "--model", str(tiny_384_dir)]
    if request.param == "redis":
        args += ["--queue", request.getfixturevalue("redis_server").url, "--workers", "1"]
    proc = start_server(args, tmp_path_factory.mktemp(f"previews-{request.param}"), {"JANUS_PREVIEW_SHARE": "1"})
    yield proc
    proc.stop()


def _image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _events(response: httpx.Response) -> list:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_native_stream_sends_previews_then_the_images(preview_server):
    body = {"prompt": "a red square", "n": 2, "seed": 4, "stream": True, "previews": 3}
    with httpx.stream("POST", preview_server.url + "/v1/generate", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = _events(r)
    previews = [e for e in events if "preview" in e]
    assert 2 <= len(previews) <= 6  # both images of at least one step; at most 3 steps
    assert {p["image"] for p in previews} == {0, 1}
    for p in previews:
        assert set(p) == {"step", "total", "image", "preview"} and p["total"] == 576
        assert 144 <= p["step"] < 576
        image = _image(p["preview"])
        assert (image.format, image.size) == ("PNG", (384, 384))
        assert image.getpixel((192, 383)) == (128, 128, 128)  # the bottom rows were not generated yet
    final = events[-1]
    assert events.index(previews[-1]) < len(events) - 1 and len(final["images"]) == 2
    plain = httpx.post(preview_server.url + "/v1/generate", json={"prompt": "a red square", "n": 2, "seed": 4},
                       timeout=120).json()
    assert [i["b64_png"] for i in final["images"]] == [i["b64_png"] for i in plain["images"]]


def test_the_openai_sdk_reads_partial_images_then_the_image(preview_server):
    client = openai.OpenAI(base_url=preview_server.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    events = list(client.images.generate(model=model, prompt="a cat", stream=True, partial_images=2,
                                         output_format="jpeg", extra_body={"seed": 9}))
    types = [type(e).__name__ for e in events]
    assert types[-1] == "ImageGenCompletedEvent" and 1 <= types.count("ImageGenPartialImageEvent") <= 2, types
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert [p.partial_image_index for p in partials] == list(range(len(partials)))
    assert all(_image(p.b64_json).format == "JPEG" and p.output_format == "jpeg" for p in partials)
    done = events[-1]
    assert (done.size, done.output_format, done.background) == ("384x384", "jpeg", "opaque")
    assert done.usage.output_tokens == 576 and done.usage.input_tokens > 0
    plain = client.images.generate(model=model, prompt="a cat", output_format="jpeg", extra_body={"seed": 9})
    assert done.b64_json == plain.data[0].b64_json


def test_an_images_timings_add_up_to_the_wall_time_the_client_saw(preview_server):
    started = time.perf_counter()
    r = httpx.post(preview_server.url + "/v1/generate", json={"prompt": "a cat", "seed": 3}, timeout=120)
    wall = (time.perf_counter() - started) * 1000.0
    assert r.status_code == 200, r.text
    timings = r.json()["timings"]
    assert list(timings) == ["queue", "prefill", "decode", "encode", "total"]
    assert r.headers["server-timing"] == ", ".join(f"{k};dur={v}" for k, v in timings.items())
    phases = sum(v for k, v in timings.items() if k != "total")
    assert phases <= timings["total"] + 0.5 and timings["total"] <= wall
    assert abs(wall - phases) <= 0.10 * wall, (timings, wall)


def test_previews_need_a_stream_or_an_async_job(preview_server):
    url = preview_server.url
    r = httpx.post(url + "/v1/generate", json={"prompt": "a cat", "previews": 2}, timeout=30)
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/generate", json={"prompt": "a cat", "previews": 9, "stream": True}, timeout=30)
    assert r.status_code == 422 and "previews" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/images/generations", json={"prompt": "a cat", "partial_images": 2}, timeout=30)
    assert r.status_code == 400 and "partial_images" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/images/generations", json={"prompt": "a cat", "partial_images": 4, "stream": True},
                   timeout=30)
    assert r.status_code == 400 and "partial_images" in r.json()["error"]["message"]


def test_async_job_events_carry_previews(preview_server):
    r = httpx.post(preview_server.url + "/v1/generate", json={"prompt": "a cat", "seed": 1, "previews": 2},
                   headers=ASYNC, timeout=30)
    assert r.status_code == 202, r.text
    named = []
    with httpx.stream("GET", preview_server.url + r.headers["location"] + "/events", headers=ASYNC,
                      timeout=120) as events:
        name = None
        for line in events.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                named.append((name, json.loads(line[6:])))
    previews = [data for name, data in named if name == "preview"]
    assert 1 <= len(previews) <= 2 and all(_image(p["preview"]).size == (384, 384) for p in previews)
    assert named[-1][0] == "job" and named[-1][1]["status"] == "succeeded"
    # previews are for watching it run: once it ended they are not kept with its result
    with httpx.stream("GET", preview_server.url + r.headers["location"] + "/events", headers=ASYNC,
                      timeout=60) as events:
        replay = [line[7:] for line in events.iter_lines() if line.startswith("event: ")]
    assert "preview" not in replay and "progress" in replay and replay[-1] == "job"


def test_grpc_streams_previews_and_trails_its_timings(preview_server):
    from server.rpc.gen.janus.v1 import janus_pb2, janus_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{preview_server.grpc_port}") as channel:
        stub = janus_pb2_grpc.JanusStub(channel)
        call = stub.GenerateStream(janus_pb2.GenerateRequest(prompt="a cat", seed=2, previews=2), timeout=120)
        events = list(call)
        previews = [e.preview for e in events if e.HasField("preview")]
        assert 1 <= len(previews) <= 2 and events[-1].HasField("result")
        assert all(p.index == 0 and 144 <= p.step < 576 and Image.open(io.BytesIO(p.png)).size == (384, 384)
                   for p in previews)
        assert "decode;dur=" in dict(call.trailing_metadata())["server-timing"]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(janus_pb2.GenerateRequest(prompt="a cat", previews=2), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream" in refused.value.details()
        reply, unary = stub.Generate.with_call(janus_pb2.GenerateRequest(prompt="a cat", seed=2), timeout=120)
        assert reply.png == events[-1].result.png
        timings = dict(unary.trailing_metadata())["server-timing"]
        assert [part.split(";")[0] for part in timings.split(", ")] == ["queue", "prefill", "decode", "encode", "total"]
