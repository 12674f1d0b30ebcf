"""Sending one batch request: a POST retried on 429 / 503 (after Retry-After, or waits that double) and on
connection failures (a few times, then `Unreachable`); the `Backoff` that holds new lines back while refused ones
wait; the HTTP client of `--url`. It knows a `Request`'s url and body, not the files it came from or the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from server.batch.files import Request

RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    answers: int = 5  # tries while the answer is a 429 or 503 (waits of 1, 2, 4, 8 s or Retry-After); then recorded
    connections: int = 4  # tries while the server cannot be reached; then the run stops
    max_wait: float = 60.0  # the longest wait between two tries


class Unreachable(Exception):
    """The server could not be reached on any try: the run stops (a rerun resumes)."""


def retry_after(value: str | None, tries: int, max_wait: float) -> float:
    """Seconds to wait after the `tries`-th 429 / 503: 1, 2, 4, 8... (a full server needs time, and a batch has it),
    never sooner than its Retry-After (seconds or an HTTP date), at most `max_wait`."""
    seconds = 0.0
    if value:
        try:
            seconds = float(value)
        except ValueError:
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    if math.isnan(seconds):
        seconds = 0.0
    return min(max(seconds, 2.0 ** (tries - 1)), max_wait)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleeps `seconds`; True (at once) if `stop` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def wait_any(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class Backoff:
    """Requests the server refused for now (429, 503) go before new lines: while one waits to retry, lanes take no
    new line, so a full server sees fewer requests instead of losing the refused ones to fresh ones."""

    def __init__(self) -> None:
        self.waiting = 0
        self.clear = asyncio.Event()
        self.clear.set()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.waiting += 1
        self.clear.clear()
        try:
            yield
        finally:
            self.waiting -= 1
            if not self.waiting:
                self.clear.set()


@dataclass(frozen=True)
class Answer:
    status: int
    request_id: str
    body: Any


def answer_of(response: httpx.Response) -> Answer:
    try:
        body = response.json()
    except ValueError:  # e.g. a proxy's HTML page
        body = {"error": {"code": "not_json", "message": response.text[:2000]}}
    return Answer(response.status_code, response.headers.get("x-request-id", ""), body)


async def send(client: httpx.AsyncClient, request: Request, headers: dict[str, str], policy: RetryPolicy,
               stop: asyncio.Event, backoff: Backoff) -> Answer | None:
    """POSTs one request, retrying 429 / 503 and connection failures; None when `stop` is set while it waits to
    retry (the line is left for the next run)."""
    answers = failures = 0
    with contextlib.ExitStack() as refused:
        while True:
            try:
                response = await client.post(request.url, json=request.body, headers=headers)
            except httpx.TransportError as exc:
                failures += 1
                if failures >= policy.connections:
                    raise Unreachable(f"{client.base_url.join(request.url)}: {type(exc).__name__}: {exc}") from exc
                wait = min(0.5 * 2 ** (failures - 1), policy.max_wait)
            else:
                answers += 1
                answer = answer_of(response)
                if answer.status not in RETRY_STATUSES or answers >= policy.answers:
                    return answer
                if answers == 1:
                    refused.enter_context(backoff.hold())
                wait = retry_after(response.headers.get("retry-after"), answers, policy.max_wait)
            if await wait_or_stop(stop, wait):
                return None


def http_client(url: str, api_key: str | None, concurrency: int, timeout: float) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                             timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
