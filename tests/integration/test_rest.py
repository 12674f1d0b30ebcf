"""The REST API of `janus-server serve` on the in-process queue, driven over real HTTP."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.images import b64, png_bytes


def _sse(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_health_ready_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"


def test_understand_json_matches_the_engine(server, tiny_hf, image_b64):
    from janus_core.simple.understand import understand

    body = {"prompt": "What is in the image?", "images": [image_b64], "max_new_tokens": 12}
    r = httpx.post(server.url + "/v1/understand", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    expected = understand(tiny_hf, [Image.open(io.BytesIO(png_bytes())).convert("RGB")], body["prompt"],
                          max_new_tokens=12)
    assert data["text"] == expected.text
    assert data["finish_reason"] == expected.finish_reason
    assert data["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": expected.completion_tokens}
    assert data["id"]


def test_understand_data_url_and_several_images(server, image_b64):
    body = {"prompt": "Compare", "images": ["data:image/png;base64," + image_b64, b64(png_bytes((30, 60)))],
            "max_new_tokens": 4}
    r = httpx.post(server.url + "/v1/understand", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 2 * 16


def test_understand_multipart_equals_json(server, image_b64):
    files = [("image", ("a.png", png_bytes(), "image/png"))]
    form = {"prompt": "Describe", "max_new_tokens": "6"}
    r = httpx.post(server.url + "/v1/understand", data=form, files=files, timeout=60)
    assert r.status_code == 200, r.text
    j = httpx.post(server.url + "/v1/understand", json={"prompt": "Describe", "images": [image_b64],
                                                         "max_new_tokens": 6}, timeout=60)
    assert r.json()["text"] == j.json()["text"]


def test_understand_stream(server, image_b64):
    body = {"prompt": "Describe", "images": [image_b64], "max_new_tokens": 10, "stream": True}
    with httpx.stream("POST", server.url + "/v1/understand", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["finish_reason"] in ("stop", "length")
    assert final["usage"]["completion_tokens"] <= 10
    deltas = "".join(e["delta"] for e in events[:-2])
    assert deltas == final["text"]


def test_generate_json_seeded_and_reproducible(server):
    body = {"prompt": "a red boat", "n": 2, "seed": 42}
    a = httpx.post(server.url + "/v1/generate", json=body, timeout=60).json()
    b = httpx.post(server.url + "/v1/generate", json=body, timeout=60).json()
    assert a["seed"] == 42 and len(a["images"]) == 2
    assert a["images"] == b["images"]
    pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["b64_png"])))) for i in a["images"]]
    assert pixels[0].shape == (64, 64, 3)
    assert not np.array_equal(pixels[0], pixels[1])


def test_generate_unseeded_reports_seed(server):
    first = httpx.post(server.url + "/v1/generate", json={"prompt": "a hill"}, timeout=60).json()
    again = httpx.post(server.url + "/v1/generate", json={"prompt": "a hill", "seed": first["seed"]},
                       timeout=60).json()
    assert first["images"] == again["images"]


def test_generate_greedy_equals_engine(server, tiny_hf):
    from janus_core.images import encode_png
    from janus_core.sampling.params import SamplingParams
    from janus_core.simple.generate import generate_images

    r = httpx.post(server.url + "/v1/generate", json={"prompt": "a cat", "temperature": 0}, timeout=60)
    expected = generate_images(tiny_hf, "a cat", params=SamplingParams(temperature=0.0))
    assert base64.b64decode(r.json()["images"][0]["b64_png"]) == encode_png(expected.images[0])


def test_generate_png_accept(server):
    r = httpx.post(server.url + "/v1/generate", json={"prompt": "a cat", "seed": 3},
                   headers={"Accept": "image/png"}, timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "3"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)


def test_generate_stream(server):
    with httpx.stream("POST", server.url + "/v1/generate", json={"prompt": "a cat", "stream": True, "n": 2},
                      timeout=60) as r:
        events = _sse(r)
    assert events[-1] == "[DONE]"
    steps = [e["step"] for e in events if isinstance(e, dict) and "step" in e]
    assert steps == list(range(1, 17))
    assert all(e["total"] == 16 for e in events if isinstance(e, dict) and "step" in e)
    assert len(events[-2]["images"]) == 2 and "seed" in events[-2]


def test_request_id_round_trip(server):
    r = httpx.get(server.url + "/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(server.url + "/health").headers["x-request-id"]) >= 16


def test_concurrent_mixed_requests(server, image_b64):
    def call(i: int):
        if i % 2:
            return httpx.post(server.url + "/v1/generate", json={"prompt": f"image {i}", "seed": i}, timeout=120)
        return httpx.post(server.url + "/v1/understand", json={"prompt": f"q{i}", "images": [image_b64],
                                                               "max_new_tokens": 8}, timeout=120)

    with cf.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(call, range(24)))
    assert [r.status_code for r in responses] == [200] * 24
    seeds = [r.json()["seed"] for i, r in enumerate(responses) if i % 2]
    assert seeds == [i for i in range(24) if i % 2]


def test_seeded_results_are_identical_to_the_byte(server, image_b64):
    """A seed gives the same PNG bytes alone, as image 0 of n=3 and beside other requests; and the same
    sampled text alone and in a crowd."""
    gen = {"prompt": "a lighthouse at dusk", "seed": 7}
    und = {"prompt": "Describe it.", "images": [image_b64], "max_new_tokens": 16, "temperature": 1.0, "seed": 5}

    def png(body: dict) -> list[bytes]:
        r = httpx.post(server.url + "/v1/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [base64.b64decode(image["b64_png"]) for image in r.json()["images"]]

    def text(body: dict) -> str:
        r = httpx.post(server.url + "/v1/understand", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    alone, alone_text = png(gen)[0], text(und)
    three = png({**gen, "n": 3})
    assert three[0] == alone and len(set(three)) == 3
    others = [lambda i=i: png({"prompt": f"crowd {i}", "n": 2, "seed": 100 + i}) for i in range(3)]
    others += [lambda i=i: text({**und, "prompt": f"Other {i}", "seed": i}) for i in range(3)]
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(f) for f in others[:3]]
        mine = pool.submit(png, gen), pool.submit(text, und)
        futures += [pool.submit(f) for f in others[3:]]
        assert mine[0].result()[0] == alone
        assert mine[1].result() == alone_text
        assert all(f.result() for f in futures)


def test_metrics_move(server, image_b64):
    def scrape() -> str:
        return httpx.get(server.url + "/metrics").text

    httpx.post(server.url + "/v1/generate", json={"prompt": "x"}, timeout=60)
    text = scrape()
    assert 'janus_requests_total{endpoint="/v1/generate",status="200"}' in text
    assert "janus_queue_depth" in text
    assert "janus_images_generated_total" in text


@pytest.mark.parametrize("path", ["/v1/understand", "/v1/generate"])
def test_openapi_documents_routes(server, path):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert path in spec["paths"]
