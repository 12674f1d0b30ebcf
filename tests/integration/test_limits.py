"""Auth, body limits, full queue, deadlines and client disconnects against a real server."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from tests.support.images import b64, png_bytes
from tests.support.servers import metric, start_server, tokens_after_stop

IMAGE = b64(png_bytes())
# With the seed-0 tiny model this prompt runs to max_new_tokens without meeting EOS (about two
# seconds with the batched engine on a quiet machine, many more on a loaded one).
SLOW = {"prompt": "Describe every detail", "images": [IMAGE], "max_new_tokens": 880}


@pytest.fixture(scope="module")
def strict_server(tiny_hf_dir, tmp_path_factory):
    env = {"JANUS_API_KEY": "k1,k2", "JANUS_MAX_BODY_BYTES": "200000", "JANUS_MAX_QUEUE_DEPTH": "1",
           "JANUS_REQUEST_TIMEOUT": "60"}
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("logs"), env)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def hasty_server(tiny_hf_dir, tmp_path_factory):
    """Every request's deadline is 0.5 s: SLOW cannot make it, whatever the machine's load."""
    env = {"JANUS_REQUEST_TIMEOUT": "0.5"}
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("logs"), env)
    yield proc
    proc.stop()


def _post(server, path, body, key="k1", timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)


def test_api_key_required_on_inference_routes(strict_server):
    for path, body in [("/v1/generate", {"prompt": "a"}), ("/v1/understand", {"prompt": "q", "images": [IMAGE]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/images/generations", {"prompt": "a"})]:
        missing = _post(strict_server, path, body, key=None)
        assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
        wrong = _post(strict_server, path, body, key="nope")
        assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]["message"]
    assert httpx.get(strict_server.url + "/v1/models").status_code == 401
    assert _post(strict_server, "/v1/generate", {"prompt": "a"}, key="k2").status_code == 200
    assert httpx.get(strict_server.url + "/health").status_code == 200  # probes need no key


def test_body_too_large(strict_server):
    r = _post(strict_server, "/v1/understand", {"prompt": "q", "images": ["A" * 300_000]})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_deadline_gives_504(hasty_server):
    tokens_before = metric(hasty_server.url, "janus_generated_tokens_total")
    started = time.time()
    r = _post(hasty_server, "/v1/understand", SLOW, key=None)
    assert r.status_code == 504, r.text
    assert "deadline" in r.json()["error"]["message"]
    assert time.time() - started < 5
    # The job was stopped at its deadline, not left to run to max_new_tokens.
    assert tokens_after_stop(hasty_server.url, tokens_before) < SLOW["max_new_tokens"] / 2


def test_full_queue_gives_503_with_retry_after(strict_server):
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_post, strict_server, "/v1/understand", SLOW) for _ in range(4)]
        statuses = [f.result() for f in futures]
    full = [r for r in statuses if r.status_code == 503]
    assert full, [r.status_code for r in statuses]
    assert int(full[0].headers["retry-after"]) >= 1
    assert "full" in full[0].json()["error"]["message"]
    assert [r.status_code for r in statuses].count(200) >= 1  # the one admitted job ran
    assert _post(strict_server, "/v1/generate", {"prompt": "a"}).status_code == 200  # the queue drained


@pytest.fixture(scope="module")
def roomy_server(tiny_hf_dir, tmp_path_factory):
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


def test_client_disconnect_cancels_the_job(roomy_server):
    body = dict(SLOW, stream=True)
    tokens_before = metric(roomy_server.url, "janus_generated_tokens_total")
    with httpx.stream("POST", roomy_server.url + "/v1/understand", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token arrived: the job is running; now hang up
    # Had the hang-up not cancelled it, the job would have written all 880 tokens.
    assert tokens_after_stop(roomy_server.url, tokens_before) < SLOW["max_new_tokens"] / 2
    fast = httpx.post(roomy_server.url + "/v1/understand",
                      json={"prompt": "q", "images": [IMAGE], "max_new_tokens": 2}, timeout=10)
    assert fast.status_code == 200


# Plain completions of several prompts: each a job that runs to its max_tokens (ignore_eos) unless cancelled.
LONG = {"max_tokens": 880, "ignore_eos": True, "temperature": 0}


def test_hanging_up_on_several_prompts_cancels_every_job(roomy_server):
    tokens_before = metric(roomy_server.url, "janus_generated_tokens_total")
    body = {"prompt": ["one", "two", "three"], "stream": True, **LONG}
    with httpx.stream("POST", roomy_server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    assert tokens_after_stop(roomy_server.url, tokens_before) < 3 * LONG["max_tokens"] / 2


def test_a_refused_prompt_stops_the_others_at_once(roomy_server):
    """Not streamed: the first error answers, and the prompts still running are cancelled, not waited for."""
    tokens_before = metric(roomy_server.url, "janus_generated_tokens_total")
    r = httpx.post(roomy_server.url + "/v1/completions", json={"prompt": [[5, 6, 7], [0, 10**6]], **LONG}, timeout=60)
    assert r.status_code == 400 and "outside the vocabulary" in r.text
    assert tokens_after_stop(roomy_server.url, tokens_before) < LONG["max_tokens"] / 2
