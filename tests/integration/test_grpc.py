"""The gRPC frontend on a real grpc.aio server (loopback), real channels and a real MemoryQueue.

The worker here is a stand-in that claims jobs from the queue and answers them the way the engine
worker does (delta/progress events, then a result or error, stopping at the next step when the job
is cancelled or expired) without loading a model, so these tests exercise the frontend alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from server import jobs
from server.jobs import GenerateParams, Job, UnderstandParams
from server.keys import current_key
from server.metrics import Metrics
from server.queue.memory import MemoryQueue
from server.rpc.client import Images, JanusClient, Progress
from server.rpc.gate import status_for
from server.rpc.gen.janus.v1 import janus_pb2, janus_pb2_grpc
from server.rpc.health import MAX_HEALTH_WATCHES
from server.rpc.service import create_grpc_server, stop_grpc_server
from server.service import Service
from server.settings import Settings

Code = grpc.StatusCode
WORDS = ["A ", "small ", "red ", "square."]
STEPS = 4  # progress events per generation (576 in the real model)


def png(side: int = 16, noise: bool = False) -> bytes:
    pixels = os.urandom(side * side * 3) if noise else bytes(side * side * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = png()


# --- a worker without a model --------------------------------------------------------------------


@dataclass
class FakeWorker:
    """Prompts steer it: "slow" takes ~10 s in small steps, "brief" ~0.5 s, "fail:CODE" ends with
    that error code, "noise" returns incompressible 384x384 PNGs (big messages)."""

    queue: MemoryQueue
    jobs: dict[str, Job] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)  # job id -> "cancelled" | "expired"
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self) -> None:
        while True:
            await self.queue.heartbeat("fake-worker")
            for job in await self.queue.claim("fake-worker", 8, timeout=0.05):
                task = asyncio.create_task(self._run(job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Job) -> None:
        self.jobs[job.id] = replace(job)  # as received: the queue drops a finished job's images
        prompt = job.params.prompt
        if prompt.startswith("fail:"):
            await self.queue.finish(job.id, jobs.error_event(prompt[5:], f"worker refused: {prompt}"))
            return
        steps, delay = (500, 0.02) if "slow" in prompt else (25, 0.02) if "brief" in prompt else (STEPS, 0.0)
        for step in range(1, steps + 1):
            if await self._stop(job):
                return
            if job.kind == "understand" and job.stream and step <= len(WORDS):
                await self.queue.publish(job.id, jobs.delta_event(WORDS[step - 1]))
            if job.kind == "generate" and job.stream:
                await self.queue.publish(job.id, jobs.progress_event(step, steps))
            await asyncio.sleep(delay)
        await self.queue.finish(job.id, self._result(job))

    async def _stop(self, job: Job) -> bool:
        reason = "cancelled" if await self.queue.is_cancelled(job.id) else "expired" if job.expired() else None
        if reason is not None:
            self.stopped[job.id] = reason
            code = jobs.CANCELLED if reason == "cancelled" else jobs.DEADLINE_EXCEEDED
            await self.queue.finish(job.id, jobs.error_event(code, f"job {reason}"))
        return reason is not None

    @staticmethod
    def _result(job: Job) -> dict[str, Any]:
        if isinstance(job.params, UnderstandParams):
            return jobs.understand_result("".join(WORDS), "stop", prompt_tokens=600, completion_tokens=len(WORDS))
        noise = "noise" in job.params.prompt
        seed = job.params.seed if job.params.seed is not None else 1234
        return jobs.generate_result(seed, [png(384 if noise else 16, noise) for _ in range(job.params.n)])

    async def wait_stopped(self, job_id: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while job_id not in self.stopped:
            assert time.monotonic() < deadline, f"job {job_id} did not stop"
            await asyncio.sleep(0.02)
        return self.stopped[job_id]

    async def wait_job(self, timeout: float = 5.0) -> Job:
        deadline = time.monotonic() + timeout
        while not self.jobs:
            assert time.monotonic() < deadline, "no job reached the worker"
            await asyncio.sleep(0.01)
        return next(iter(self.jobs.values()))


# --- the server under test -----------------------------------------------------------------------


@dataclass
class Stack:
    settings: Settings
    service: Service
    queue: MemoryQueue
    worker: FakeWorker
    server: grpc.aio.Server
    target: str
    channel: grpc.aio.Channel

    @property
    def stub(self) -> janus_pb2_grpc.JanusStub:
        return janus_pb2_grpc.JanusStub(self.channel)

    def start_worker(self) -> asyncio.Task[None]:
        return asyncio.create_task(self.worker.run())


@asynccontextmanager
async def running(*, worker: bool = True, max_depth: int = 64, service_class: type[Service] = Service,
                  metrics: Metrics | None = None, handlers: tuple[grpc.GenericRpcHandler, ...] = (),
                  **overrides: Any) -> AsyncIterator[Stack]:
    """The gRPC server on a free loopback port over a MemoryQueue; `handlers` are added next to Janus's."""
    settings = Settings(**overrides)
    queue = MemoryQueue(max_depth=max_depth)
    service = service_class(settings, queue)
    server = create_grpc_server(service, settings, metrics=metrics, readiness_ttl=0.05)
    server.add_generic_rpc_handlers(handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    stack = Stack(settings, service, queue, FakeWorker(queue), server, target, channel)
    tasks = [stack.start_worker()] if worker else []
    try:
        yield stack
    finally:
        await channel.close()
        await stop_grpc_server(server, grace=0.5)
        for task in [*tasks, *stack.worker._tasks]:
            task.cancel()


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with running() as s:
        yield s


def understand_request(**fields: Any) -> janus_pb2.UnderstandRequest:
    return janus_pb2.UnderstandRequest(**({"prompt": "What is this?", "images": [IMAGE]} | fields))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def status_of(awaitable: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


async def drain(call: Any) -> list[Any]:
    """Every message left in a streaming call (read() so a test may read() the first ones itself)."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Waits for server-side state the client sees no event for (e.g. a cancelled call's cleanup)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.01)


# --- the four rpcs -------------------------------------------------------------------------------


async def test_understand_returns_text_and_usage_with_rest_defaults(stack: Stack) -> None:
    response = await stack.stub.Understand(understand_request())
    assert (response.text, response.finish_reason) == ("".join(WORDS), "stop")
    assert (response.prompt_tokens, response.completion_tokens) == (600, len(WORDS))
    job = stack.worker.jobs[response.id]
    assert job.params == UnderstandParams(prompt="What is this?", images=[IMAGE])  # 0s became REST defaults
    assert not job.stream
    assert abs(job.deadline - (time.time() + stack.settings.request_timeout)) < 5  # no client deadline


async def test_understand_passes_parameters_exactly(stack: Stack) -> None:
    request = understand_request(max_new_tokens=7, temperature=0.7, top_p=0.9, seed=0, images=[IMAGE, png(32)])
    response = await stack.stub.Understand(request)
    params = stack.worker.jobs[response.id].params
    # float32 on the wire, but the job sees the decimal the client wrote, exactly as over REST
    assert params == UnderstandParams(prompt="What is this?", images=[IMAGE, png(32)], max_new_tokens=7,
                                      temperature=0.7, top_p=0.9, seed=0)


async def test_understand_stream_sends_deltas_then_finish_reason_and_usage(stack: Stack) -> None:
    chunks = await drain(stack.stub.UnderstandStream(understand_request()))
    assert [c.delta for c in chunks[:-1]] == WORDS
    last = chunks[-1]
    assert (last.delta, last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("", "stop", 600, 4)
    assert all(not c.finish_reason for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and stack.worker.jobs[chunks[0].id].stream


async def test_generate_returns_pngs_and_seed(stack: Stack) -> None:
    response = await stack.stub.Generate(janus_pb2.GenerateRequest(prompt="a fox", n=3, seed=42))
    assert response.seed == 42 and len(response.png) == 3
    assert all(Image.open(io.BytesIO(p)).format == "PNG" for p in response.png)
    assert stack.worker.jobs[response.id].params == GenerateParams(prompt="a fox", n=3, seed=42)


async def test_generate_temperature_unset_is_default_and_zero_is_greedy(stack: Stack) -> None:
    unset = await stack.stub.Generate(janus_pb2.GenerateRequest(prompt="a fox"))
    greedy = await stack.stub.Generate(janus_pb2.GenerateRequest(prompt="a fox", temperature=0, cfg_weight=1.5))
    assert stack.worker.jobs[unset.id].params.temperature is None  # not given: the model's default (1.0)
    assert stack.worker.jobs[greedy.id].params == GenerateParams(prompt="a fox", temperature=0.0, cfg_weight=1.5)


async def test_generate_steps_reach_the_job(stack: Stack) -> None:
    response = await stack.stub.Generate(janus_pb2.GenerateRequest(prompt="a fox", steps=12))
    assert stack.worker.jobs[response.id].params == GenerateParams(prompt="a fox", steps=12)


async def test_generate_stream_sends_progress_then_one_result(stack: Stack) -> None:
    events = await drain(stack.stub.GenerateStream(janus_pb2.GenerateRequest(prompt="a fox", n=2, seed=5)))
    progress = [(e.progress.step, e.progress.total) for e in events[:-1]]
    assert progress == [(k, STEPS) for k in range(1, STEPS + 1)]
    assert all(e.WhichOneof("event") == "progress" for e in events[:-1])
    assert events[-1].WhichOneof("event") == "result"
    assert events[-1].result.seed == 5 and len(events[-1].result.png) == 2


async def test_sixteen_large_pngs_fit_in_one_message(stack: Stack) -> None:
    response = await stack.stub.Generate(janus_pb2.GenerateRequest(prompt="noise", n=16))
    assert len(response.png) == 16
    assert response.ByteSize() > 4 << 20  # over gRPC's default 4 MiB limit


# --- health and reflection -----------------------------------------------------------------------


async def test_health_is_serving_only_with_a_live_worker() -> None:
    async with running(worker=False) as stack:
        health = health_pb2_grpc.HealthStub(stack.channel)
        for name in ("", "janus.v1.Janus"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="janus.v1.Janus"))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stack.start_worker()
        assert (await asyncio.wait_for(watch.read(), 5)).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


class CountingService(Service):
    """Counts readiness checks: what health probing costs the queue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checks = 0

    async def readiness(self) -> tuple[bool, str]:
        self.checks += 1
        return await super().readiness()


def health_pollers() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if not task.done()
            and getattr(task.get_coro(), "__qualname__", "") == "HealthServicer._refresh_forever"]


async def first_status(watch: Any) -> Any:
    """The first status a Watch sends, or the code it was refused with."""
    try:
        return (await watch.read()).status
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def test_health_watches_share_one_poller_and_are_capped() -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    async with running(worker=False, service_class=CountingService) as stack:
        assert isinstance(stack.service, CountingService)
        health = health_pb2_grpc.HealthStub(stack.channel)
        request = health_pb2.HealthCheckRequest(service="janus.v1.Janus")
        watches = [health.Watch(request) for _ in range(MAX_HEALTH_WATCHES + 44)]
        firsts = await asyncio.gather(*(first_status(w) for w in watches))
        opened = [w for w, first in zip(watches, firsts, strict=True) if first == not_serving]
        assert len(opened) == MAX_HEALTH_WATCHES and firsts.count(Code.RESOURCE_EXHAUSTED) == 44
        assert len(health_pollers()) == 1  # one for all the streams, not one each

        # The streams still open all hear of the change, from the one poller checking about once per interval.
        checks, since = stack.service.checks, time.monotonic()
        stack.start_worker()
        updates = await asyncio.wait_for(asyncio.gather(*(w.read() for w in opened)), 10)
        assert {u.status for u in updates} == {serving}
        assert stack.service.checks - checks <= (time.monotonic() - since) / 0.05 + 2

        for watch in watches:
            watch.cancel()
        await eventually(lambda: not health_pollers(), "the poller stops with the last Watch")
        again = health.Watch(request)  # and the closed streams' places are free again
        assert await first_status(again) == serving
        again.cancel()


async def test_calls_beyond_the_servers_limit_are_resource_exhausted() -> None:
    async with running(grpc_max_concurrent_rpcs=2) as stack:
        health = health_pb2_grpc.HealthStub(stack.channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
        for watch in watches:
            await watch.read()  # both calls are open
        error = await status_of(stack.stub.Understand(understand_request()))
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert not stack.worker.jobs
        for watch in watches:
            watch.cancel()


async def test_reflection_lists_and_describes_the_services(stack: Stack) -> None:
    reflect = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="janus.v1.Janus")]
    listed, described = await drain(reflect.ServerReflectionInfo(iter(requests)))
    names = {s.name for s in listed.list_services_response.service}
    assert {"janus.v1.Janus", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # enough for `grpcurl describe`


# --- auth ------------------------------------------------------------------------------------------


async def test_api_key_is_required_on_janus_rpcs_only() -> None:
    async with running(api_key=["k1", "k2"]) as stack:
        for metadata in [(), (("authorization", "Bearer nope"),), (("authorization", "k1"),)]:
            error = await status_of(stack.stub.Understand(understand_request(), metadata=metadata))
            assert error.code() == Code.UNAUTHENTICATED and "API key" in error.details()
            error = await status_of(drain(stack.stub.GenerateStream(
                janus_pb2.GenerateRequest(prompt="a fox"), metadata=metadata)))
            assert error.code() == Code.UNAUTHENTICATED
        assert not stack.worker.jobs  # refused before anything was queued
        ok = await stack.stub.Understand(understand_request(), metadata=(("authorization", "Bearer k2"),))
        assert ok.text
        health = health_pb2_grpc.HealthStub(stack.channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING


async def reflected_services(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = await drain(reflect.ServerReflectionInfo(iter([request]), metadata=metadata))
    return {s.name for s in reply.list_services_response.service}


async def test_reflection_needs_the_key_unless_opened() -> None:
    async with running(api_key=["k1"]) as stack:
        for metadata in [(), bearer("nope")]:
            error = await status_of(reflected_services(stack.channel, metadata))
            assert error.code() == Code.UNAUTHENTICATED
        assert "janus.v1.Janus" in await reflected_services(stack.channel, bearer("k1"))
        reply = await health_pb2_grpc.HealthStub(stack.channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    async with running(api_key=["k1"], open_reflection=True) as stack:
        assert "janus.v1.Janus" in await reflected_services(stack.channel)
        error = await status_of(stack.stub.Understand(understand_request()))  # opens reflection only
        assert error.code() == Code.UNAUTHENTICATED


class Echo:
    """An rpc of each client-streaming shape on raw bytes, answering with the caller's key name: what a
    service added later would look like to the guard."""

    def __init__(self) -> None:
        self.calls = 0

    async def collect(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        return b"".join([r async for r in requests]) + self._for()

    async def echo(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.calls += 1
        async for request in requests:
            yield request + self._for()

    @staticmethod
    def _for() -> bytes:
        key = current_key.get()
        return f" for {key.name if key else None}".encode()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler("test.Echo", {
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
            "Echo": grpc.stream_stream_rpc_method_handler(self.echo),
        })


class NoShape(grpc.RpcMethodHandler):
    """A handler of none of the four shapes: nothing the guard knows how to wrap."""

    request_streaming = response_streaming = False
    request_deserializer = response_serializer = None
    unary_unary = unary_stream = stream_unary = stream_stream = None


async def test_every_rpc_shape_needs_the_key_and_unknown_shapes_are_refused() -> None:
    echo = Echo()
    odd = grpc.method_handlers_generic_handler("test.Odd", {"Call": NoShape()})
    async with running(api_key=["k1"], handlers=(echo.handler(), odd)) as stack:
        collect = stack.channel.stream_unary("/test.Echo/Collect")
        bidi = stack.channel.stream_stream("/test.Echo/Echo")
        # Refused calls send no messages: a message the client writes after the server's refusal can fail in
        # gRPC core ("Failed execute_batch": INTERNAL) before the refusal's status reaches the client.
        for metadata in [(), bearer("nope")]:
            error = await status_of(collect(iter([]), metadata=metadata))
            assert error.code() == Code.UNAUTHENTICATED
            error = await status_of(drain(bidi(iter([]), metadata=metadata)))
            assert error.code() == Code.UNAUTHENTICATED
        assert echo.calls == 0
        # with the key they run, and see whose call it is
        assert await collect(iter([b"a", b"b"]), metadata=bearer("k1")) == b"ab for default"
        assert await drain(bidi(iter([b"a", b"b"]), metadata=bearer("k1"))) == [b"a for default", b"b for default"]
        error = await status_of(stack.channel.unary_unary("/test.Odd/Call")(b"x", metadata=bearer("k1")))
        assert error.code() == Code.UNIMPLEMENTED


# --- keys from a keys file: quotas ---------------------------------------------------------------


def keys_file(directory: Path, **limits: dict[str, int]) -> str:
    """A keys file with one key per name, `<name>-secret`, stored as its sha256 only, with those limits."""
    lines = ["keys:"]
    for name, fields in limits.items():
        lines.append(f"  - name: {name}")
        lines.append(f"    sha256: {hashlib.sha256(f'{name}-secret'.encode()).hexdigest()}")
        lines += [f"    {field}: {value}" for field, value in fields.items()]
    path = directory / "keys.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


async def test_a_key_over_its_in_flight_limit_is_resource_exhausted(tmp_path: Path, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="janus.access")
    metrics = Metrics()
    path = keys_file(tmp_path, **{"team-a": {"max_in_flight": 1}, "team-b": {}})
    team_a, team_b = bearer("team-a-secret"), bearer("team-b-secret")
    async with running(api_keys_file=path, metrics=metrics) as stack:
        busy = stack.stub.GenerateStream(janus_pb2.GenerateRequest(prompt="slow"), metadata=team_a)
        assert (await busy.read()).progress.step == 1  # team-a's one slot is taken
        for call in (stack.stub.Generate(janus_pb2.GenerateRequest(prompt="a fox"), metadata=team_a),
                     drain(stack.stub.UnderstandStream(understand_request(), metadata=team_a))):
            error = await status_of(call)
            assert error.code() == Code.RESOURCE_EXHAUSTED
            assert "'team-a'" in error.details() and "in flight" in error.details()
            assert dict(error.trailing_metadata())["retry-after"] == "1"
        served = await stack.stub.Generate(janus_pb2.GenerateRequest(prompt="a fox"), metadata=team_b)
        assert len(served.png) == 1
        assert len(stack.worker.jobs) == 2  # the refused calls queued nothing
        assert sorted(job.owner for job in stack.worker.jobs.values()) == ["key:team-a", "key:team-b"]
        assert metrics.registry.get_sample_value("janus_rate_limited_total", {"key": "team-a"}) == 2
        assert metrics.registry.get_sample_value("janus_rate_limited_total", {"key": "team-b"}) is None

        busy.cancel()  # a cancelled call gives its slot back
        await eventually(lambda: stack.service.quotas.in_flight("team-a") == 0, "team-a's slot is released")
        assert len((await stack.stub.Generate(janus_pb2.GenerateRequest(prompt="a fox"), metadata=team_a)).png) == 1
        assert stack.service.quotas.in_flight("team-a") == stack.service.quotas.in_flight("team-b") == 0

    access = [r for r in caplog.records if r.name == "janus.access"]
    refused = [r.fields for r in access if r.fields["status"] == "RESOURCE_EXHAUSTED"]
    assert [f["key"] for f in refused] == ["team-a", "team-a"]  # the key's name, ...
    assert not any("secret" in r.getMessage() or "secret" in str(r.fields) for r in access)  # ... never the key


async def test_images_per_minute_are_charged_to_the_key_of_a_stream(tmp_path: Path) -> None:
    """The key is known inside streaming handlers too: Service charges images to it."""
    path = keys_file(tmp_path, **{"team-c": {"images_per_minute": 3}})
    team_c = bearer("team-c-secret")
    async with running(api_keys_file=path) as stack:
        request = janus_pb2.GenerateRequest(prompt="a fox", n=3)
        events = await drain(stack.stub.GenerateStream(request, metadata=team_c))
        assert len(events[-1].result.png) == 3
        for call in (drain(stack.stub.GenerateStream(request, metadata=team_c)),
                     stack.stub.Generate(janus_pb2.GenerateRequest(prompt="a fox"), metadata=team_c)):
            error = await status_of(call)
            assert error.code() == Code.RESOURCE_EXHAUSTED and "3 images per minute" in error.details()
            assert 15 <= int(dict(error.trailing_metadata())["retry-after"]) <= 60
        assert len(stack.worker.jobs) == 1


# --- deadlines and cancellation ------------------------------------------------------------------


async def test_client_deadline_becomes_the_job_deadline_and_stops_it(stack: Stack) -> None:
    sent = time.time()
    error = await status_of(stack.stub.Generate(janus_pb2.GenerateRequest(prompt="slow"), timeout=1.0))
    assert error.code() == Code.DEADLINE_EXCEEDED
    job = await stack.worker.wait_job()
    assert abs(job.deadline - (sent + 1.0)) < 0.5  # not the server's 300 s default
    assert await stack.worker.wait_stopped(job.id) in ("cancelled", "expired")


async def test_server_request_timeout_reports_deadline_exceeded() -> None:
    async with running(request_timeout=0.5) as stack:
        error = await status_of(stack.stub.Understand(understand_request(prompt="slow")))
        assert error.code() == Code.DEADLINE_EXCEEDED and "deadline" in error.details()
        await stack.worker.wait_stopped((await stack.worker.wait_job()).id)


async def test_cancelling_a_stream_cancels_the_job(stack: Stack) -> None:
    call = stack.stub.GenerateStream(janus_pb2.GenerateRequest(prompt="slow"))
    first = await call.read()
    assert first.progress.step == 1
    call.cancel()
    job = await stack.worker.wait_job()
    assert await stack.worker.wait_stopped(job.id) == "cancelled"
    assert await stack.queue.is_cancelled(job.id)


async def test_cancelling_a_unary_call_cancels_the_job(stack: Stack) -> None:
    call = stack.stub.Understand(understand_request(prompt="slow"))
    job = await stack.worker.wait_job()
    call.cancel()
    assert await stack.worker.wait_stopped(job.id) == "cancelled"
    with pytest.raises(asyncio.CancelledError):
        await call


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "needle"), [
    ({"prompt": ""}, "prompt"),
    ({"images": []}, "at least one image"),
    ({"images": [b"not an image"]}, "images[0] is not a decodable image"),
    ({"images": [IMAGE, IMAGE[:20]]}, "images[1] is truncated"),  # any size is fine; a cut-off file is not
    ({"images": [IMAGE] * 5}, "at most 4"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 100_000}, "max_new_tokens"),
    ({"seed": -3}, "seed"),
])
async def test_bad_understand_input_is_invalid_argument(stack: Stack, fields: dict[str, Any], needle: str) -> None:
    error = await status_of(stack.stub.Understand(understand_request(**fields)))
    assert error.code() == Code.INVALID_ARGUMENT
    assert needle in error.details()


@pytest.mark.parametrize(("fields", "needle"), [
    ({"prompt": "  "}, "prompt"),
    ({"n": 17}, "n must be between 1 and 16"),
    ({"cfg_weight": -2.0}, "cfg_weight"),
    ({"top_p": -0.5}, "top_p"),
    ({"temperature": float("nan")}, "temperature"),
])
async def test_bad_generate_input_is_invalid_argument(stack: Stack, fields: dict[str, Any], needle: str) -> None:
    request = janus_pb2.GenerateRequest(**({"prompt": "a fox"} | fields))
    for call in (stack.stub.Generate(request), drain(stack.stub.GenerateStream(request))):
        error = await status_of(call)
        assert error.code() == Code.INVALID_ARGUMENT and needle in error.details()
    assert not stack.worker.jobs


@pytest.mark.parametrize(("job_code", "status"), [
    (jobs.INVALID_ARGUMENT, Code.INVALID_ARGUMENT),
    (jobs.RESOURCE_EXHAUSTED, Code.RESOURCE_EXHAUSTED),
    (jobs.UNAVAILABLE, Code.UNAVAILABLE),
    (jobs.CANCELLED, Code.CANCELLED),
    (jobs.DEADLINE_EXCEEDED, Code.DEADLINE_EXCEEDED),
    (jobs.INTERNAL, Code.INTERNAL),
    ("something_new", Code.INTERNAL),
])
async def test_job_errors_map_to_statuses(stack: Stack, job_code: str, status: grpc.StatusCode) -> None:
    prompt = f"fail:{job_code}"
    error = await status_of(stack.stub.Generate(janus_pb2.GenerateRequest(prompt=prompt)))
    assert error.code() == status and prompt in error.details()
    error = await status_of(drain(stack.stub.UnderstandStream(understand_request(prompt=prompt))))
    assert error.code() == status


def test_unexpected_errors_are_internal_without_details() -> None:
    assert status_for(RuntimeError("/secret/path")) == (Code.INTERNAL, "internal error", ())


async def test_queue_full_is_resource_exhausted_with_retry_after() -> None:
    async with running(max_depth=1) as stack:
        busy = stack.stub.GenerateStream(janus_pb2.GenerateRequest(prompt="slow"))
        await busy.read()
        error = await status_of(stack.stub.Generate(janus_pb2.GenerateRequest(prompt="a fox")))
        assert error.code() == Code.RESOURCE_EXHAUSTED and "queue is full" in error.details()
        assert dict(error.trailing_metadata())["retry-after"] == "2"
        busy.cancel()


async def test_not_ready_is_unavailable() -> None:
    async with running(worker=False) as stack:
        error = await status_of(stack.stub.Understand(understand_request()))
        assert error.code() == Code.UNAVAILABLE and "heartbeat" in error.details()
        assert not stack.queue._entries  # nothing was queued


# --- many clients, the Python client, shutdown ---------------------------------------------------


async def test_concurrent_clients_each_get_their_own_answer(stack: Stack) -> None:
    channels = [grpc.aio.insecure_channel(stack.target) for _ in range(8)]
    try:
        stubs = [janus_pb2_grpc.JanusStub(c) for c in channels]
        calls = [stubs[i % 8].Generate(janus_pb2.GenerateRequest(prompt="a fox", seed=i)) for i in range(16)]
        calls += [drain(stubs[i % 8].UnderstandStream(understand_request())) for i in range(16)]
        results = await asyncio.gather(*calls)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    assert [r.seed for r in results[:16]] == list(range(16))
    assert len({r.id for r in results[:16]}) == 16
    assert all("".join(c.delta for c in chunks) == "".join(WORDS) for chunks in results[16:])


async def test_python_client_covers_all_four_rpcs() -> None:
    async with running(api_key=["secret"]) as stack:
        def use_client() -> None:
            with JanusClient(stack.target, api_key="secret", timeout=30) as client:
                answer = client.understand("What is this?", [IMAGE], max_new_tokens=16)
                assert answer.text == "".join(WORDS) and answer.completion_tokens == 4
                chunks = list(client.understand_stream("What is this?", [IMAGE]))
                assert "".join(c.delta for c in chunks) == answer.text and chunks[-1].finish_reason == "stop"
                images = client.generate("noise", n=16, seed=3, temperature=0)
                assert images.seed == 3 and len(images.pngs) == 16
                events = list(client.generate_stream("a fox", n=1))
                assert [type(e) for e in events] == [Progress] * STEPS + [Images]
            with JanusClient(stack.target) as anonymous, pytest.raises(grpc.RpcError) as info:
                anonymous.generate("a fox")
            assert info.value.code() == Code.UNAUTHENTICATED  # type: ignore[attr-defined]

        await asyncio.to_thread(use_client)
        greedy = [j for j in stack.worker.jobs.values() if j.params.prompt == "noise"]
        assert greedy[0].params.temperature == 0.0


async def test_graceful_shutdown_finishes_running_calls_and_refuses_new_ones() -> None:
    async with running() as stack:
        running_call = stack.stub.GenerateStream(janus_pb2.GenerateRequest(prompt="brief"))
        assert (await running_call.read()).progress.step == 1
        await stop_grpc_server(stack.server, grace=5.0)  # returns once the running call is done
        events = await drain(running_call)
        assert events[-1].WhichOneof("event") == "result" and len(events[-1].result.png) == 1
        error = await status_of(stack.stub.Generate(janus_pb2.GenerateRequest(prompt="a fox"), timeout=2))
        assert error.code() in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
