"""Process wiring for the CLI: `serve` (API + worker in one process tree), `api`, and `worker`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import uvicorn

from server.gpus import Assignment, expected_by_gpu, plan_workers
from server.http.app import ModelInfo, create_app
from server.http.jobs import webhook_body
from server.metrics import Metrics
from server.private_redis import PrivateRedis, PrivateRedisError
from server.queue import JobQueue, QueueMisconfigured, create_queue
from server.service import Service
from server.settings import Settings
from server.supervisor import WorkerSupervisor
from server.webhooks import WebhookDeliverer

log = logging.getLogger(__name__)
T = TypeVar("T")


def make_queue(settings: Settings) -> JobQueue:
    password = settings.queue_password.get_secret_value() if settings.queue_password else None
    return create_queue(settings.queue, max_depth=settings.max_queue_depth, result_ttl=settings.result_ttl,
                        max_deliveries=settings.max_deliveries, claim_idle_timeout=settings.claim_idle_timeout,
                        dead_worker_timeout=settings.dead_worker_timeout, password=password,
                        tls_ca_certs=settings.queue_tls_ca, max_connections=settings.queue_max_connections,
                        max_results=settings.max_stored_results, max_result_bytes=settings.max_stored_result_bytes)


async def open_queue(settings: Settings) -> JobQueue:
    """The queue, checked once: wrong credentials or a failed TLS handshake stop the process here."""
    queue = make_queue(settings)
    try:
        await queue.verify()
    except QueueMisconfigured as exc:
        await queue.close()
        log.error("cannot use the job queue: %s", exc)
        print(f"janus-server: cannot use the job queue: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return queue


def model_info(settings: Settings) -> ModelInfo:
    """Served as `--model` was given (a hub id or a path, as vLLM does: clients such as guidellm load the
    tokenizer by that name), with its last component as an alias; `--served-model-name` replaces both."""
    given = (settings.model or "").strip()
    alias = Path(given).name
    return ModelInfo(name=given or "janus-pro", served_names=list(settings.served_model_name),
                     aliases=[alias] if alias and alias != given and not settings.served_model_name else [])


def load_engine(settings: Settings):
    """Load the model and build its engine (blocking; run it in a thread)."""
    from janus_core import Engine, EngineConfig, load_model

    if not settings.model:
        raise SystemExit("no model given: pass --model DIR_OR_HUB_ID (or set JANUS_MODEL)")
    # progress bars are off (logs are JSON lines): say why a first start with a hub id takes minutes
    log.info("loading %s (a hub id not in the Hugging Face cache is downloaded first)", settings.model)
    lm = load_model(settings.model, device=settings.device, dtype=settings.dtype, chat_format=settings.chat_format,
                    vae=settings.vae, quantization=settings.quantization)
    config = EngineConfig(max_batch_size=settings.max_batch_size, max_images=settings.max_images,
                          max_new_tokens=settings.max_new_tokens, max_context=settings.max_context,
                          kv_cache_memory=settings.kv_cache_bytes,
                          gpu_memory_utilization=settings.gpu_memory_utilization,
                          prefix_caching=settings.prefix_caching, vision_cache_bytes=settings.vision_cache_mb * 2**20,
                          compile=settings.compile, cuda_graphs=settings.cuda_graphs,
                          pack_cpu_linears=settings.cpu_packed_linears,
                          preview_share=settings.preview_share)
    return lm, Engine(lm, config)


async def run_on_fresh_thread(fn: Callable[..., T], *args) -> T:
    """Run `fn` on a new thread that ends when `fn` returns (not on `asyncio.to_thread`'s pool).

    OpenMP keeps a thread pool for every thread that ran a parallel torch op, for as long as that
    thread lives, and libgomp stops spin-waiting once it manages more threads than there are CPUs.
    Loading the model on a pooled executor thread left a second pool behind and made every engine
    decode step ~20% slower on CPU (measured in docs/benchmarks.md); a thread that exits takes its
    pool with it, leaving the engine thread's the only one.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    thread = threading.Thread(target=target, name="janus-load", daemon=True)
    thread.start()
    result = await future
    await asyncio.to_thread(thread.join)  # its OpenMP pool is gone before the engine starts
    return result


async def run_worker(settings: Settings, queue: JobQueue, metrics: Metrics, stop: asyncio.Event,
                     info: ModelInfo | None = None, loaded: asyncio.Event | None = None) -> None:
    from server.worker import Worker

    lm, engine = await run_on_fresh_thread(load_engine, settings)
    if info is not None:
        info.image_size, info.num_image_tokens, info.generator = lm.image_size, lm.num_image_tokens, lm.generator
    if loaded is not None:
        loaded.set()
    engine.start()
    try:
        await Worker(queue, engine, settings, metrics=metrics).run(stop)
    finally:
        await asyncio.to_thread(engine.stop, 30.0)


MEMORY = ("", "memory", "memory://")


def serve(settings: Settings) -> int:
    """`janus-server serve`: one worker in this process (one GPU, or CPU with one worker, and no --queue),
    or worker processes (server.gpus: one per GPU on CUDA) over --queue or a private redis-server."""
    try:
        assignments = plan_workers(settings.device, settings.workers, settings.gpus)
    except ValueError as exc:
        print(f"janus-server serve: {exc}", file=sys.stderr)
        return 2
    if settings.quantization == "fp8" and assignments[0].device != "cuda":
        print(f"janus-server serve: --quantization fp8 needs CUDA GPUs (compute capability 8.9 or newer); the "
              f"device is {assignments[0].device}: use --quantization int8", file=sys.stderr)
        return 2
    shared = {label: n for label, n in expected_by_gpu(assignments).items() if n > 1}
    if shared and assignments[0].visible is not None and settings.kv_cache_memory is None:
        label, n = next(iter(shared.items()))
        print(f"janus-server serve: {n} workers share GPU {label}: give each its KV pool with --kv-cache-memory SIZE "
              "(--gpu-memory-utilization sizes one engine per GPU: it counts the other worker's memory as taken)",
              file=sys.stderr)
        return 2
    if settings.queue not in MEMORY:
        return asyncio.run(serve_api(settings, with_local_worker=False, spawn_workers_here=True,
                                     assignments=assignments))
    if len(assignments) == 1:
        local = settings.model_copy(update={"device": assignments[0].local_device})
        return asyncio.run(serve_api(local, with_local_worker=True, assignments=assignments))
    executable = shutil.which(settings.redis_server)
    if executable is None:
        print(f"janus-server serve: {len(assignments)} workers share a Redis queue, and {settings.redis_server!r} "
              "(JANUS_REDIS_SERVER) is not installed or not on PATH: pass --queue redis://HOST:PORT/DB, or "
              "install redis-server (serve then starts a private one on a unix socket)", file=sys.stderr)
        return 2
    from janus_core import parse_size

    maxmemory = parse_size(settings.redis_maxmemory) if settings.redis_maxmemory else None
    private = PrivateRedis(executable, maxmemory=maxmemory)
    try:
        url = private.start()
    except (PrivateRedisError, OSError) as exc:
        print(f"janus-server serve: could not start a private redis-server: {exc}; pass --queue redis://... "
              "instead", file=sys.stderr)
        return 2
    try:
        # nothing of a --queue's credentials applies to the private server
        own = settings.model_copy(update={"queue": url, "queue_password": None, "queue_tls_ca": None})
        return asyncio.run(serve_api(own, with_local_worker=False, spawn_workers_here=True, assignments=assignments))
    finally:
        private.stop()  # after serve_api stopped the workers, which drain into it


def shutdown(server: uvicorn.Server, supervisor: WorkerSupervisor | None) -> None:
    """SIGTERM / Ctrl-C: the API drains; workers that got the signal too (a terminal's process group) drain
    and exit, and are not restarted."""
    server.should_exit = True
    if supervisor is not None:
        supervisor.stopping()


async def serve_api(settings: Settings, *, with_local_worker: bool, spawn_workers_here: bool = False,
                    assignments: list[Assignment] | None = None) -> int:
    """REST + gRPC frontends; with a local worker (the in-process queue) the model runs here too.
    `assignments`: serve's workers (server.gpus), which /ready counts per GPU."""
    metrics = Metrics()
    queue = await open_queue(settings)
    supervisor = None
    by_gpu = expected_by_gpu(assignments) if assignments else None
    if spawn_workers_here and not with_local_worker and settings.model:
        supervisor = WorkerSupervisor(settings, metrics, assignments=assignments)
        service = Service(settings, queue, expected_workers=supervisor.expected, local_workers=supervisor.worker_ids,
                          expected_by_gpu=supervisor.expected_by_gpu())
    else:
        service = Service(settings, queue, expected_workers=1 if with_local_worker else None, expected_by_gpu=by_gpu)
    info = model_info(settings)
    service.model_info = info
    app = create_app(settings, service, metrics, info)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                           timeout_graceful_shutdown=int(settings.request_timeout),
                                           limit_concurrency=settings.max_connections))
    if settings.playground:
        shown = "localhost" if settings.host in ("0.0.0.0", "::", "") else settings.host
        shown = f"[{shown}]" if ":" in shown else shown
        log.info("playground: http://%s:%d/ (the API's own page; --no-playground turns it off)", shown, settings.port)
    grpc_server = None
    if settings.grpc_port:
        from server.rpc.service import start_grpc_server

        grpc_server = await start_grpc_server(service, settings, metrics)
    deliverer = start_webhooks(settings, service, metrics)
    stop = asyncio.Event()
    exit_code = 0
    worker_task = None
    if with_local_worker:
        worker_task = asyncio.create_task(run_worker(settings, queue, metrics, stop, info))

        def worker_done(task: asyncio.Task) -> None:
            nonlocal exit_code
            if not task.cancelled() and task.exception() is not None:
                log.error("the worker stopped: %s", task.exception())
                exit_code = 1
                server.should_exit = True

        worker_task.add_done_callback(worker_done)
    supervising = None
    if supervisor is not None:
        supervisor.start()
        supervising = asyncio.create_task(supervisor.run())

        def supervisor_done(task: asyncio.Task) -> None:
            nonlocal exit_code
            if supervisor.fatal is not None:
                print(f"janus-server serve: {supervisor.fatal}", file=sys.stderr)
                exit_code = 1
                server.should_exit = True

        supervising.add_done_callback(supervisor_done)
    # uvicorn re-raises SIGTERM/SIGINT under the handlers it found once it has shut down; with the
    # default ones that kills the process before the `finally` below stops workers and gRPC.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: shutdown(server, supervisor))
    try:
        await server.serve()
    finally:
        stop.set()
        if worker_task is not None:
            with contextlib.suppress(Exception):
                await worker_task
        if supervisor is not None and supervising is not None:
            supervising.cancel()  # no restarts from here on
            await asyncio.to_thread(supervisor.stop)
        if grpc_server is not None:
            from server.rpc.service import stop_grpc_server

            await stop_grpc_server(grpc_server, grace=10.0)
        if deliverer is not None:
            await deliverer.close()
        await service.close()
        await queue.close()
    return exit_code


def start_webhooks(settings: Settings, service: Service, metrics: Metrics) -> WebhookDeliverer | None:
    """Every frontend delivers webhooks (in Redis mode, whichever frontend takes a delivery first), when
    webhooks are on (JANUS_ALLOWED_WEBHOOK_HOSTS)."""
    if not settings.allowed_webhook_hosts:
        return None
    deliverer = WebhookDeliverer(service.queue, lambda job_id: webhook_body(service, job_id), settings, metrics)
    task = asyncio.create_task(deliverer.run())
    task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                           or log.error("webhook deliveries stopped: %s", t.exception()))
    return deliverer


async def serve_worker(settings: Settings) -> int:
    """A worker process: one engine, metrics and health on `metrics_port`, graceful drain on SIGTERM."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    metrics = Metrics()
    queue = await open_queue(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loaded = asyncio.Event()
    side = FastAPI(title="janus-server worker")

    @side.get("/health")
    async def health():
        return {"status": "ok"}

    @side.get("/ready")
    async def ready():
        return {"status": "ready"} if loaded.is_set() else JSONResponse({"status": "loading"}, status_code=503)

    @side.get("/metrics")
    async def scrape():
        return Response(metrics.render(), media_type=metrics.content_type)

    side_server = uvicorn.Server(uvicorn.Config(side, host=settings.host, port=settings.metrics_port,
                                                log_config=None))
    side_server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    side_task = asyncio.create_task(side_server.serve())
    try:
        await run_worker(settings, queue, metrics, stop, loaded=loaded)
        return 0
    finally:
        side_server.should_exit = True
        await side_task
        await queue.close()
