"""JanusFlow end to end: a real `janus-server serve` of the tiny JanusFlow checkpoint, over REST, the OpenAI
images route and gRPC; the same request gives the same PNG on every surface, and that PNG is the official
algorithm's (tests.support.flow_reference) to within one level. Parameters that mean nothing for the model are a 400.
"""

from __future__ import annotations

import base64
import io
import json

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from server.rpc.client import Images, JanusClient, Progress
from tests.support.images import b64, png_bytes

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def http(flow_server):
    with httpx.Client(base_url=flow_server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(flow_server):
    with JanusClient(f"127.0.0.1:{flow_server.grpc_port}", timeout=60) as client:
        yield client


def rest_png(http: httpx.Client, **body) -> bytes:
    r = http.post("/v1/generate", json={"prompt": PROMPT, **body}, headers={"Accept": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return r.content


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_models_says_flow(http):
    data = http.get("/v1/models").json()["data"]
    assert [m["generator"] for m in data] == ["flow"]


def test_rest_png_is_the_official_algorithm(http, tiny_flow_dir):
    from janus_core.models.loader import load_model
    from janus_core.text.processor import build_generation_ids
    from tests.support.flow_checks import assert_same_pixels, noise
    from tests.support.flow_reference import reference_latents, reference_pixels

    png = rest_png(http, steps=4, seed=21, cfg_weight=3.0)
    lm = load_model(str(tiny_flow_dir), device="cpu")
    z = reference_latents(lm, build_generation_ids(lm, PROMPT), noise(lm, 21, 1), 3.0, 4)
    assert_same_pixels(pixels(png)[None], reference_pixels(lm, z))


def test_same_seed_same_png_and_defaults(http):
    from tests.support.flow_checks import assert_same_pixels

    first = rest_png(http, steps=3, seed=5)
    assert rest_png(http, steps=3, seed=5) == first
    assert rest_png(http, steps=3, seed=5, cfg_weight=2.0) == first  # 2.0 is the flow default
    assert rest_png(http, steps=3, seed=5, cfg_weight=5.0) != first
    assert rest_png(http, steps=4, seed=5) != first
    assert rest_png(http, steps=3, seed=6) != first
    r = http.post("/v1/generate", json={"prompt": PROMPT, "n": 2, "steps": 3, "seed": 5})
    body = r.json()
    assert r.status_code == 200 and body["seed"] == 5 and len(body["images"]) == 2
    # Image 0 of a request of two starts from the same noise (seed 5): the same image, to fp32 batching noise.
    assert_same_pixels(pixels(base64.b64decode(body["images"][0]["b64_png"]))[None], pixels(first)[None])


def test_stream_reports_each_ode_step(http):
    with http.stream("POST", "/v1/generate", json={"prompt": PROMPT, "steps": 5, "seed": 1, "stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    progress = [json.loads(e) for e in events[:-2]]
    assert progress == [{"step": k, "total": 5} for k in range(1, 6)]
    assert len(json.loads(events[-2])["images"]) == 1


def test_openai_images_route_takes_steps_and_guidance(http):
    r = http.post("/v1/images/generations", json={"prompt": PROMPT, "n": 1, "response_format": "b64_json",
                                                   "steps": 3, "guidance_scale": 5.0, "seed": 5})
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["data"][0]["b64_json"]) == rest_png(http, steps=3, seed=5, cfg_weight=5.0)


def test_grpc_equals_rest_and_streams_steps(http, grpc_client):
    images = grpc_client.generate(PROMPT, steps=3, seed=5, cfg_weight=5.0)
    assert images.pngs == [rest_png(http, steps=3, seed=5, cfg_weight=5.0)]
    events = list(grpc_client.generate_stream(PROMPT, steps=4, seed=2))
    assert [(e.step, e.total) for e in events if isinstance(e, Progress)] == [(k, 4) for k in range(1, 5)]
    assert isinstance(events[-1], Images) and len(events[-1].pngs) == 1


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"top_p": 0.9}, 400, "top_p"),
    ({"temperature": 0.0}, 400, "temperature"),
    ({"steps": 0}, 422, "steps"),
    ({"steps": 101}, 422, "steps"),
])
def test_rest_refuses_meaningless_parameters(http, body, status, words):
    r = http.post("/v1/generate", json={"prompt": PROMPT, **body})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_openai_and_grpc_refuse_meaningless_parameters(http, grpc_client):
    r = http.post("/v1/images/generations", json={"prompt": PROMPT, "temperature": 1.0})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as err:
        grpc_client.generate(PROMPT, top_p=0.5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details()


def test_understanding_on_janusflow(http):
    r = http.post("/v1/understand", json={"prompt": "What is in this image?", "images": [b64(png_bytes())],
                                          "max_new_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_completions_and_image_formats_on_janusflow(http):
    """JanusFlow's LM serves plain completions (with the sampling extensions), and its images any output format."""
    model = http.get("/v1/models").json()["data"][0]["id"]
    r = http.post("/v1/completions", json={"model": model, "prompt": "Once upon a time", "max_tokens": 6,
                                           "temperature": 0.8, "seed": 1, "ignore_eos": True, "top_k": 20})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6 and r.json()["choices"][0]["finish_reason"] == "length"
    r = http.post("/v1/generate", json={"prompt": PROMPT, "steps": 2, "seed": 3, "output_format": "webp"})
    assert r.status_code == 200 and r.json()["output_format"] == "webp"
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["b64_webp"]))).format == "WEBP"


def test_janus_pro_refuses_steps(server):
    r = httpx.post(f"{server.url}/v1/generate", json={"prompt": PROMPT, "steps": 10}, timeout=60)
    assert r.status_code == 400 and "steps" in r.json()["error"]["message"]
    assert [m["generator"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]] == ["vq"]


def test_openapi_documents_the_parameters_each_model_takes(flow_server, server):
    cases = ((flow_server.url, "steps", ("temperature", "top_p")), (server.url, "temperature", ("steps",)))
    for url, has, lacks in cases:
        schemas = httpx.get(f"{url}/openapi.json", timeout=30).json()["components"]["schemas"]
        for body in ("GenerateBody", "ImagesGenerationsBody"):
            fields = schemas[body]["properties"]
            assert has in fields and not any(f in fields for f in lacks), (url, body, sorted(fields))
