"""Distributed mode end to end: `janus-server api` and two `janus-server worker` processes on a real Redis.

The tests share one cluster (module scope) and run in file order; each asks for the workers it needs
(`Cluster.ensure_workers`), so a test that kills or stops workers leaves the next one what it needs.
Timeouts are short so that faults show quickly: a dead worker's jobs are reclaimed after 3 s idle, a
job is dead-lettered after 3 failed deliveries, and every request has a 60 s deadline.

Expected outputs come from janus_core's single-request paths (`understand`, `generate_images`) on the
same checkpoint in this process: the batching engine must give the same tokens and pixels.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from janus_core.models.loader import LoadedModel
from server.jobs import GenerateParams, Job, UnderstandParams
from server.queue.redis.queue import RedisQueue
from tests.support import redis_fixture
from tests.support.images import b64, png_bytes
from tests.support.servers import (
    ServerProcess,
    WorkerProcess,
    free_port_pair,
    pid_alive,
    spawn_worker,
    start_server,
    wait_for_fresh_metrics,
    wait_for_heartbeat,
    wait_http_ok,
    wait_until_ready,
)

pytestmark = pytest.mark.timeout(120)

redis_server = redis_fixture.redis_server

IMAGE_PNG = png_bytes()
IMAGE = b64(IMAGE_PNG)
# With the seed-0 tiny model this prompt runs to max_new_tokens without meeting EOS (test_limits.py).
SLOW = {"prompt": "Describe every detail", "images": [IMAGE], "max_new_tokens": 880, "stream": True}
REQUEST_TIMEOUT = 60.0  # the cluster API's deadline for every job
MAX_DELIVERIES = 3
HEARTBEAT_TIMEOUT = 2.0  # a worker silent this long has its jobs taken over
SLACK = 5.0  # how late past its deadline an answer may come
ENV = {
    "JANUS_HOST": "127.0.0.1",
    "JANUS_CLAIM_IDLE_TIMEOUT": "3",
    "JANUS_MAX_DELIVERIES": str(MAX_DELIVERIES),
    "JANUS_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
    "JANUS_HEARTBEAT_INTERVAL": "0.2",
    "JANUS_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    "OMP_NUM_THREADS": "1",  # two workers share two cores
    "JANUS_MAX_QUEUE_DEPTH": "512",  # room for every request of the 300-request test
    "JANUS_QUEUE_MAX_CONNECTIONS": "8",  # far fewer than requests in flight: they must share
}
# A second frontend on the same queue: room for 2 jobs and a 2 s deadline.
SMALL_API_ENV = {**ENV, "JANUS_MAX_QUEUE_DEPTH": "2", "JANUS_REQUEST_TIMEOUT": "2"}

UNDERSTAND_PROMPTS = ("What is in the image?", "Describe", "Name the colours", "Is it day or night?")
GENERATE_PROMPTS = ("a red boat", "a cat", "a hill at dawn", "two trees")


# --- processes -------------------------------------------------------------------------------------


@dataclass
class Cluster:
    redis: redis_fixture.RedisServer
    api: ServerProcess
    small_api: ServerProcess
    model_dir: Path
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive()]

    def ensure_workers(self, count: int) -> list[WorkerProcess]:
        """Start workers until `count` are alive (in parallel); wait for their models and first heartbeats."""
        new = [spawn_worker(self.redis.url, self.model_dir, self.log_dir, ENV)
               for _ in range(count - len(self.live_workers()))]
        self.workers += new
        for worker in new:
            wait_http_ok(worker.url + "/ready", worker.proc, worker.log_path)
            wait_for_heartbeat(self.redis.url, worker.worker_id)
        return self.live_workers()

    def stop_workers(self) -> None:
        for worker in self.live_workers():
            worker.proc.send_signal(signal.SIGTERM)
        for worker in self.workers:
            worker.stop()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(signal.SIGKILL, timeout=5)
        self.api.stop()
        self.small_api.stop()


@pytest.fixture(scope="module")
def cluster(redis_server: redis_fixture.RedisServer, tiny_hf_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("distributed")
    api_args = ["api", "--queue", redis_server.url]
    api = start_server(api_args, log_dir, ENV, wait_ready=False)
    small_api = start_server(api_args, log_dir, SMALL_API_ENV, wait_ready=False)
    made = Cluster(redis_server, api, small_api, tiny_hf_dir, log_dir)
    try:
        made.ensure_workers(2)
        wait_until_ready(api, 60)
        wait_until_ready(small_api, 60)
        yield made
    finally:
        made.close()


@pytest.fixture
async def queue(cluster: Cluster) -> AsyncIterator[RedisQueue]:
    """The queue as a frontend sees it (same key prefix as the servers)."""
    made = RedisQueue(cluster.redis.url, reconnect_timeout=15.0)
    yield made
    await made.close()


# --- expected results ------------------------------------------------------------------------------


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """On a small shared machine, OpenMP threads spin against the servers' threads; one is faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Oracle:
    """Expected results from janus_core's single-request paths, computed once per distinct request."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self._texts: dict[tuple[str, int], dict[str, Any]] = {}
        self._pixels: dict[tuple[str, int, int], np.ndarray] = {}

    def understand(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        from janus_core.simple.understand import understand

        key = (prompt, max_new_tokens)
        if key not in self._texts:
            image = Image.open(io.BytesIO(IMAGE_PNG)).convert("RGB")
            with one_torch_thread():
                r = understand(self.lm, [image], prompt, max_new_tokens=max_new_tokens)
            self._texts[key] = {"text": r.text, "finish_reason": r.finish_reason,
                                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}}
        return self._texts[key]

    def generate(self, prompt: str, seed: int, n: int) -> np.ndarray:
        from janus_core.sampling.params import SamplingParams
        from janus_core.simple.generate import generate_images

        key = (prompt, seed, n)
        if key not in self._pixels:
            with one_torch_thread():
                result = generate_images(self.lm, prompt, n=n, params=SamplingParams(temperature=1.0, seed=seed))
            self._pixels[key] = result.images.astype(np.int16)
        return self._pixels[key]

    def check(self, call: Call, reply: dict[str, Any]) -> None:
        body = call.body
        if call.path == "/v1/understand":
            expected = self.understand(body["prompt"], body["max_new_tokens"])
            assert {k: reply[k] for k in expected} == expected, body
            return
        assert reply["seed"] == body["seed"]
        got = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(image["b64_png"]))), dtype=np.int16)
                        for image in reply["images"]])
        expected_pixels = self.generate(body["prompt"], body["seed"], body["n"])
        # Same image tokens; the VQ decoder runs over a different batch, which may move a pixel value by 1
        # (a different token would change a whole 16x16 patch).
        assert got.shape == expected_pixels.shape and np.abs(got - expected_pixels).max() <= 1, body


@pytest.fixture(scope="module")
def oracle(tiny_hf: LoadedModel) -> Oracle:
    return Oracle(tiny_hf)


# --- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    path: str
    body: dict[str, Any]


@dataclass
class Reply:
    call: Call
    status: int
    body: dict[str, Any]
    headers: httpx.Headers
    seconds: float


@dataclass
class SseLog:
    """Events of one streamed request, filled in as they arrive."""

    status: int = 0
    events: list[Any] = field(default_factory=list)

    @property
    def deltas(self) -> str:
        return "".join(e["delta"] for e in self.events if isinstance(e, dict) and "delta" in e)

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e, dict) and "finish_reason" in e]


def mixed_call(i: int) -> Call:
    """Even i: greedy understanding; odd i: seeded generation (n of 1 or 2). Eight distinct requests."""
    k = (i // 2) % 4
    if i % 2 == 0:
        return Call("/v1/understand", {"prompt": UNDERSTAND_PROMPTS[k], "images": [IMAGE],
                                       "max_new_tokens": 6 + 2 * k})
    return Call("/v1/generate", {"prompt": GENERATE_PROMPTS[k], "seed": 100 + k, "n": 1 + k % 2})


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT + 3 * SLACK,
                             limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))


async def post(http: httpx.AsyncClient, base_url: str, call: Call) -> Reply:
    started = time.monotonic()
    r = await http.post(base_url + call.path, json=call.body)
    try:
        body = r.json()
    except ValueError:
        body = {"raw": r.text}
    return Reply(call, r.status_code, body, r.headers, time.monotonic() - started)


async def post_stream(http: httpx.AsyncClient, url: str, body: dict[str, Any], log: SseLog) -> SseLog:
    async with http.stream("POST", url, json=body) as r:
        log.status = r.status_code
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                log.events.append(payload if payload == "[DONE]" else json.loads(payload))
    return log


def assert_one_result(log: SseLog, expected: dict[str, Any]) -> None:
    """Exactly one final event, the expected text, and deltas that add up to it (no replayed text)."""
    assert log.status == 200 and log.events[-1] == "[DONE]", log.events[-3:]
    assert not [e for e in log.events if isinstance(e, dict) and "error" in e], log.events[-3:]
    [final] = log.finals
    assert (final["text"], final["finish_reason"], final["usage"]) == (
        expected["text"], expected["finish_reason"], expected["usage"])
    assert log.deltas == final["text"]


# --- waiting and metrics ---------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


Samples = list[tuple[str, dict[str, str], float]]


async def scrape(http: httpx.AsyncClient, url: str) -> Samples:
    text = (await http.get(url + "/metrics")).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(value for n, lab, value in samples if n == name and labels.items() <= lab.items())


def batches_over_one(samples: Samples) -> float:
    """Engine steps that ran more than one request (the janus_batch_size histogram above le=1)."""
    return total(samples, "janus_batch_size_count") - total(samples, "janus_batch_size_bucket", le="1.0")


async def worker_totals(http: httpx.AsyncClient, workers: list[WorkerProcess], name: str) -> float:
    return sum([total(await scrape(http, w.url), name) for w in workers])


async def held_by(queue: RedisQueue) -> dict[str, list[str]]:
    """Consumer (worker id) -> the entry ids it holds (claimed, not yet acknowledged)."""
    pending = await queue.redis.xpending_range(queue.stream, queue.group, "-", "+", 1000)
    held: dict[str, list[str]] = {}
    for p in pending:
        held.setdefault(p["consumer"], []).append(p["message_id"])
    return held


# --- the tests -------------------------------------------------------------------------------------


async def test_300_concurrent_mixed_requests_are_all_answered_correctly_and_batched(cluster: Cluster,
                                                                                    oracle: Oracle) -> None:
    """Far more requests in flight than each process has Redis connections (8): followers share one reader
    and commands wait for a free connection, so none gets a 5xx while Redis is healthy."""
    workers = cluster.ensure_workers(2)
    calls = [mixed_call(i) for i in range(300)]
    monitor = redis.Redis.from_url(cluster.redis.url, decode_responses=True)
    peak = 0

    async def watch_connections() -> None:
        nonlocal peak
        while True:
            peak = max(peak, int((await asyncio.to_thread(monitor.info, "clients"))["connected_clients"]))
            await asyncio.sleep(0.05)

    async with http_client() as http:
        before = [await scrape(http, w.url) for w in workers]
        watcher = asyncio.create_task(watch_connections())
        try:
            replies = await asyncio.gather(*(post(http, cluster.api.url, c) for c in calls))
        finally:
            watcher.cancel()
            monitor.close()
        failed = [(r.call.path, r.status, r.body) for r in replies if r.status != 200]
        assert not failed, failed[:5]
        for reply in replies:
            oracle.check(reply.call, reply.body)

        def ran(after: list[Samples]) -> list[float]:
            return [total(a, "janus_queue_wait_seconds_count") - total(b, "janus_queue_wait_seconds_count")
                    for a, b in zip(after, before, strict=True)]

        async def all_counted() -> bool:  # workers fold engine statistics into metrics at each heartbeat
            return sum(ran([await scrape(http, w.url) for w in workers])) == len(calls)

        await eventually(all_counted, 10.0, "the workers' job counts to add up to the requests")
        after = [await scrape(http, w.url) for w in workers]
    assert min(ran(after)) > 0, ran(after)  # both workers took jobs
    assert sum(batches_over_one(a) - batches_over_one(b) for a, b in zip(after, before, strict=True)) > 0
    # the API's pool (64) + two workers + the small API: far below one connection per request in flight
    print("PEAK", peak)
    assert peak < 150, f"{peak} Redis connections for {len(calls)} requests in flight"


async def test_poison_jobs_are_dead_lettered_and_others_unaffected(cluster: Cluster, oracle: Oracle,
                                                                    queue: RedisQueue) -> None:
    workers = cluster.ensure_workers(2)
    async with http_client() as http:
        dead_before = await worker_totals(http, workers, "janus_dead_letters_total")
        dead_len = await queue.redis.xlen(queue.dead_stream)
        # Payloads the API would never produce: one breaks the worker's request preparation (a
        # non-numeric temperature), the other the engine's (a non-integer n). Both fail every time.
        poison = [Job("understand", UnderstandParams("q", [IMAGE_PNG], temperature="hot")),  # type: ignore[arg-type]
                  Job("generate", GenerateParams("a cat", n="two"))]  # type: ignore[arg-type]
        for job in poison:
            await queue.submit(job)

        async def follow(job_id: str) -> list[dict[str, Any]]:
            return [event async for event in queue.events(job_id)]

        calls = [mixed_call(i) for i in range(12)]
        replies, poisoned = await asyncio.gather(
            asyncio.gather(*(post(http, cluster.api.url, c) for c in calls)),
            asyncio.wait_for(asyncio.gather(*(follow(job.id) for job in poison)), 30))
        for events in poisoned:
            [event] = events
            assert (event["type"], event["code"]) == ("error", "internal") and "dead-letter" in event["message"]
        for reply in replies:
            assert reply.status == 200, reply.body
            oracle.check(reply.call, reply.body)
        letters = await queue.redis.xrange(queue.dead_stream, "-", "+")
        assert len(letters) == dead_len + 2
        by_id = {fields["id"]: fields for _, fields in letters}
        for job in poison:
            assert f"failed {MAX_DELIVERIES} times" in by_id[job.id]["reason"]
            assert json.loads(by_id[job.id]["job"])["id"] == job.id

        async def counted() -> bool:
            return await worker_totals(http, workers, "janus_dead_letters_total") == dead_before + 2

        await eventually(counted, 5, "janus_dead_letters_total to count both jobs")
    assert all(w.alive() for w in workers)


async def test_kill_9_mid_batch_hands_every_job_to_the_other_worker(cluster: Cluster, oracle: Oracle,
                                                                     queue: RedisQueue) -> None:
    workers = cluster.ensure_workers(2)
    expected = oracle.understand(SLOW["prompt"], SLOW["max_new_tokens"])
    by_id = {w.worker_id: w for w in workers}
    logs = [SseLog() for _ in range(4)]
    async with http_client() as http:
        redelivered_before = {w.worker_id: await worker_totals(http, [w], "janus_redeliveries_total") for w in workers}
        tasks = [asyncio.ensure_future(post_stream(http, cluster.api.url + "/v1/understand", SLOW, log))
                 for log in logs]

        async def all_running() -> bool:
            return all(log.deltas for log in logs)

        await eventually(all_running, 20, "every job to stream its first tokens")
        held = await held_by(queue)
        victim_id = max(held, key=lambda w: len(held[w]))
        victim = by_id[victim_id]
        victim.proc.kill()  # kill -9, in the middle of its batch
        victim.proc.wait()
        assert len(held[victim_id]) >= 2, held  # it was running a batch
        await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_TIMEOUT + SLACK)
        for log in logs:
            assert_one_result(log, expected)
        [survivor] = [w for w in workers if w is not victim]
        redelivered = await worker_totals(http, [survivor], "janus_redeliveries_total")
    assert redelivered - redelivered_before[survivor.worker_id] >= len(held[victim_id])
    assert await queue.depth() == 0


async def test_sigterm_drains_the_running_job_and_exits_0(cluster: Cluster, oracle: Oracle,
                                                          queue: RedisQueue) -> None:
    workers = cluster.ensure_workers(1)
    expected = oracle.understand(SLOW["prompt"], SLOW["max_new_tokens"])
    log = SseLog()
    async with http_client() as http:
        task = asyncio.ensure_future(post_stream(http, cluster.api.url + "/v1/understand", SLOW, log))

        async def running() -> bool:
            return bool(log.deltas)

        await eventually(running, 20, "the job to stream its first tokens")
        [(holder_id, _)] = (await held_by(queue)).items()
        [holder] = [w for w in workers if w.worker_id == holder_id]
        holder.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(task, REQUEST_TIMEOUT)
    assert_one_result(log, expected)
    code = await asyncio.to_thread(holder.proc.wait, 30)
    assert code == 0, holder.log()[-3000:]
    # Acknowledged by the draining worker itself: nothing left for anyone to reclaim.
    assert await held_by(queue) == {} and await queue.depth() == 0


async def test_full_queue_is_503_and_expired_jobs_never_run(cluster: Cluster, queue: RedisQueue) -> None:
    cluster.stop_workers()
    small = cluster.small_api.url
    short = Call("/v1/understand", {"prompt": "q", "images": [IMAGE], "max_new_tokens": 4})
    async with http_client() as http:
        waiting = [asyncio.ensure_future(post(http, small, short)) for _ in range(2)]

        async def queue_full() -> bool:
            return await queue.depth() == 2

        await eventually(queue_full, 5, "two queued jobs")
        refused = await post(http, small, short)
        assert refused.status == 503 and refused.body["error"]["code"] == "queue_full", refused.body
        assert int(refused.headers["retry-after"]) >= 1 and refused.seconds < SLACK
        for reply in await asyncio.gather(*waiting):
            assert reply.status == 504 and reply.seconds < 2 + SLACK, (reply.status, reply.body)
        job_ids = list(await queue.redis.hkeys(queue.key("entry")))
        assert len(job_ids) == 2  # still queued: nothing trims unacknowledged jobs

        workers = cluster.ensure_workers(2)

        async def drained() -> bool:
            return await queue.depth() == 0

        await eventually(drained, 10, "the workers to drop the expired jobs")
        for job_id in job_ids:
            result = json.loads(await queue.redis.get(queue.key("result", job_id)))
            assert result["type"] == "error" and result["code"] in ("deadline_exceeded", "cancelled"), result
            assert [f for _, f in await queue.redis.xrange(queue.key("events", job_id))] == [{"t": "1"}]
        for worker in workers:  # the workers' metrics current: statistics folded in after the jobs were dropped
            await asyncio.to_thread(wait_for_fresh_metrics, worker.url)
        for worker in workers:
            samples = await scrape(http, worker.url)
            for name in ("janus_queue_wait_seconds_count", "janus_batch_size_count", "janus_prompt_tokens_total"):
                assert total(samples, name) == 0, (worker.worker_id, name)


async def test_redis_restart_mid_load_loses_no_request(cluster: Cluster, oracle: Oracle,
                                                       queue: RedisQueue) -> None:
    cluster.ensure_workers(2)
    slow = Call("/v1/understand", {k: v for k, v in SLOW.items() if k != "stream"})
    calls = [slow] * 4 + [mixed_call(i) for i in range(36)]
    answered_before = len(await queue.redis.keys(queue.key("result", "*")))
    async with http_client() as http:
        replies = asyncio.ensure_future(asyncio.gather(*(post(http, cluster.api.url, c) for c in calls)))

        async def all_accepted() -> bool:  # queued, running or answered: none still being submitted
            answered = len(await queue.redis.keys(queue.key("result", "*"))) - answered_before
            return await queue.depth() + answered >= len(calls)

        await eventually(all_accepted, 30, "every request to be accepted")
        assert await queue.depth() >= 4  # the slow jobs (at least) are still running
        await asyncio.to_thread(cluster.redis.kill)  # kill -9: no save, and no persistence configured
        try:
            # While Redis is down a new request is refused at once, not after the reconnect timeout:
            # the first once the breaker opens (0.5 s of failures), the next ones immediately.
            refusals = [await post(http, cluster.api.url, mixed_call(0)) for _ in range(3)]
        finally:
            await asyncio.to_thread(cluster.redis.start)  # empty: every queued job and result is gone
        for refused in refusals:
            assert refused.status == 503 and "retry-after" in refused.headers, refused.body
        seconds = [r.seconds for r in refusals]
        assert seconds[0] < 2.0 and max(seconds[1:]) < 0.5, seconds
        done = await asyncio.wait_for(replies, REQUEST_TIMEOUT + 2 * SLACK)
        # Every accepted request is answered, correctly: the API submitted the lost jobs again.
        failed = [(r.call.path, r.status, r.body) for r in done if r.status != 200]
        assert not failed, failed[:5]
        for reply in done:
            oracle.check(reply.call, reply.body)
        assert max(r.seconds for r in done) < REQUEST_TIMEOUT
        # Jobs that a worker was running when Redis went are answered by that worker into the new Redis;
        # queued ones are submitted again by the API. Which of the two happens depends on how many jobs the
        # workers had claimed at the kill, so only the counter's presence is checked; every answer is, above.
        samples = await scrape(http, cluster.api.url)
        assert "janus_resubmissions_total" in {name for name, _, _ in samples}
        resubmitted = total(samples, "janus_resubmissions_total")

        await asyncio.to_thread(wait_until_ready, cluster.api, 30)  # workers heartbeat into the new Redis
        after = [mixed_call(i) for i in range(8)]
        fresh = await asyncio.gather(*(post(http, cluster.api.url, c) for c in after))
        for reply in fresh:
            assert reply.status == 200, reply.body
            oracle.check(reply.call, reply.body)
    print(f"Redis restart under load: {len(done)}/{len(done)} answered 200, {resubmitted:.0f} jobs "
          f"submitted again, slowest {max(r.seconds for r in done):.1f} s, 503s in "
          f"{max(r.seconds for r in refusals) * 1000:.0f} ms while down")


async def ready_body(http: httpx.AsyncClient, url: str) -> tuple[int, dict[str, Any]]:
    try:
        r = await http.get(url + "/ready", timeout=5.0)
    except httpx.HTTPError:
        return 0, {}
    return r.status_code, r.json()


async def test_serve_replaces_a_worker_killed_under_load_and_loses_nothing(
        redis_server: redis_fixture.RedisServer, tiny_hf_dir: Path, tmp_path: Path, oracle: Oracle) -> None:
    queue_url = redis_server.url.rsplit("/", 1)[0] + "/1"  # its own database: apart from the cluster
    base = free_port_pair()
    args = ["serve", "--queue", queue_url, "--model", str(tiny_hf_dir), "--workers", "2",
            "--metrics-port", str(base)]
    # The idle backstop is out of reach (60 s): only the heartbeat path can hand the jobs over fast.
    env = {**ENV, "JANUS_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT), "JANUS_CLAIM_IDLE_TIMEOUT": "60"}
    serve = await asyncio.to_thread(start_server, args, tmp_path, env, ready_timeout=90)
    expected = oracle.understand(SLOW["prompt"], SLOW["max_new_tokens"])
    pids: set[int] = set()
    queue = RedisQueue(queue_url)
    try:
        async with http_client() as http:
            async def full() -> bool:
                status, body = await ready_body(http, serve.url)
                return status == 200 and body["workers"] == {"live": 2, "expected": 2, "by_gpu": {"cpu": 2}}

            await eventually(full, 60, "both workers to count as live")
            assert (await ready_body(http, serve.url))[1]["status"] == "ready"
            first_ids = set((await queue.workers()).keys())
            pids = {int(worker_id.rsplit("-", 1)[1]) for worker_id in first_ids}
            assert len(pids) == 2

            logs = [SseLog() for _ in range(4)]
            streams = [asyncio.ensure_future(timed(post_stream(http, serve.url + "/v1/understand", SLOW, log)))
                       for log in logs]
            calls = [mixed_call(i) for i in range(12)]
            posts = [asyncio.ensure_future(post(http, serve.url, c)) for c in calls]

            async def all_running() -> bool:
                return all(log.deltas for log in logs)

            await eventually(all_running, 30, "every slow job to stream its first tokens")
            held = await held_by(queue)
            victim_id = max(held, key=lambda w: len(held[w]))
            os.kill(int(victim_id.rsplit("-", 1)[1]), signal.SIGKILL)
            killed = time.monotonic()

            async def degraded() -> bool:
                status, body = await ready_body(http, serve.url)
                return status == 200 and body["status"] == "degraded" and body["workers"]["live"] == 1 \
                    and body["workers"]["by_gpu"] == {"cpu": 1}

            await eventually(degraded, 10, "/ready to report one live worker of two")
            replies = await asyncio.wait_for(asyncio.gather(*posts), REQUEST_TIMEOUT + SLACK)
            slow_seconds = await asyncio.wait_for(asyncio.gather(*streams), REQUEST_TIMEOUT + SLACK)
            for reply in replies:
                assert reply.status == 200, reply.body
                oracle.check(reply.call, reply.body)
            for log in logs:
                assert_one_result(log, expected)
            finished = time.monotonic() - killed
            await eventually(full, 60, "the replacement worker to count as live")
            replaced = time.monotonic() - killed
            pids |= {int(worker_id.rsplit("-", 1)[1]) for worker_id in (await queue.workers())}

            async def left_group() -> bool:
                names = {c["name"] for c in await queue.redis.xinfo_consumers(queue.stream, queue.group)}
                return victim_id not in names

            await eventually(left_group, 10, "the dead worker's consumer to leave the group")
            samples = await scrape(http, serve.url)
            assert total(samples, "janus_worker_restarts_total") == 1
        # Far under the 60 s idle backstop: the jobs moved once the heartbeat was 2 s old.
        print(f"kill -9 under load: slowest stream {max(slow_seconds):.1f} s, all answered "
              f"{finished:.1f} s after the kill, replacement live after {replaced:.1f} s")
        assert finished < 30, finished
        assert "killed by SIGKILL" in serve.log()
        assert serve.stop() == 0, serve.log()[-3000:]
        assert not [pid for pid in pids if pid_alive(pid)]  # serve stopped (and reaped) its workers
    finally:
        await queue.close()
        serve.stop(signal.SIGKILL)
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


async def timed(awaitable: Awaitable[Any]) -> float:
    started = time.monotonic()
    await awaitable
    return time.monotonic() - started
