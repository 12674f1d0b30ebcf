"""Timings on every inference answer: `Server-Timing` and `timings` (ms) from a real `janus-server serve`.

The phases (queue, prefill, decode, encode) partition a job's time from its acceptance to its encoded result, so
they add up to what the client waited, less the HTTP around it: within 10% for requests long enough that the
HTTP is small beside them (generation: tests/integration/test_previews.py, on a 384 px model).
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.support.servers import metric

PHASES = ["queue", "prefill", "decode", "encode", "total"]
LONG_TEXT = {"max_new_tokens": 480, "ignore_eos": True}  # ~0.8 s of decoding on the tiny model


def _header(response: httpx.Response) -> dict[str, float]:
    """`Server-Timing: queue;dur=1.5, ...` -> {"queue": 1.5, ...}, in the order sent."""
    out = {}
    for part in response.headers["server-timing"].split(","):
        match = re.fullmatch(r"\s*([a-z]+);dur=([0-9.]+)\s*", part)
        assert match, response.headers["server-timing"]
        out[match[1]] = float(match[2])
    return out


def _timed(method: str, url: str, **kwargs) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = httpx.request(method, url, timeout=120, **kwargs)
    return response, (time.perf_counter() - started) * 1000.0


def _check(timings: dict[str, float], wall_ms: float | None = None) -> None:
    assert list(timings) == PHASES, timings
    assert all(v >= 0 for v in timings.values())
    phases = sum(timings[p] for p in PHASES[:-1])
    assert phases <= timings["total"] + 0.5  # rounding of each to 0.1 ms
    if wall_ms is not None:
        assert timings["total"] <= wall_ms
        assert abs(wall_ms - phases) <= 0.10 * wall_ms, (timings, wall_ms)


def _sse(response: httpx.Response) -> list:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_understand_answers_carry_timings_that_add_up(server, image_b64):
    body = {"prompt": "Describe", "images": [image_b64], **LONG_TEXT}
    r, wall = _timed("POST", server.url + "/v1/understand", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["timings"] == _header(r)
    _check(r.json()["timings"], wall)
    assert r.json()["timings"]["decode"] > r.json()["timings"]["encode"]  # 480 tokens; nothing to encode


def test_generate_answers_carry_timings(server):
    """(That they add up to the client's wall time is checked on a 384 px model, whose images take seconds:
    tests/integration/test_previews.py. This one's 16 steps take less than the HTTP around them.)"""
    body = {"prompt": "a red square", "n": 8, "seed": 3}
    r, wall = _timed("POST", server.url + "/v1/generate", json=body)
    assert r.status_code == 200, r.text
    timings = r.json()["timings"]
    assert timings == _header(r)
    _check(timings)
    assert timings["total"] <= wall and timings["encode"] > 0  # VQ decoding and PNG encoding of 8 images
    png, wall = _timed("POST", server.url + "/v1/generate", json={"prompt": "a red square", "seed": 3},
                       headers={"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png"
    _check(_header(png))


def test_openai_answers_carry_timings(server):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "ignore_eos": True}
    r, wall = _timed("POST", server.url + "/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert r.json()["timings"] == _header(r)
    _check(r.json()["timings"], wall)
    completions = {"prompt": ["one", "two"], "max_tokens": 480, "ignore_eos": True}
    r, wall = _timed("POST", server.url + "/v1/completions", json=completions)
    assert r.status_code == 200, r.text
    _check(_header(r), wall)
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a cat", "seed": 1}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["timings"] == _header(r)
    _check(r.json()["timings"])


@pytest.mark.parametrize("route, body, final", [
    ("/v1/understand", {"prompt": "Describe", "max_new_tokens": 8, "stream": True}, "finish_reason"),
    ("/v1/generate", {"prompt": "a cat", "seed": 1, "stream": True}, "images"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True},
     "choices"),
])
def test_a_stream_ends_with_its_timings(server, image_b64, route, body, final):
    if route == "/v1/understand":
        body = {**body, "images": [image_b64]}
    with httpx.stream("POST", server.url + route, json=body, timeout=120) as r:
        assert r.status_code == 200
        events = _sse(r)
    last = [e for e in events if final in e and (final != "choices" or e["choices"][0]["finish_reason"])][-1]
    _check(last["timings"])


def test_a_job_object_carries_its_timings(server):
    r = httpx.post(server.url + "/v1/generate", json={"prompt": "a cat", "seed": 2},
                   headers={"Prefer": "respond-async", "Authorization": "Bearer timings"}, timeout=60)
    assert r.status_code == 202, r.text
    assert r.json()["timings"] is None
    with httpx.stream("GET", server.url + r.headers["location"] + "/events", timeout=120,
                      headers={"Authorization": "Bearer timings"}) as events:
        final = _sse(events)[-1]
    assert final["status"] == "succeeded"
    _check(final["timings"])
    assert final["result"]["timings"] == final["timings"]


def test_the_phases_are_in_metrics(server, image_b64):
    def understand() -> None:
        r = httpx.post(server.url + "/v1/understand", timeout=60,
                       json={"prompt": "x", "images": [image_b64], "max_new_tokens": 2})
        assert r.status_code == 200

    understand()
    before = {p: metric(server.url, "janus_request_phase_seconds_count", kind="understand", phase=p) for p in PHASES}
    understand()
    after = {p: metric(server.url, "janus_request_phase_seconds_count", kind="understand", phase=p) for p in PHASES}
    assert all(after[p] == before[p] + 1 for p in PHASES), (before, after)
