"""/metrics of a running server moves as it should after real requests."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from tests.support.images import b64, png_bytes
from tests.support.metrics import scrape, value
from tests.support.servers import start_server, wait_for_fresh_metrics

IMAGE = b64(png_bytes())


@pytest.fixture(scope="module")
def metrics_server(tiny_hf_dir, tmp_path_factory):
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


def _settle(url: str) -> dict:
    wait_for_fresh_metrics(url)  # the worker folds engine statistics into metrics at each heartbeat
    return scrape(url)


def test_counters_and_histograms_move(metrics_server):
    url = metrics_server.url
    before = scrape(url)
    gen = httpx.post(url + "/v1/generate", json={"prompt": "a cat", "n": 3, "seed": 1}, timeout=60)
    und = httpx.post(url + "/v1/understand", json={"prompt": "q", "images": [IMAGE], "max_new_tokens": 5},
                     timeout=60).json()
    bad = httpx.post(url + "/v1/generate", json={"prompt": "a", "n": 0})
    assert gen.status_code == 200 and bad.status_code == 422
    after = _settle(url)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("janus_requests_total", endpoint="/v1/generate", status="200") == 1
    assert moved("janus_requests_total", endpoint="/v1/generate", status="422") == 1
    assert moved("janus_requests_total", endpoint="/v1/understand", status="200") == 1
    assert moved("janus_request_duration_seconds_count", endpoint="/v1/generate") == 2
    assert moved("janus_request_duration_seconds_bucket", endpoint="/v1/generate", le="+Inf") == 2
    assert moved("janus_images_generated_total") == 3
    assert moved("janus_prompt_tokens_total") >= und["usage"]["prompt_tokens"]
    assert moved("janus_generated_tokens_total") >= und["usage"]["completion_tokens"]
    assert moved("janus_queue_wait_seconds_count", kind="generate") == 1
    assert moved("janus_queue_wait_seconds_count", kind="understand") == 1
    assert moved("janus_time_to_first_token_seconds_count") == 1
    assert moved("janus_batch_size_count", kind="generate") >= 1
    # 16 image tokens: the first comes from the prefill, the other 15 from decode steps.
    assert moved("janus_decode_step_seconds_count", kind="generate") >= 15
    assert moved("janus_decode_step_seconds_count", kind="understand") >= 1
    heartbeats = [v for (n, _), v in after.items() if n == "janus_worker_heartbeat_timestamp_seconds"]
    assert heartbeats and time.time() - max(heartbeats) < 5


def test_queue_depth_and_running_under_load(metrics_server):
    url = metrics_server.url
    slow = {"prompt": "Describe every detail", "images": [IMAGE], "max_new_tokens": 880}
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(httpx.post, url + "/v1/understand", json=slow, timeout=120) for _ in range(3)]
        peak_depth, peak_running = 0.0, 0.0
        deadline = time.time() + 30
        while time.time() < deadline and not all(f.done() for f in futures):
            samples = scrape(url)
            peak_depth = max(peak_depth, value(samples, "janus_queue_depth"))
            peak_running = max(peak_running, value(samples, "janus_running_requests", kind="understand"))
            time.sleep(0.1)
        assert all(f.result().status_code == 200 for f in futures)
    assert peak_depth >= 2
    assert peak_running >= 1
    idle = _settle(url)
    assert value(idle, "janus_queue_depth") == 0
    assert value(idle, "janus_running_requests", kind="understand") == 0


def test_every_documented_metric_is_exported(metrics_server):
    from pathlib import Path

    listed = [line.split()[0] for line in (Path(__file__).resolve().parents[2] / "deploy/metrics.txt")
              .read_text().splitlines() if line.strip() and not line.startswith("#")]
    text = httpx.get(metrics_server.url + "/metrics").text
    missing = [name for name in listed if f"# TYPE {name} " not in text
               and f"# TYPE {name.removesuffix('_total')} " not in text]
    assert not missing
