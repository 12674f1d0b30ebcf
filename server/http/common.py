"""Pieces every REST route shares: error bodies, auth, image payloads, waiting for and streaming jobs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server import jobs as J
from server.jobs import server_timing
from server.service import BadRequest, Origin, Service, Ticket

# Terminal job errors -> HTTP status. 499: the client went away (nginx's convention).
ERROR_STATUS = {
    J.INVALID_ARGUMENT: 400,
    J.DEADLINE_EXCEEDED: 504,
    J.CANCELLED: 499,
    J.UNAVAILABLE: 503,
    J.RESOURCE_EXHAUSTED: 503,
    J.INTERNAL: 500,
}
STATUS_CODE_NAMES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                     413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
                     499: "cancelled", 500: "internal_error", 503: "unavailable", 504: "deadline_exceeded"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or STATUS_CODE_NAMES.get(status, "error")
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, message: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code or STATUS_CODE_NAMES.get(status, "error"), message), status_code=status,
                        headers=headers)


def answer(request: Request, body: dict[str, Any], event: dict[str, Any]) -> JSONResponse:
    """A synchronous route's JSON answer with its timings: the body's `timings` and a `Server-Timing` header."""
    timings = answer_timings(request, event)
    if timings is not None:
        body["timings"] = timings
    return JSONResponse(body, headers=timing_header(timings))


def timing_header(timings: dict[str, float] | None) -> dict[str, str]:
    """`Server-Timing` for an answer's timings (none without them: a worker from before timings)."""
    return {"Server-Timing": server_timing(timings)} if timings is not None else {}


def answer_timings(request: Request, event: dict[str, Any]) -> dict[str, float] | None:
    """The job's phases (ms, as its worker measured them), `total` from the request's arrival here until now (or the
    job's own, when this request joined a job that was already running or done: Idempotency-Key)."""
    worker = event.get("timings")
    if worker is None:
        return None
    timings = dict(worker)
    arrived = request.scope.get("state", {}).get("arrived")
    if arrived is not None:  # a retry answered from a job that ran before it came keeps the job's own total
        timings["total"] = max(round(max(time.time() - arrived, 0.0) * 1000.0, 1), worker.get("total", 0.0))
    return timings


def last_to_end(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Of several jobs answering one request, the one whose timings end last (it decided the request's)."""
    return max(events, key=lambda e: (e.get("timings") or {}).get("total", 0.0))


def job_error(event: dict[str, Any]) -> HTTPError:
    status = ERROR_STATUS.get(event.get("code", ""), 500)
    headers = {"Retry-After": "2"} if status == 503 else None
    return HTTPError(status, event.get("message", "the job failed"), event.get("code"), headers)


def origin_of(request: Request) -> Origin:
    """The route, the caller, the Idempotency-Key (if any) and the trace context of a REST request."""
    headers = request.headers
    return Origin.of(request.url.path, headers.get("authorization"), headers.get("idempotency-key"),
                     headers.get("traceparent"))


def decode_image_payload(value: str, index: int, max_bytes: int, field: str = "images",
                         label: str | None = None) -> bytes:
    """Base64 or a `data:` URL -> bytes; the size is checked before decoding. `label` names it in errors."""
    label = label or f"{field}[{index}]"
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{label} is empty; expected base64 image data or a data: URL")
    payload = value
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep or ";base64" not in header:
            raise BadRequest(f"{label} is a data: URL without ';base64,' data")
    elif value.startswith(("http://", "https://")):
        raise BadRequest(f"{label} is a URL; send the image as base64 or a data: URL")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes:
        raise BadRequest(f"{label} is larger than the limit of {max_bytes} bytes", 413)
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{label} is not valid base64 ({exc})") from exc
    if not data:
        raise BadRequest(f"{label} decodes to no bytes")
    return data


async def wait_for_result(service: Service, ticket: Ticket, request: Request) -> dict[str, Any]:
    """The job's terminal event; the job is cancelled if the client disconnects first (unless it sent an
    Idempotency-Key: then it will retry and re-attach, and the job runs on for it)."""
    async def consume() -> dict[str, Any]:
        async for event in service.follow(ticket):
            if J.is_terminal(event):
                return event
        return J.error_event(J.UNAVAILABLE, "the job's event stream ended without a result")

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                await service.abandon(ticket)
                raise HTTPError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()


def sse_response(events: AsyncIterator[bytes], ticket: Ticket | list[Ticket]) -> StreamingResponse:
    """Server-sent events, unbuffered by proxies (nginx honours X-Accel-Buffering); `X-Job-Id` names the job
    (jobs, comma-separated) from the first byte (a client that re-attaches with its Idempotency-Key sees the
    same id)."""
    ids = ",".join(t.job_id for t in ticket) if isinstance(ticket, list) else ticket.job_id
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Job-Id": ids}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def stream_jobs(service: Service, tickets: list[Ticket], render, finish=None) -> AsyncIterator[bytes]:
    """Server-sent events for several jobs at once (the choices of one request), interleaved as they come:
    `render(i, event)` returns the payloads for job i's event, `finish()` those sent once every job has ended.
    A job's error ends the stream (after an error event); the jobs still running then, or when the client
    goes away, are abandoned."""
    merged: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()

    async def pump(i: int, ticket: Ticket) -> None:
        try:
            async for event in service.follow(ticket):
                await merged.put((i, event))
                if J.is_terminal(event):
                    return
            await merged.put((i, J.error_event(J.UNAVAILABLE, "the job's event stream ended without a result")))
        except Exception as exc:  # the stream must end with an error, not wait for ever
            await merged.put((i, J.error_event(J.UNAVAILABLE, f"following the job failed: {exc}")))

    pumps = [asyncio.ensure_future(pump(i, t)) for i, t in enumerate(tickets)]
    running = set(range(len(tickets)))
    try:
        while running:
            i, event = await merged.get()
            if J.is_terminal(event):
                running.discard(i)
            if event.get("type") == "error":
                yield sse({"error": {"code": event.get("code"), "message": event.get("message")}})
                break
            for payload in render(i, event):
                yield sse(payload)
        else:
            for payload in finish() if finish is not None else []:
                yield sse(payload)
        yield sse("[DONE]")
    finally:
        for task in pumps:
            task.cancel()
        # one shielded await: a hang-up cancels this generator at every await, so a loop would stop at its first
        await asyncio.shield(abandon_all(service, [tickets[i] for i in running]))


async def abandon_all(service: Service, tickets: list[Ticket]) -> None:
    await asyncio.gather(*(service.abandon(t) for t in tickets))


async def wait_for_results(service: Service, tickets: list[Ticket], request: Request) -> list[dict[str, Any]]:
    """Every job's terminal event (as `wait_for_result`, together). The first error raises at once, and the jobs
    still running are abandoned; so are they all if this request is cancelled."""
    waits = [asyncio.ensure_future(wait_for_result(service, t, request)) for t in tickets]
    try:
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                event = task.result()  # a 499 (the client went away) raises here
                if event["type"] == "error":
                    raise job_error(event)
        return [task.result() for task in waits]
    finally:
        unfinished = [t for t, task in zip(tickets, waits, strict=True) if not task.done()]
        for task in waits:
            task.cancel()
        if unfinished:
            await asyncio.shield(abandon_all(service, unfinished))


async def stream_job(service: Service, ticket: Ticket, render) -> AsyncIterator[bytes]:
    """Server-sent events for a job: `render(event)` returns the payloads for each event.

    If the client goes away (the generator is closed or cancelled), the job is cancelled, unless the
    request carried an Idempotency-Key.
    """
    finished = False
    try:
        async for event in service.follow(ticket):
            if event.get("type") == "error":
                finished = True
                yield sse({"error": {"code": event.get("code"), "message": event.get("message")}})
                break
            for payload in render(event):
                yield sse(payload)
            if J.is_terminal(event):
                finished = True
                break
        yield sse("[DONE]")
    finally:
        if not finished:
            # shielded: when the server notices the hang-up it cancels this generator's task, and an
            # unshielded await here would be cancelled before the cancel reached a Redis queue
            await asyncio.shield(service.abandon(ticket))
