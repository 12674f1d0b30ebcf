"""Async jobs against real servers, on both queues: `Prefer: respond-async`, the /v1/jobs resource (status,
queue position, progress, events re-attached with Last-Event-ID, images, cancel, listing, TTL, other keys),
and signed webhooks received by a real HTTP receiver.

Each queue runs one `janus-server serve` of the tiny model with one running sequence at a time
(`--max-batch-size 1`), so a long answer (900 tokens, `ignore_eos`) holds the worker while other jobs queue.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.webhooks import verify_signature
from tests.support import redis_fixture
from tests.support.receiver import WebhookReceiver
from tests.support.servers import ServerProcess, free_port, start_server

redis_server = redis_fixture.redis_server

KEYS = ("key-one", "key-two")
SECRET = "test-webhook-secret"
ASYNC = {"Prefer": "respond-async"}
HOOKS = {"JANUS_ALLOWED_WEBHOOK_HOSTS": "127.0.0.1", "JANUS_WEBHOOK_SECRET": SECRET,
         "JANUS_WEBHOOK_RETRY_DELAYS": "0.2,0.2,0.2,0.2"}
BLOCKER = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 900, "ignore_eos": True}


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as r:
        yield r


@pytest.fixture(scope="module", params=["memory", "redis"])
def jobs_server(request, tiny_hf_dir: Path, tmp_path_factory, receiver: WebhookReceiver) -> Iterator[ServerProcess]:
    args = ["serve", "--model", str(tiny_hf_dir), "--max-batch-size", "1"]
    queue_url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    if queue_url is not None:
        args += ["--queue", queue_url, "--workers", "1"]
    env = {"JANUS_API_KEY": ",".join(KEYS), "JANUS_METRICS_PORT": str(free_port()), **HOOKS}
    proc = start_server(args, tmp_path_factory.mktemp(f"jobs-{request.param}"), env)
    proc.queue_url = queue_url  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def client(server: ServerProcess, key: str = KEYS[0]) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60.0)


def submit(c: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post(path, json=body, headers=ASYNC)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["object"] == "job" and job["result"] is None
    return job


def wait_status(c: httpx.Client, job_id: str, *statuses: str, timeout: float = 60.0) -> dict[str, Any]:
    give_up = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < give_up, f"job {job_id} stayed {job['status']}, waiting for {statuses}"
        time.sleep(0.05)


def wait_logged(server: ServerProcess, text: str, timeout: float = 30.0) -> None:
    give_up = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < give_up, f"{text!r} never appeared in the server's log"
        time.sleep(0.05)


def read_events(c: httpx.Client, job_id: str, last: int | None = None, stop_after: int | None = None
                ) -> list[tuple[int, str, dict[str, Any]]]:
    """The job's SSE events as (id, name, data); `stop_after` hangs up after that many."""
    headers = {"Last-Event-ID": str(last)} if last is not None else {}
    out: list[tuple[int, str, dict[str, Any]]] = []
    with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200, r.read()
        fields: dict[str, str] = {}
        for line in r.iter_lines():
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if fields:
                out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                fields = {}
                if stop_after is not None and len(out) >= stop_after:
                    break
    return out


def test_lifecycle_position_progress_events_and_cancel(jobs_server: ServerProcess) -> None:
    with client(jobs_server) as c:
        blocker = submit(c, "/v1/chat/completions", BLOCKER)
        assert blocker["kind"] == "chat.completions"
        wait_status(c, blocker["id"], "running")
        first = submit(c, "/v1/generate", {"prompt": "a red square", "seed": 7})
        second = submit(c, "/v1/images/generations", {"prompt": "a blue circle", "seed": 8})
        assert (first["status"], first["queue_position"]) == ("queued", 0)
        assert (second["status"], second["queue_position"]) == ("queued", 1)
        listed = c.get("/v1/jobs", params={"status": "queued"}).json()["data"]
        assert [j["id"] for j in listed] == [second["id"], first["id"]]  # newest first

        cancelled = c.delete(f"/v1/jobs/{blocker['id']}")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["error"]["code"] == "cancelled"
        wait_logged(jobs_server, f"stopped job {blocker['id']} after")  # the engine let its rows go

        # events from the start, the client hangs up after three, then re-attaches where it left off
        head = read_events(c, first["id"], stop_after=3)
        assert [(n, name) for n, name, _ in head] == [(1, "progress"), (2, "progress"), (3, "progress")]
        rest = read_events(c, first["id"], last=3)
        assert [n for n, _, _ in rest] == list(range(4, 4 + len(rest)))
        steps = [d["step"] for _, name, d in head + rest if name == "progress"]
        assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == head[0][2]["total"]
        n, name, final = rest[-1]
        assert name == "job" and final["status"] == "succeeded"

        job = c.get(f"/v1/jobs/{first['id']}").json()
        assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]
        assert job["progress"] == {"step": steps[-1], "total": steps[-1]}
        assert job["result"] == final["result"]
        # the result is the synchronous route's body: the same seed gives the same PNG
        sync = c.post("/v1/generate", json={"prompt": "a red square", "seed": 7}).json()
        assert job["result"]["images"] == sync["images"] and job["result"]["seed"] == 7
        png = c.get(f"/v1/jobs/{first['id']}/images/0")
        assert png.headers["content-type"] == "image/png"
        assert png.content == base64.b64decode(sync["images"][0]["b64_png"])
        assert c.get(f"/v1/jobs/{first['id']}/images/1").status_code == 404

        other = wait_status(c, second["id"], "succeeded")
        assert set(other["result"]) == {"created", "data", "output_format", "size", "timings"}
        assert c.get(f"/v1/jobs/{blocker['id']}").json()["status"] == "cancelled"
        # a cancel after the end changes nothing
        assert c.delete(f"/v1/jobs/{first['id']}").json()["status"] == "succeeded"


def test_jobs_belong_to_their_key(jobs_server: ServerProcess) -> None:
    with client(jobs_server) as mine, client(jobs_server, KEYS[1]) as theirs:
        job = submit(mine, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}],
                                                    "max_tokens": 4})
        for path in ("", "/events", "/images/0"):
            r = theirs.get(f"/v1/jobs/{job['id']}{path}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
        assert theirs.delete(f"/v1/jobs/{job['id']}").status_code == 404
        assert job["id"] not in [j["id"] for j in theirs.get("/v1/jobs").json()["data"]]
        done = wait_status(mine, job["id"], "succeeded")
        assert done["result"]["object"] == "chat.completion"
        assert mine.get("/v1/jobs/0123").status_code == 404


def test_bad_requests_are_refused_before_any_job(jobs_server: ServerProcess) -> None:
    with client(jobs_server) as c:
        before = len(c.get("/v1/jobs", params={"limit": 100}).json()["data"])
        cases = [
            ({"prompt": ""}, ASYNC, 422),
            ({"prompt": "x", "stream": True}, ASYNC, 400),
            ({"prompt": "x", "webhook": "https://127.0.0.1/hook"}, {}, 400),  # a webhook needs respond-async
            ({"prompt": "x", "webhook": "https://evil.example/hook"}, ASYNC, 400),  # not an allowed host
        ]
        for body, headers, status in cases:
            r = c.post("/v1/generate", json=body, headers=headers)
            assert r.status_code == status, (body, r.text)
        assert len(c.get("/v1/jobs", params={"limit": 100}).json()["data"]) == before
        assert c.get("/v1/jobs", params={"status": "lost"}).status_code == 422
        assert c.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_webhook_is_signed_and_retried_until_one_success(jobs_server: ServerProcess,
                                                         receiver: WebhookReceiver) -> None:
    receiver.fail_next(2)  # two 500s, then 200
    with client(jobs_server) as c:
        job = submit(c, "/v1/generate", {"prompt": "a green tree", "seed": 3,
                                         "webhook": f"{receiver.url}/hooks/{jobs_server.port}"})
        assert job["webhook"] == f"{receiver.url}/hooks/{jobs_server.port}"
        delivered = receiver.wait_delivered(job["id"])
        tries = receiver.tries(job["id"])
        assert [t.status for t in tries] == [500, 500, 200]
        assert len({t.headers["janus-delivery-id"] for t in tries}) == 1
        for t in tries:
            assert verify_signature(SECRET, t.headers["janus-signature"], t.body)
        body = json.loads(delivered.body)
        assert body["id"] == job["id"] and body["status"] == "succeeded"
        assert body["result"] == c.get(f"/v1/jobs/{job['id']}").json()["result"]
        metrics = c.get("/metrics").text
        assert 'janus_webhook_deliveries_total{outcome="delivered"}' in metrics
        assert len(receiver.tries(job["id"])) == 3  # nothing after the success


def test_a_webhook_is_delivered_after_the_frontend_that_accepted_the_job_died(
        jobs_server: ServerProcess, tmp_path: Path, receiver: WebhookReceiver) -> None:
    """Redis mode: the delivery is queued in Redis when the job ends, and another frontend makes it."""
    if jobs_server.queue_url is None:  # type: ignore[attr-defined]
        pytest.skip("frontends share deliveries through Redis only")
    accepting = start_server(["api", "--queue", jobs_server.queue_url], tmp_path,  # type: ignore[attr-defined]
                             {"JANUS_API_KEY": ",".join(KEYS), **HOOKS})
    try:
        with client(jobs_server) as c, client(accepting) as first:
            blocker = submit(c, "/v1/chat/completions", BLOCKER)
            wait_status(c, blocker["id"], "running")
            job = submit(first, "/v1/generate", {"prompt": "a boat", "seed": 5, "webhook": f"{receiver.url}/late"})
            accepting.stop(signal.SIGKILL)
            assert c.delete(f"/v1/jobs/{blocker['id']}").json()["status"] == "cancelled"
            delivered = receiver.wait_delivered(job["id"])
            assert json.loads(delivered.body)["status"] == "succeeded"
            assert verify_signature(SECRET, delivered.headers["janus-signature"], delivered.body)
    finally:
        accepting.stop()


def test_results_expire_after_the_job_ttl_and_early_drops_say_410(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """The in-process queue keeps one result here: the older job's is dropped before its TTL (410, with the
    reason), then the newer one's TTL passes (404)."""
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path,
                        {"JANUS_JOB_TTL": "3", "JANUS_MAX_STORED_RESULTS": "1"})
    try:
        # no API keys here: a token of the client's own names it
        with httpx.Client(base_url=proc.url, timeout=60.0, headers={"Authorization": "Bearer mine"}) as c, \
                httpx.Client(base_url=proc.url, timeout=60.0) as anonymous:
            first = submit(c, "/v1/generate", {"prompt": "a cat", "seed": 1})
            wait_status(c, first["id"], "succeeded")
            second = submit(c, "/v1/generate", {"prompt": "a dog", "seed": 2})
            wait_status(c, second["id"], "succeeded")
            r = c.get(f"/v1/jobs/{first['id']}")
            assert r.status_code == 410, r.text
            assert "dropped early" in r.json()["error"]["message"]
            assert [j["id"] for j in c.get("/v1/jobs").json()["data"]] == [second["id"], first["id"]]
            assert anonymous.get("/v1/jobs").status_code == 401  # whose? listing needs a token
            assert anonymous.get(f"/v1/jobs/{second['id']}").status_code == 404  # not the token's owner
            give_up = time.monotonic() + 30.0
            while c.get(f"/v1/jobs/{second['id']}").status_code == 200:
                assert time.monotonic() < give_up, "the job outlived its TTL"
                time.sleep(0.1)
            assert c.get(f"/v1/jobs/{second['id']}").status_code == 404
            assert c.get("/v1/jobs").json()["data"] == []
    finally:
        proc.stop()
