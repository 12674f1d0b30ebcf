"""Webhook deliveries end to end: a `WebhookDeliverer` taking deliveries from a small store that keeps the
queue's delivery contract, POSTing to a real uvicorn receiver on loopback (plain HTTP to a listed IP literal,
and HTTPS to a name with an openssl-made certificate), with the retry schedule shrunk to 0.05 s."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from server.metrics import Metrics
from server.queue.base import Delivery
from server.settings import Settings
from server.webhooks import WebhookDeliverer, deliver, verify_signature

SECRET = "whsec-integration"
WAIT = 10.0  # seconds any one awaited event may take before the test fails


class DeliveryStore:
    """The delivery half of the JobQueue contract on a dict (what a queue backend keeps, in miniature): a
    delivery is due at its time unless leased; taking it leases it; done forgets it; retry makes it due again
    later as the next try. `fail_takes` makes that many `take_deliveries` calls raise first."""

    def __init__(self, fail_takes: int = 0) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        self.done: dict[str, asyncio.Event] = {}
        self.retries: list[tuple[str, float]] = []
        self.looked = asyncio.Event()
        self.fail_takes = fail_takes

    def add(self, job_id: str, url: str) -> None:
        self.entries[job_id] = {"url": url, "attempt": 1, "due": 0.0, "leased_until": 0.0}
        self.done[job_id] = asyncio.Event()

    async def take_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        self.looked.set()
        if self.fail_takes:
            self.fail_takes -= 1
            raise ConnectionError("the queue is down")
        now = time.monotonic()
        taken = []
        for job_id, e in self.entries.items():
            if len(taken) < limit and e["due"] <= now and e["leased_until"] <= now:
                e["leased_until"] = now + lease
                taken.append(Delivery(job_id, e["url"], e["attempt"]))
        return taken

    async def delivery_done(self, job_id: str) -> None:
        del self.entries[job_id]
        self.done[job_id].set()

    async def delivery_retry(self, job_id: str, delay: float) -> None:
        e = self.entries[job_id]
        e.update(attempt=e["attempt"] + 1, due=time.monotonic() + delay, leased_until=0.0)
        self.retries.append((job_id, delay))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real uvicorn server on loopback that answers each request with the next of `answers` (a status, or
    "hang": never answer until released), then 200; it records every request."""

    answers: list[int | str] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Received(scope["path"], headers, body))
        self.arrived.set()
        answer = self.answers.pop(0) if self.answers else 200
        if answer == "hang":
            await self.release.wait()
            answer = 200
        extra = [(b"location", b"/elsewhere")] if 300 <= answer < 400 else []
        await send({"type": "http.response.start", "status": answer, "headers": extra})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serving(Receiver()) as r:
        yield r


class serving:  # noqa: N801 - used as `async with serving(receiver, ...)`
    """Runs `receiver` in uvicorn on 127.0.0.1 (with TLS when given a certificate and key) in this event loop."""

    def __init__(self, receiver: Receiver, cert: Path | None = None, key: Path | None = None) -> None:
        self.receiver, self.cert, self.key = receiver, cert, key

    async def __aenter__(self) -> Receiver:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.receiver.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.receiver.app, interface="asgi3", log_config=None, lifespan="off",
                                timeout_graceful_shutdown=1, ssl_certfile=self.cert, ssl_keyfile=self.key)
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        async with asyncio.timeout(WAIT):
            while not self.server.started:
                await asyncio.sleep(0.01)
        return self.receiver

    async def __aexit__(self, *exc: object) -> None:
        self.receiver.release.set()
        self.server.should_exit = True
        await asyncio.wait_for(self.task, WAIT)
        self.sock.close()


def webhook_settings(hosts: list[str] | None = None, delays: int = 4, timeout: float = 2.0) -> Settings:
    return Settings(allowed_webhook_hosts=hosts or ["127.0.0.1"], webhook_secret=SECRET,
                    webhook_retry_delays=["0.05"] * delays, webhook_timeout=timeout)


def job(job_id: str) -> dict[str, Any]:
    return {"id": job_id, "object": "job", "status": "succeeded", "result": {"text": "a cat"}}


class Run:
    """A running deliverer with its store and metrics; `finished(job_id)` waits until the delivery is settled."""

    def __init__(self, settings: Settings, store: DeliveryStore, render: Callable[[str], Awaitable[Any]],
                 poll_interval: float = 0.05) -> None:
        self.store, self.metrics = store, Metrics()
        self.deliverer = WebhookDeliverer(store, render, settings, self.metrics)  # type: ignore[arg-type]
        self.deliverer.poll_interval = poll_interval
        self.task = asyncio.create_task(self.deliverer.run())

    async def finished(self, job_id: str) -> None:
        await asyncio.wait_for(self.store.done[job_id].wait(), WAIT)

    def count(self, outcome: str) -> float:
        return self.metrics.registry.get_sample_value("janus_webhook_deliveries_total", {"outcome": outcome}) or 0


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Run]]:
    runs: list[Run] = []

    def _start(settings: Settings, store: DeliveryStore, render=None, **kwargs: Any) -> Run:
        async def jobs(job_id: str) -> dict[str, Any]:
            return job(job_id)

        runs.append(Run(settings, store, render or jobs, **kwargs))
        return runs[-1]

    yield _start
    for run in runs:
        await asyncio.wait_for(run.deliverer.close(), WAIT)
        assert run.task.done() and run.task.exception() is None


def url(receiver: Receiver, host: str = "127.0.0.1", scheme: str = "http") -> str:
    return f"{scheme}://{host}:{receiver.port}/hook"


# --- the cases -----------------------------------------------------------------------------------------------


async def test_a_delivery_is_signed_and_carries_the_job_object(receiver, start):
    store = DeliveryStore()
    store.add("job-1", url(receiver))
    run = start(webhook_settings(), store)
    await run.finished("job-1")
    [got] = receiver.requests
    assert got.path == "/hook" and json.loads(got.body) == job("job-1")
    assert verify_signature(SECRET, got.headers["janus-signature"], got.body)
    assert not verify_signature(SECRET + "x", got.headers["janus-signature"], got.body)
    assert got.headers["janus-delivery-id"] == "whd_job-1"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"] == "janus-server-webhooks"
    assert got.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert run.count("delivered") == 1 and store.retries == []


async def test_server_errors_are_retried_until_one_delivery_succeeds(receiver, start):
    receiver.answers = [500, 500, 200]
    store = DeliveryStore()
    store.add("job-2", url(receiver))
    run = start(webhook_settings(), store)
    await run.finished("job-2")
    assert len(receiver.requests) == 3
    assert {r.headers["janus-delivery-id"] for r in receiver.requests} == {"whd_job-2"}
    assert all(verify_signature(SECRET, r.headers["janus-signature"], r.body) for r in receiver.requests)
    assert store.retries == [("job-2", 0.05), ("job-2", 0.05)]
    assert (run.count("retry"), run.count("delivered")) == (2, 1)


async def test_429_is_retried_but_other_4xx_are_not(receiver, start):
    receiver.answers = [429, 404]
    store = DeliveryStore()
    store.add("job-3", url(receiver))
    run = start(webhook_settings(), store)
    await run.finished("job-3")
    assert len(receiver.requests) == 2 and store.retries == [("job-3", 0.05)]
    assert (run.count("retry"), run.count("rejected"), run.count("delivered")) == (1, 1, 0)


async def test_a_redirect_is_not_followed(receiver, start):
    receiver.answers = [307]
    store = DeliveryStore()
    store.add("job-4", url(receiver))
    run = start(webhook_settings(), store)
    await run.finished("job-4")
    assert [r.path for r in receiver.requests] == ["/hook"]
    assert run.count("rejected") == 1 and store.retries == []


async def test_no_answer_within_the_timeout_is_retried(receiver, start):
    receiver.answers = ["hang"]
    store = DeliveryStore()
    store.add("job-5", url(receiver))
    run = start(webhook_settings(timeout=0.5), store)
    await run.finished("job-5")
    assert len(receiver.requests) == 2 and store.retries == [("job-5", 0.05)]
    assert (run.count("retry"), run.count("delivered")) == (1, 1)


async def test_it_gives_up_after_the_last_try(receiver, start):
    receiver.answers = [503] * 10
    store = DeliveryStore()
    store.add("job-6", url(receiver))
    run = start(webhook_settings(delays=2), store)  # 3 tries
    await run.finished("job-6")
    assert len(receiver.requests) == 3
    assert (run.count("retry"), run.count("failed"), run.count("delivered")) == (2, 1, 0)


async def test_a_gone_job_is_dropped_without_a_request(receiver, start):
    async def gone(job_id: str) -> None:
        return None

    store = DeliveryStore()
    store.add("job-7", url(receiver))
    run = start(webhook_settings(), store, render=gone)
    await run.finished("job-7")
    assert receiver.requests == [] and run.count("dropped") == 1


async def test_an_address_refused_at_delivery_time_is_rejected_unsent(receiver, start):
    # `localhost` is listed (it passed at submit time, say) but now resolves to an unlisted internal address
    store = DeliveryStore()
    store.add("job-8", url(receiver, "localhost", "https"))
    run = start(webhook_settings(["localhost"]), store)
    await run.finished("job-8")
    assert receiver.requests == [] and run.count("rejected") == 1 and store.retries == []


async def test_queue_errors_do_not_stop_the_loop(receiver, start):
    store = DeliveryStore(fail_takes=2)
    store.add("job-9", url(receiver))
    run = start(webhook_settings(), store)
    await run.finished("job-9")
    assert store.fail_takes == 0 and len(receiver.requests) == 1 and not run.task.done()


async def test_wake_looks_at_the_queue_at_once(receiver, start):
    store = DeliveryStore()
    run = start(webhook_settings(), store, poll_interval=60)
    await asyncio.wait_for(store.looked.wait(), WAIT)  # the first look found nothing: a minute's wait begins
    store.add("job-10", url(receiver))
    run.deliverer.wake()
    await run.finished("job-10")
    assert len(receiver.requests) == 1


async def test_close_lets_the_try_in_flight_end_and_settle(receiver, start):
    receiver.answers = ["hang"]
    store = DeliveryStore()
    store.add("job-11", url(receiver))
    run = start(webhook_settings(timeout=0.5), store)
    await asyncio.wait_for(receiver.arrived.wait(), WAIT)
    await asyncio.wait_for(run.deliverer.close(), WAIT)
    assert run.task.done() and run.task.exception() is None
    assert store.retries == [("job-11", 0.05)] and run.count("retry") == 1  # settled before close returned


# --- HTTPS to a name, connected to the checked address -------------------------------------------------------


def certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize(("cert_name", "result"), [("localhost", "delivered"), ("other.example", "retry")])
async def test_https_names_the_host_in_tls_and_checks_its_certificate(tmp_path, cert_name, result):
    if socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)[0][4][0] != "127.0.0.1":
        pytest.skip("the receiver listens on 127.0.0.1, and `localhost` resolves to another address first here")
    cert, key = certificate(tmp_path, cert_name)
    settings = webhook_settings(["localhost", "127.0.0.1", "::1"])
    async with serving(Receiver(), cert, key) as r, \
            httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert)), trust_env=False) as client:
        outcome = await deliver(client, url(r, "localhost", "https"), b"{}", "whd_x", SECRET, settings)
    assert outcome.result == result, outcome
    if result == "delivered":
        assert [q.headers["host"] for q in r.requests] == [f"localhost:{r.port}"]
    else:
        assert "CERTIFICATE_VERIFY_FAILED" in outcome.reason and r.requests == []
