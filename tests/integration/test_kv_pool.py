"""A server whose KV pool holds about four images' worth of blocks, sent three times that many mixed
requests at once: every request completes with 200 and the output it gets alone, the usage gauge
stays within [0, 1], and a request larger than the whole pool is refused up front with the numbers."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.images import b64, png_bytes
from tests.support.metrics import scrape, total, value
from tests.support.servers import start_server

POOL_TOKENS = 256  # 16 blocks: an image of the tiny model (16 codes, CFG) takes 4, an image question ~6
IMAGES = [b64(png_bytes(color=c)) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]


@pytest.fixture(scope="module")
def small_pool_server(tiny_hf_dir, tmp_path_factory):
    per_token = 2 * 2 * 4 * 16 * 4  # K and V x layers x KV heads x head dim x fp32 bytes of the tiny model
    proc = start_server(["serve", "--model", str(tiny_hf_dir), "--kv-cache-memory", str(POOL_TOKENS * per_token)],
                        tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


def requests_mix() -> list[tuple[str, dict]]:
    mix = []
    for i in range(6):
        mix.append(("/v1/generate", {"prompt": f"a red fox number {i}", "n": 1 + i % 2, "seed": 40 + i}))
        mix.append(("/v1/understand", {"prompt": f"What is in image {i}?", "images": [IMAGES[i % 3]],
                                       "max_new_tokens": 8 + 4 * i}))
    return mix


def pixels(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))).convert("RGB")).astype(int)


def same_answer(path: str, got: dict, alone: dict) -> None:
    if path == "/v1/understand":
        assert got["text"] == alone["text"] and got["usage"] == alone["usage"]
        return
    assert got["seed"] == alone["seed"] and len(got["images"]) == len(alone["images"])
    for a, b in zip(got["images"], alone["images"], strict=True):
        # Same codes; a VQ decode of another batch size may move a pixel by one level.
        assert np.abs(pixels(a["b64_png"]) - pixels(b["b64_png"])).max() <= 1


def test_three_times_the_pool_at_once_all_complete(small_pool_server):
    url = small_pool_server.url
    assert value(scrape(url), "janus_kv_cache_capacity_tokens") == POOL_TOKENS
    usage: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            samples = scrape(url)
            usage.append(value(samples, "janus_kv_cache_usage_ratio"))
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    mix = requests_mix()
    try:
        with cf.ThreadPoolExecutor(len(mix)) as pool:
            replies = list(pool.map(lambda r: httpx.post(url + r[0], json=r[1], timeout=300), mix))
    finally:
        done.set()
        watcher.join()
    assert [r.status_code for r in replies] == [200] * len(mix), [r.text for r in replies if r.status_code != 200]
    assert usage and max(usage) <= 1.0 and min(usage) >= 0.0
    deadline = time.monotonic() + 30  # the worker folds engine statistics into metrics on its heartbeat
    while value(samples := scrape(url), "janus_kv_cache_blocks", state="used") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert value(samples, "janus_kv_cache_blocks", state="used") == 0
    assert total(samples, "janus_kv_cache_blocks") == POOL_TOKENS // 16
    for (path, body), reply in zip(mix, replies, strict=True):
        alone = httpx.post(url + path, json=body, timeout=300)
        assert alone.status_code == 200
        same_answer(path, reply.json(), alone.json())


@pytest.mark.parametrize(("path", "body", "words"), [
    ("/v1/generate", {"prompt": "a red fox", "n": 5}, "5 image(s) of"),
    ("/v1/understand", {"prompt": "hello", "images": [IMAGES[0]], "max_new_tokens": 400},
     "plus max_new_tokens 400 need"),
])
def test_a_request_larger_than_the_pool_is_refused_with_the_numbers(small_pool_server, path, body, words):
    reply = httpx.post(small_pool_server.url + path, json=body, timeout=60)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert words in error["message"] and f"KV pool holds {POOL_TOKENS}" in error["message"]
