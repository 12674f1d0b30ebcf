"""The `janus-server batch` run: the flags checked into a `Plan`; `Run`'s lanes, which take the lines still to do,
send them and write their answers; Ctrl+C and SIGTERM (`Interrupts`); the progress bar; and where requests go, a
server or the app `serve` builds, called in this process (`in_process`: the app, and with it torch, is imported only
there). The line and file formats are `files`'s, sending and retrying `send`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from tqdm import tqdm

from server.batch.files import (
    BadLine,
    OutputFile,
    Request,
    error_record,
    pending,
    recover,
    response_record,
    store_images,
)
from server.batch.send import Backoff, RetryPolicy, Unreachable, http_client, send, wait_any

if TYPE_CHECKING:
    from server.settings import Settings

DONE, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


# --- one run --------------------------------------------------------------------------------------------


def say(message: str) -> None:
    """A line on stderr that leaves the progress bar whole."""
    tqdm.write(f"janus-server batch: {message}", file=sys.stderr)


class Progress:
    """The bar on stderr (lines done / total, images/s, ETA) and this run's counts for the summary line."""

    def __init__(self, total: int, already: int) -> None:
        self.already = already
        self.written = self.failed = self.images = 0
        self.started = time.monotonic()
        # to a terminal, redrawn twice a second; to a log (not a terminal), a line every 10 s at most
        self.bar = tqdm(total=total, initial=already, unit="req", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 10.0)

    def record(self, *, failed: bool, images: int) -> None:
        self.written += 1
        self.failed += failed
        self.images += images
        self.bar.set_postfix_str(f"{self.images_per_s:.2f} images/s", refresh=False)
        self.bar.update(1)

    @property
    def images_per_s(self) -> float:
        return self.images / max(time.monotonic() - self.started, 1e-9)

    def close(self) -> str:
        """Closes the bar; the summary line."""
        self.bar.close()
        before = f" (and {self.already} before)" if self.already else ""
        return (f"done {self.written}{before}, failed {self.failed}, images {self.images}, "
                f"{self.images_per_s:.2f} images/s, {time.monotonic() - self.started:.1f} s elapsed")


class Interrupts:
    """Ctrl+C once: `stop` is set, no new request is sent, those in flight finish and are written. Twice (or
    SIGTERM): the lanes are cancelled and their requests abandoned (a rerun sends them again)."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.abandoned = False
        self.failure: str | None = None  # why the run stopped on its own
        self.lanes: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        """Process-wide handlers that hand each signal to the running loop. They stay when the run is over (then
        doing nothing): a second Ctrl+C that lands while the process exits must not become a traceback."""
        self._loop = asyncio.get_running_loop()
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._interrupt if signum == signal.SIGINT else self.abandon)

    def _interrupt(self) -> None:
        if self.stop.is_set():
            self.abandon()
            return
        self.stop.set()
        say("stopping: the requests in flight finish (Ctrl+C again abandons them); run the same command again "
            "to resume")

    def abandon(self) -> None:
        self.stop.set()
        self.abandoned = True
        for lane in self.lanes:
            lane.cancel()

    def fail(self, reason: str, *, abandon: bool) -> None:
        """The run cannot go on: stop as Ctrl+C does (once, or twice with `abandon`) and say why at the end."""
        self.failure = self.failure or reason
        if abandon:
            self.abandon()
        else:
            self.stop.set()


@dataclass
class Run:
    """One pass over the lines still to do: `concurrency` lanes send them through `client` and append their
    output lines."""

    client: httpx.AsyncClient
    interrupts: Interrupts
    output: OutputFile
    progress: Progress
    images_dir: Path | None = None
    key_scope: str | None = None  # None: no Idempotency-Key (in-process, no connection can drop)
    policy: RetryPolicy = RetryPolicy()
    backoff: Backoff = field(default_factory=Backoff)
    exhausted: bool = False  # every input line was taken
    left: int = 0  # lines taken but not written (stopped while waiting to retry)

    async def handle(self, item: Request | BadLine) -> None:
        if isinstance(item, BadLine):
            self.output.write(error_record(item))
            self.progress.record(failed=True, images=0)
            await asyncio.sleep(0)  # a file of bad lines still lets Ctrl+C (and the other lanes) in
            return
        headers = {} if self.key_scope is None else {"Idempotency-Key": item.idempotency_key(self.key_scope)}
        answer = await send(self.client, item, headers, self.policy, self.interrupts.stop, self.backoff)
        if answer is None:
            self.left += 1
            return
        images = store_images(item, answer.body, self.images_dir) if answer.status == 200 else 0
        self.output.write(response_record(item, answer.status, answer.request_id, answer.body))
        self.progress.record(failed=answer.status != 200, images=images)

    async def lane(self, items: Iterator[Request | BadLine]) -> None:
        """Takes the next line (lanes share `items`) until there is none or the run stops."""
        while not self.interrupts.stop.is_set():
            if not self.backoff.clear.is_set():  # refused requests go first
                await wait_any(self.backoff.clear, self.interrupts.stop)
                continue
            try:
                item = next(items, None)
            except Exception as exc:  # the input cannot be read on: stop, never "done" with lines not read
                self.interrupts.fail(f"reading the input: {type(exc).__name__}: {exc}", abandon=False)
                return
            if item is None:
                self.exhausted = True
                return
            try:
                await self.handle(item)
            except Unreachable as exc:
                self.left += 1
                self.interrupts.fail(f"the server cannot be reached ({exc})", abandon=False)
            except Exception as exc:  # e.g. a full disk: stop, rather than go on with lines missing
                self.left += 1
                self.interrupts.fail(f"line {item.line_no}: {type(exc).__name__}: {exc}", abandon=False)

    async def run(self, items: Iterator[Request | BadLine], concurrency: int) -> int:
        self.interrupts.lanes = [asyncio.create_task(self.lane(items)) for _ in range(concurrency)]
        for outcome in await asyncio.gather(*self.interrupts.lanes, return_exceptions=True):
            if isinstance(outcome, Exception):  # a lane that died: the run did not end well
                self.interrupts.fail(f"{type(outcome).__name__}: {outcome}", abandon=False)
        if self.interrupts.failure is not None:
            say(f"{self.interrupts.failure}; run the same command again to resume")
            return FAILED
        finished = self.exhausted and not self.left and not self.interrupts.abandoned
        return DONE if finished else INTERRUPTED


# --- --model: the app in this process ----------------------------------------------------------------------


def private_settings(settings: Settings) -> Settings:
    """`serve`'s settings for an app only this process calls: the in-process queue, no keys, no playground,
    no access log (the bar is the progress report), and no request deadline worth speaking of (no client waits on
    one; a line queued behind many images must not be recorded as a 504)."""
    return settings.model_copy(update={"queue": "memory", "api_key": [], "api_keys_file": None,
                                       "require_api_key": False, "playground": False, "access_log": False,
                                       "request_timeout": max(settings.request_timeout, 7 * 24 * 3600.0)})


@contextlib.asynccontextmanager
async def in_process(settings: Settings, interrupts: Interrupts) -> AsyncIterator[httpx.AsyncClient | None]:
    """The app `janus-server serve` builds (server.runtime's pieces), with its worker loading the model here; a
    client that calls it in-process, or None when stopped before the model was loaded. ASGITransport runs no
    lifespan: the worker task is started and stopped here, as serve_api does."""
    from server import runtime
    from server.http.app import create_app
    from server.metrics import Metrics
    from server.service import Service

    metrics = Metrics()
    queue = await runtime.open_queue(settings)
    service = Service(settings, queue, expected_workers=1)
    info = service.model_info = runtime.model_info(settings)
    app = create_app(settings, service, metrics, info)
    worker_stop, loaded = asyncio.Event(), asyncio.Event()
    worker = asyncio.create_task(runtime.run_worker(settings, queue, metrics, worker_stop, info, loaded))
    try:
        if not await _loaded(loaded, worker, interrupts.stop):
            yield None
            return

        def died(task: asyncio.Task) -> None:  # nothing would answer: stop at once
            if not worker_stop.is_set():
                error = None if task.cancelled() else task.exception()
                interrupts.fail(f"the worker stopped: {error!r}", abandon=True)

        worker.add_done_callback(died)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is a 500 line, as served
        async with httpx.AsyncClient(transport=transport, base_url="http://janus-batch", timeout=None) as client:
            yield client
    finally:
        worker_stop.set()
        if not loaded.is_set():
            worker.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):  # a load error was raised above
            await worker
        await service.close()
        await queue.close()


async def _loaded(loaded: asyncio.Event, worker: asyncio.Task, stop: asyncio.Event) -> bool:
    """Waits for the model; False if `stop` came first; the worker's error if it failed to load."""
    waits = [asyncio.create_task(loaded.wait()), asyncio.create_task(stop.wait())]
    await asyncio.wait([*waits, worker], return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    if worker.done():
        worker.result()
    return loaded.is_set()


# --- the command ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the command line asks for, checked."""

    input: Path
    output: Path
    images_dir: Path | None
    url: str | None
    settings: Settings | None  # --model: the in-process server's
    concurrency: int
    api_key: str | None
    timeout: float


def plan(args: argparse.Namespace, settings: Settings) -> Plan | str:
    """The run the flags describe, or what is wrong with them."""
    if args.url and args.model:
        return "give --url (a running server) or --model (load it here), not both"
    if not args.url and not settings.model:
        return "give --url http://HOST:PORT (a running server) or --model DIR_OR_HUB_ID (or JANUS_MODEL)"
    if args.url and not args.url.startswith(("http://", "https://")):
        return f"--url must start with http:// or https://, got {args.url!r}"
    if settings.queue not in ("", "memory", "memory://") and not args.url:
        return "--model runs its own in-process queue; to use workers on a Redis queue, point --url at their api"
    source, output = Path(args.input), Path(args.output)
    if not source.is_file():
        return f"{source}: no such file"
    if not output.parent.is_dir():
        return f"--output {output}: the folder {output.parent} does not exist"
    if output.is_dir():
        return f"--output {output} is a folder; name a file"
    if output.exists() and output.samefile(source):
        return f"--output {output} is the input file; name another file"
    if args.images_dir and Path(args.images_dir).exists() and not Path(args.images_dir).is_dir():
        return f"--images-dir {args.images_dir} is a file; name a folder"
    concurrency = args.concurrency or (16 if args.url else 2 * settings.max_batch_size)  # 16: serve's batch
    if concurrency < 1:
        return f"--concurrency must be at least 1, got {concurrency}"
    api_key = settings.api_key[0] if settings.api_key else None  # --api-key, else JANUS_API_KEY's first
    images_dir = Path(args.images_dir).resolve() if args.images_dir else None
    return Plan(source, output, images_dir, args.url, None if args.url else private_settings(settings),
                concurrency, api_key, args.timeout)


async def run_plan(p: Plan) -> int:
    done = recover(p.output)
    total, already, todo = pending(p.input, done)
    if p.images_dir is not None:
        p.images_dir.mkdir(parents=True, exist_ok=True)
    interrupts = Interrupts()
    interrupts.install()  # before the model loads: Ctrl+C stops that too

    async def run_lines(client: httpx.AsyncClient, key_scope: str | None) -> int:
        output, progress = OutputFile(p.output), Progress(total, already)
        try:
            return await Run(client, interrupts, output, progress, p.images_dir, key_scope).run(todo, p.concurrency)
        finally:
            output.close()
            say(progress.close())

    if p.url is not None:
        async with http_client(p.url, p.api_key, p.concurrency, p.timeout) as client:
            return await run_lines(client, str(p.output.resolve()))
    assert p.settings is not None
    say(f"loading {p.settings.model}")
    async with in_process(p.settings, interrupts) as client:
        if client is None:
            say("stopped before the model was loaded")
            return INTERRUPTED
        return await run_lines(client, None)


def main(args: argparse.Namespace, settings: Settings) -> int:
    """`janus-server batch INPUT --output OUT (--url URL | --model M)`: 0 when every line is done, 130 when
    interrupted, 2 for a usage error, 1 when the server cannot be reached or the model cannot be loaded."""
    p = plan(args, settings)
    if isinstance(p, str):
        print(f"janus-server batch: {p}", file=sys.stderr)
        return USAGE
    if p.settings is None:
        return run_to_the_end(p)
    from janus_core import ModelLoadError
    from server.logs import configure_logging

    configure_logging(args.log_level or "warning", p.settings.log_json)  # the bar reports progress, not info lines
    try:
        return run_to_the_end(p)
    except ModelLoadError as exc:
        print(f"janus-server batch: cannot load the model: {exc}", file=sys.stderr)
        return FAILED


def run_to_the_end(p: Plan) -> int:
    try:
        return asyncio.run(run_plan(p))
    except KeyboardInterrupt:  # Ctrl+C before the handlers are in place: nothing was written yet
        return INTERRUPTED
    finally:
        # The run is over: a Ctrl+C from here to the exit changes nothing, and once Python's finalization has reset
        # the handlers it would kill the process instead of letting it exit with the status the run earned.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
