"""Idempotency keys end to end: two `janus-server api` frontends and one worker on a real Redis, with two
API keys (alice, bob), REST and gRPC.

A retry with the same key and body joins the running job or is answered from its stored result, on
either frontend, and never runs it again: the worker's `janus_images_generated_total` is the witness.
Counters reach the metrics at the worker's heartbeats, so "generated once" is checked by waiting until
the counter equals the expected total after a later request of known size: a second run would carry it
past that total for good. The model is the 384-pixel tiny checkpoint (576 steps per image), so a job
is still running when its first progress event is seen.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio

from server.rpc.gen.janus.v1 import janus_pb2, janus_pb2_grpc
from tests.support import redis_fixture
from tests.support.servers import (
    ServerProcess,
    WorkerProcess,
    metric,
    spawn_worker,
    start_server,
    wait_for_heartbeat,
    wait_http_ok,
)

pytestmark = pytest.mark.timeout(240)

redis_server = redis_fixture.redis_server

TOKENS = {"alice": "alice-secret", "bob": "bob-secret"}
ENV = {"JANUS_HOST": "127.0.0.1", "JANUS_API_KEY": ",".join(TOKENS.values()), "JANUS_HEARTBEAT_INTERVAL": "0.2",
       "JANUS_REQUEST_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}


@dataclass
class Setup:
    redis: redis_fixture.RedisServer
    apis: list[ServerProcess]
    worker: WorkerProcess
    log_dir: Path

    def images_generated(self) -> float:
        return metric(self.worker.url, "janus_images_generated_total")

    def start_api(self) -> ServerProcess:
        return start_server(["api", "--queue", self.redis.url], self.log_dir, ENV)


@pytest.fixture(scope="module")
def setup(redis_server: redis_fixture.RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from janus_core.tiny.janus import write_tiny_model

    log_dir = tmp_path_factory.mktemp("idempotency")
    model = write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-384", "hf", seed=0, image_size=384)
    worker = spawn_worker(redis_server.url, model, log_dir, ENV)
    apis: list[ServerProcess] = []
    try:
        wait_http_ok(worker.url + "/ready", worker.proc, worker.log_path)
        wait_for_heartbeat(redis_server.url, worker.worker_id)
        made = Setup(redis_server, apis, worker, log_dir)
        apis += [made.start_api(), made.start_api()]
        yield made
    finally:
        for api in apis:
            api.stop()
        worker.stop()


def headers(who: str, key: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}", **({"Idempotency-Key": key} if key else {})}


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=180.0)


async def counts_exactly(setup: Setup, expected: float, timeout: float = 60.0) -> None:
    """Waits until the worker's image counter equals `expected` (it only grows: past it means a re-run)."""
    give_up = asyncio.get_running_loop().time() + timeout
    while (seen := await asyncio.to_thread(setup.images_generated)) != expected:
        assert seen < expected, f"{seen - expected:.0f} image(s) more than requested were generated"
        assert asyncio.get_running_loop().time() < give_up, f"the image counter stayed at {seen}, not {expected}"
        await asyncio.sleep(0.1)


async def stream_events(http: httpx.AsyncClient, url: str, body: dict[str, Any],
                        hdrs: dict[str, str]) -> list[Any]:
    async with http.stream("POST", url, json=body, headers=hdrs) as r:
        assert r.status_code == 200, await r.aread()
        return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
                async for line in r.aiter_lines() if line.startswith("data: ")]


def job_of(reply: httpx.Response) -> dict[str, Any]:
    """A reply's body without the total of its timings (each request's own wall time)."""
    body = reply.json()
    body["timings"] = {k: v for k, v in body["timings"].items() if k != "total"}
    return body


def pngs(reply: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(image["b64_png"]) for image in reply["images"]]


async def test_concurrent_duplicates_run_once_and_a_finished_one_is_answered_from_its_result(setup: Setup) -> None:
    body = {"prompt": "a lighthouse", "n": 2, "seed": 11}
    before = await asyncio.to_thread(setup.images_generated)
    async with http_client() as http:
        replies = await asyncio.gather(*(http.post(api.url + "/v1/generate", json=body, headers=headers("alice", "k1"))
                                         for api in (*setup.apis, setup.apis[0])))
        assert [r.status_code for r in replies] == [200, 200, 200], [r.text[:200] for r in replies]
        first = job_of(replies[0])
        assert all(job_of(r) == first for r in replies)  # one job: the same id, seed, PNG bytes and phases
        await counts_exactly(setup, before + 2)
        again = await http.post(setup.apis[1].url + "/v1/generate", json=body, headers=headers("alice", "k1"))
        assert again.status_code == 200 and job_of(again) == first  # answered from the stored result
        # its total is the job's own (it ran before this request came), not the few ms this request took
        assert again.json()["timings"]["total"] >= sum(v for k, v in first["timings"].items()) - 0.5
        fresh = await http.post(setup.apis[1].url + "/v1/generate", json={**body, "n": 1}, headers=headers("alice"))
        assert fresh.status_code == 200 and fresh.json()["id"] != first["id"]  # no key: a new job
        await counts_exactly(setup, before + 3)


async def test_another_body_is_a_422_and_another_api_key_never_reaches_the_job(setup: Setup) -> None:
    body = {"prompt": "a kite", "n": 1, "seed": 3}
    url = setup.apis[0].url + "/v1/generate"
    async with http_client() as http:
        mine = await http.post(url, json=body, headers=headers("alice", "k2"))
        assert mine.status_code == 200
        conflict = await http.post(url, json={**body, "seed": 4}, headers=headers("alice", "k2"))
        assert conflict.status_code == 422, conflict.text
        assert "different request" in conflict.json()["error"]["message"]
        theirs = await http.post(url, json=body, headers=headers("bob", "k2"))
        assert theirs.status_code == 200 and theirs.json()["id"] != mine.json()["id"]
        bad = await http.post(url, json=body, headers=headers("alice", "x" * 300))
        assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]["message"]


async def test_grpc_metadata_key_joins_the_same_job(setup: Setup) -> None:
    request = janus_pb2.GenerateRequest(prompt="a boat", n=1, seed=5)
    metadata = (("authorization", f"Bearer {TOKENS['alice']}"), ("idempotency-key", "k3"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{setup.apis[1].grpc_port}") as channel:
        stub = janus_pb2_grpc.JanusStub(channel)
        replies = await asyncio.gather(*(stub.Generate(request, metadata=metadata, timeout=120) for _ in range(2)))
        assert replies[0].id == replies[1].id and replies[0].png == replies[1].png
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await stub.Generate(janus_pb2.GenerateRequest(prompt="a ship", n=1, seed=5), metadata=metadata, timeout=30)
        assert conflict.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "different request" in (conflict.value.details() or "")


async def test_a_client_whose_frontend_is_killed_re_attaches_through_another(setup: Setup) -> None:
    doomed = await asyncio.to_thread(setup.start_api)
    body = {"prompt": "a red fox in the snow", "n": 2, "seed": 21, "stream": True}
    before = await asyncio.to_thread(setup.images_generated)
    async with http_client() as http:
        async with http.stream("POST", doomed.url + "/v1/generate", json=body, headers=headers("alice", "k4")) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"step"' in line:  # the job is running on the worker
                    doomed.stop(signal.SIGKILL)
                    break
        events = await stream_events(http, setup.apis[0].url + "/v1/generate", body, headers("alice", "k4"))
        assert events[-1] == "[DONE]" and not [e for e in events if isinstance(e, dict) and "error" in e]
        [result] = [e for e in events if isinstance(e, dict) and "images" in e]
        steps = [e["step"] for e in events if isinstance(e, dict) and "step" in e]
        assert steps == sorted(steps) and steps[-1] == 576  # one coherent stream, replayed from the start
        await counts_exactly(setup, before + 2)  # generated once
        # The same seed alone (no key: a run of its own) gives the same PNG bytes.
        alone = await http.post(setup.apis[1].url + "/v1/generate", json={**body, "stream": False},
                                headers=headers("alice"))
        assert pngs(alone.json()) == pngs(result) and alone.json()["id"] != result["id"]
        await counts_exactly(setup, before + 4)


async def test_a_dropped_connection_does_not_cancel_a_keyed_job(setup: Setup) -> None:
    body = {"prompt": "a quiet harbour", "n": 1, "seed": 8, "stream": True}
    before = await asyncio.to_thread(setup.images_generated)
    async with http_client() as http:
        async with http.stream("POST", setup.apis[0].url + "/v1/generate", json=body,
                               headers=headers("alice", "k5")) as r:
            job_id = r.headers["x-job-id"]
            async for line in r.aiter_lines():
                if '"step"' in line:
                    break  # the client goes away mid-run; with a key, the job runs on for its retry
        events = await stream_events(http, setup.apis[1].url + "/v1/generate", body, headers("alice", "k5"))
        results = [e for e in events if isinstance(e, dict) and "images" in e]
        assert len(results) == 1 and results[0]["id"] == job_id, events[-3:]  # the first run, not cancelled
        await counts_exactly(setup, before + 1)


async def test_without_a_key_a_dropped_connection_cancels_the_job(setup: Setup) -> None:
    body = {"prompt": "a stormy sea", "n": 1, "seed": 9, "stream": True}
    url = setup.apis[0].url + "/v1/generate"
    async with http_client() as http, http.stream("POST", url, json=body, headers=headers("alice")) as r:
        job_id = r.headers["x-job-id"]
        async for line in r.aiter_lines():
            if '"step"' in line:
                break  # the client hangs up mid-run
    client = redis.asyncio.Redis.from_url(setup.redis.url, decode_responses=True)
    try:
        give_up = asyncio.get_running_loop().time() + 60
        while (stored := await client.get(f"janus:result:{job_id}")) is None:
            assert asyncio.get_running_loop().time() < give_up, "the job never ended"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    assert json.loads(stored)["code"] == "cancelled"


async def test_a_joined_call_that_times_out_leaves_the_job_to_the_others(setup: Setup) -> None:
    """gRPC: a second call with the key joins the running job and gives up at its own short deadline; the job
    (another call's) runs on to its result."""
    request = janus_pb2.GenerateRequest(prompt="a long river", n=4, seed=31)
    metadata = (("authorization", f"Bearer {TOKENS['alice']}"), ("idempotency-key", "k6"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{setup.apis[0].grpc_port}") as channel:
        stub = janus_pb2_grpc.JanusStub(channel)
        first = stub.GenerateStream(request, metadata=metadata, timeout=120)
        events = first.__aiter__()
        assert (await events.__anext__()).WhichOneof("event") == "progress"  # the job runs
        with pytest.raises(grpc.aio.AioRpcError) as late:
            async for _ in stub.GenerateStream(request, metadata=metadata, timeout=1.5):
                pass
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        results = [e.result async for e in events if e.WhichOneof("event") == "result"]
        assert len(results) == 1 and len(results[0].png) == 4
