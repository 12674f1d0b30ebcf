"""Async jobs over REST: `Prefer: respond-async` on the inference routes, and the /v1/jobs resource.

A route that sees `Prefer: respond-async` (RFC 7240) validates the body as usual, submits the job and answers
`202 Accepted` with the job object and `Location: /v1/jobs/{id}`; the client then reads the job, follows its
events (Server-Sent Events from the start, resumable with `Last-Event-ID`), fetches its images, cancels it, or
waits for its webhook. Jobs belong to the caller that made them (its API key; another key gets 404), and stay
`JANUS_JOB_TTL` after they end. The job object's `result` is the body the synchronous route would have
returned (`server.http.bodies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server import jobs as J
from server.http.bodies import result_body
from server.http.common import HTTPError, origin_of
from server.idempotency import ANONYMOUS
from server.jobs import JobState
from server.service import AsyncSpec, BadRequest, JobGone, JobNotFound, Service, Ticket
from server.webhooks import check_webhook_url

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
MAX_LIST = 100


def wants_async(request: Request) -> bool:
    """The request carries the `respond-async` preference (RFC 7240: comma-separated, case-insensitive)."""
    for value in request.headers.getlist("prefer"):
        for preference in value.split(","):
            if preference.split(";")[0].split("=")[0].strip().lower() == "respond-async":
                return True
    return False


async def async_spec(request: Request, surface: str, body: Any, render: dict[str, Any] | None = None
                     ) -> AsyncSpec | None:
    """The request's async job spec, None for a synchronous request; 400 for a webhook without
    `Prefer: respond-async`, a stream with it, or a webhook URL this server will not call."""
    webhook = getattr(body, "webhook", None)
    if not wants_async(request):
        if webhook is not None:
            raise BadRequest("webhook is for async jobs: send the request with the header Prefer: respond-async")
        return None
    if getattr(body, "stream", False):
        raise BadRequest("stream and Prefer: respond-async do not go together; follow an async job's progress "
                         "at GET /v1/jobs/{id}/events")
    if webhook is not None:
        webhook = await check_webhook_url(webhook, request.app.state.settings)
    return AsyncSpec(surface, render or {}, webhook)


async def accepted(request: Request, ticket: Ticket) -> JSONResponse:
    """202 with the new (or joined) job's object."""
    service: Service = request.app.state.service
    try:
        state = await service.job_state(ticket.job_id, None)
    except (JobNotFound, JobGone) as exc:  # joined by its Idempotency-Key, and gone since
        raise HTTPError(410, f"this Idempotency-Key names job {ticket.job_id}, which is no longer kept ({exc}); "
                             "use a new key for a new request", "gone") from exc
    return JSONResponse(job_object(state), status_code=202,
                        headers={"Location": f"/v1/jobs/{ticket.job_id}", "Preference-Applied": "respond-async"})


def job_object(state: JobState, *, with_result: bool = True, gone: str | None = None) -> dict[str, Any]:
    """`gone`: the result was dropped early (the in-process queue's bounds): said in `error`, `result` null."""
    status = state.state
    event = state.terminal
    result = error = None
    if event is not None and event.get("type") == "result" and with_result:
        result = result_body(state.surface, state.id, event, state.render, int(state.created))
    elif event is not None and event.get("type") == "error":
        error = {"code": event.get("code"), "message": event.get("message")}
    if gone is not None:
        error = {"code": "result_dropped", "message": gone}
    return {"id": state.id, "object": "job", "kind": state.surface, "status": status,
            "queue_position": state.position if status == "queued" else None,
            "progress": state.progress, "created_at": _seconds(state.created), "started_at": _seconds(state.started),
            "finished_at": _seconds(state.finished), "result": result, "error": error,
            "timings": event.get("timings") if event is not None else None, "webhook": state.webhook}


async def webhook_body(service: Service, job_id: str) -> dict[str, Any] | None:
    """What a job's webhook receives: its object, result included; None once the job is gone."""
    try:
        return job_object(await service.job_state(job_id, None))
    except JobGone as exc:  # it did end: say so, without the result
        return job_object(exc.state, gone=str(exc))
    except JobNotFound:
        return None


def _seconds(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


def add_job_routes(app: FastAPI) -> None:
    @app.get("/v1/jobs", tags=["jobs"])
    async def list_jobs(request: Request, status: Status | None = None,
                        limit: int = Query(20, ge=1, le=MAX_LIST)):
        """The caller's own jobs, newest first, without their results."""
        if _caller(request) == ANONYMOUS:
            raise HTTPError(401, "listing jobs needs to know whose they are: send Authorization: Bearer <token> "
                                 "with your requests (with no API keys on this server, any token of your own names "
                                 "you)", headers={"WWW-Authenticate": "Bearer"})
        service: Service = request.app.state.service
        states = await service.queue.job_states(_caller(request), limit, status)
        return {"object": "list", "data": [job_object(s, with_result=False) for s in states]}

    # one route for both methods, so a 405 (and OPTIONS) names both in `Allow`
    @app.api_route("/v1/jobs/{job_id}", methods=["GET", "DELETE"], tags=["jobs"])
    async def job(job_id: str, request: Request):
        """GET: the job object. DELETE: cancel the job (an ended one is left as it is); the job object."""
        if request.method == "GET":
            return job_object(await _state(request, job_id))
        service: Service = request.app.state.service
        try:
            return job_object(await service.cancel_job(job_id, _caller(request)))
        except (JobNotFound, JobGone) as exc:
            raise _not_found(exc) from exc

    @app.get("/v1/jobs/{job_id}/images/{index}", tags=["jobs"], responses={200: {"content": {"image/png": {}}}})
    async def job_image(job_id: str, index: int, request: Request):
        state = await _state(request, job_id)
        event = state.terminal
        if event is None or event.get("type") != "result":
            raise HTTPError(409, f"job {job_id} is {state.state}: its images come when it has succeeded", "conflict")
        images = J.result_images(event) if event.get("kind") == "generate" else []
        if not 0 <= index < len(images):
            raise HTTPError(404, f"job {job_id} has {len(images)} image(s); there is no image {index}")
        return Response(images[index], media_type=f"image/{event.get('format', 'png')}")

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, request: Request):
        state = await _state(request, job_id)
        last = _last_event_id(request)
        service: Service = request.app.state.service
        caller = _caller(request)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Job-Id": job_id}
        return StreamingResponse(_events(service, state, caller, last), media_type="text/event-stream",
                                 headers=headers)


KEEPALIVE = 15.0  # seconds without an event before a comment line, so proxies keep a queued job's stream open


async def _events(service: Service, state: JobState, caller: str, last: int):
    """The job's events numbered from 1 (progress, delta), then its final object as a `job` event; events up to
    `last` (the client's Last-Event-ID) are skipped."""
    n = 0
    # following never cancels the job; an ended one is replayed whenever the client comes
    ticket = Ticket(state.id, max(state.deadline, time.time()) + 60.0, idempotent=True)
    events = service.follow(ticket).__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE)
            if not done:
                yield b": keepalive\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                break
            pending = None
            if J.is_terminal(event):
                break
            n += 1
            if n > last:
                yield _sse(n, event.get("type", "event"), {k: v for k, v in event.items() if k != "type"})
    finally:
        if pending is not None:  # let the cancelled read end before the generator it runs in is closed
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await events.aclose()
    # always (a client that had it already, and reconnects as EventSource does, is told again that it ended)
    try:
        final = job_object(await service.job_state(state.id, caller))
    except JobGone as exc:
        final = job_object(exc.state, gone=str(exc))
    except JobNotFound as exc:
        final = {"id": state.id, "object": "job", "status": "gone", "error": {"code": "gone", "message": str(exc)}}
    yield _sse(n + 1, "job", final)


def _sse(n: int, name: str, data: dict[str, Any]) -> bytes:
    return f"id: {n}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _last_event_id(request: Request) -> int:
    value = request.headers.get("last-event-id", "").strip()
    if not value:
        return 0
    if not value.isdigit() or len(value) > 9:
        raise BadRequest(f"Last-Event-ID must be an event number this server sent, got {value[:40]!r}")
    return int(value)


def _caller(request: Request) -> str:
    return origin_of(request).caller


async def _state(request: Request, job_id: str) -> JobState:
    service: Service = request.app.state.service
    try:
        return await service.job_state(job_id, _caller(request))
    except (JobNotFound, JobGone) as exc:
        raise _not_found(exc) from exc


def _not_found(exc: Exception) -> HTTPError:
    if isinstance(exc, JobGone):
        return HTTPError(410, str(exc), "gone")
    return HTTPError(404, str(exc), "job_not_found")
