"""The REST frontend (FastAPI): validate, submit to the job queue, await or stream the result.

Routes: /v1/understand, /v1/generate, the OpenAI-compatible /v1/chat/completions and
/v1/images/generations (in `server.http.openai`), /v1/models, /health, /ready, /metrics, and the
browser playground at / (in `server.http.playground`). The app never touches the model: it only talks to
a `Service` (and through it, the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import jobs as J
from server import tracing
from server.http.bodies import images_body, understand_body
from server.http.common import (
    HTTPError,
    answer,
    answer_timings,
    decode_image_payload,
    error_body,
    error_response,
    job_error,
    origin_of,
    sse_response,
    stream_job,
    timing_header,
    wait_for_result,
)
from server.http.edge import KeyGuard, rate_limited_response
from server.http.jobs import accepted, add_job_routes, async_spec
from server.http.messages import read_messages
from server.http.openai import add_openai_routes
from server.http.openapi import install_openapi
from server.http.schemas import GenerateBody, UnderstandBody, form_int
from server.jobs import GenerateParams, UnderstandParams
from server.keys import RateLimited
from server.logs import log_access, printable, request_id_var
from server.metrics import Metrics
from server.queue import QueueFull, QueueMisconfigured, QueueUnavailable
from server.service import BadRequest, Service, ServiceUnavailable
from server.settings import Settings

log = logging.getLogger(__name__)

OPENAI_BODY_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/images/generations"})


@dataclass
class ModelInfo:
    """What the API tells clients about the model; filled in once a model is known."""

    name: str = "janus-pro"
    image_size: int = 384
    num_image_tokens: int = 576
    created: int = field(default_factory=lambda: int(time.time()))
    served_names: list[str] = field(default_factory=list)  # --served-model-name; empty: just `name`
    generator: str | None = None  # "vq" (Janus-Pro) or "flow" (JanusFlow) once known; None in an API-only process
    aliases: list[str] = field(default_factory=list)  # also accepted as `model`, not listed

    @property
    def names(self) -> list[str]:
        """What /v1/models lists (the first answers requests that name no model)."""
        return self.served_names or [self.name]

    @property
    def accepted(self) -> list[str]:
        """What `model` may say in OpenAI requests."""
        return self.names + [a for a in self.aliases if a not in self.names]


def create_app(settings: Settings, service: Service, metrics: Metrics, model_info: ModelInfo | None = None) -> FastAPI:
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, which an air-gapped cluster cannot reach
    # and a key-protected server should not ask its users' browsers to trust. /openapi.json is the contract.
    app = FastAPI(title="janus-server", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Inference server for DeepSeek Janus-Pro: image understanding and generation.",
                  telemetry=tracing.fastapi_telemetry())  # HTTP server spans with --otlp-traces-endpoint, else none
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.state.model_info = model_info or ModelInfo()
    # the key is checked inside the request context (its refusals are logged and counted) and before any body
    app.add_middleware(KeyGuard, settings=settings, keys=service.keys, quotas=service.quotas, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(RequestContextMiddleware, max_body=settings.max_body_bytes, metrics=metrics,
                       access_log=settings.access_log)
    _install_error_handlers(app)
    _add_operational_routes(app)
    _add_native_routes(app)
    add_openai_routes(app)
    add_job_routes(app)
    if settings.playground:
        from server.http.playground import add_playground_routes

        add_playground_routes(app)
    info = app.state.model_info
    install_openapi(app, settings, lambda: f"{info.image_size}x{info.image_size}", lambda: info.generator)
    return app


# --- middleware: request id, body-size limit, metrics ----------------------------------------------


class _BodyTooLarge(Exception):
    pass


QUIET_PATHS = frozenset({"/health", "/ready", "/metrics", "/favicon.ico"})  # probes and scrapes, when they succeed
ERROR_PREVIEW = 2048  # bytes of an error body read for the access log's `error`


class RequestContextMiddleware:
    """Pure ASGI: sets X-Request-Id, refuses bodies over the limit with 413, counts requests, and writes one
    access log line per request (method, path, status, duration, request id, client; an error's message), so an
    operator sees why a client was refused. Successful probes, scrapes and playground assets are not logged."""

    def __init__(self, app, max_body: int, metrics: Metrics, access_log: bool = True) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        if len(request_id) > 128 or not request_id.isprintable():
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        scope["state"]["arrived"] = time.time()  # the start of a synchronous answer's `total` timing
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status_holder = {"status": 500}

        error_body = bytearray()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            elif (message["type"] == "http.response.body" and status_holder["status"] >= 400
                  and len(error_body) < ERROR_PREVIEW):
                error_body.extend(message.get("body", b"")[:ERROR_PREVIEW - len(error_body)])
            await send(message)

        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            response = error_response(413, f"request body is {length} bytes; the limit is {self.max_body}")
            await response(scope, receive, send_with_id)
            self._count(scope, 413, started)
            self._log(scope, headers, 413, started, response.body)
            request_id_var.reset(token)
            return None
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            response = error_response(413, f"request body exceeds the limit of {self.max_body} bytes")
            await response(scope, receive, send_with_id)
        finally:
            self._log(scope, headers, status_holder["status"], started, bytes(error_body))
            request_id_var.reset(token)
        self._count(scope, status_holder["status"], started)
        return None

    def _log(self, scope, headers: dict[str, str], status: int, started: float, body: bytes) -> None:
        path = scope.get("path", "")
        if not self.access_log or (status < 400 and (path in QUIET_PATHS or path.startswith("/static/"))):
            return
        client = scope.get("client")
        log_access(scope.get("method", ""), path, status, time.perf_counter() - started,
                   _error_message(body) if status >= 400 else None, client=client[0] if client else None,
                   user_agent=printable(headers.get("user-agent", ""), 120),
                   **({"key": scope["state"]["key_name"]} if scope.get("state", {}).get("key_name") else {}))

    def _count(self, scope, status: int, started: float) -> None:
        endpoint = _endpoint_label(scope)
        if endpoint is not None:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - started)


UNMATCHED = "unmatched"  # the one label every path that names no route shares


def _endpoint_label(scope) -> str | None:
    """The `endpoint` label of a /v1/ request: its route's path (from a fixed set), or `unmatched` (404s, and
    whatever a client makes up, must not each become a label); None for other paths (not counted)."""
    path = scope.get("path", "")
    if not path.startswith("/v1/"):
        return None
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    app = scope.get("app")
    known = getattr(getattr(app, "state", None), "route_paths", None)
    if known is None and app is not None:
        known = app.state.route_paths = frozenset(getattr(r, "path", "") for r in app.routes)
    return path if known and path in known else UNMATCHED


def _error_message(body: bytes) -> str | None:
    """The message of one of our error bodies (`{"error": {"message": ...}}`), from its first bytes."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return None


# --- errors ------------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, exc: HTTPError):
        return error_response(exc.status, str(exc), exc.code, exc.headers)

    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, exc: BadRequest):
        return error_response(exc.status, str(exc))

    @app.exception_handler(RateLimited)
    async def _rate_limited(request: Request, exc: RateLimited):
        request.app.state.metrics.rate_limited.labels(exc.key).inc()
        return rate_limited_response(exc)

    @app.exception_handler(QueueFull)
    async def _full(_: Request, exc: QueueFull):
        return error_response(503, str(exc), "queue_full", {"Retry-After": str(max(int(exc.retry_after), 1))})

    @app.exception_handler(QueueUnavailable)
    async def _down(_: Request, exc: QueueUnavailable):
        retry = str(max(int(exc.retry_after), 1))
        return error_response(503, f"the job queue is unavailable: {exc}", "unavailable", {"Retry-After": retry})

    @app.exception_handler(QueueMisconfigured)
    async def _refused(_: Request, exc: QueueMisconfigured):  # e.g. the Redis password changed under us
        return error_response(503, f"the job queue refused this server: {exc}", "unavailable", {"Retry-After": "5"})

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(_: Request, exc: ServiceUnavailable):
        return error_response(503, str(exc), "unavailable", {"Retry-After": str(int(exc.retry_after))})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # OpenAI answers every malformed request with a 400 (the SDK's BadRequestError); ours say 422.
        status = 400 if request.url.path in OPENAI_BODY_ROUTES else 422
        return error_response(status, _describe_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)  # e.g. 405's Allow

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__})")


def _describe_validation(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


# --- operational routes ------------------------------------------------------------------------------


def _add_operational_routes(app: FastAPI) -> None:
    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready(request: Request):
        state = await request.app.state.service.ready_state()
        if state.ready:
            return state.body()
        return JSONResponse({**error_body("not_ready", state.reason), **state.body()}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/metrics", tags=["ops"])
    async def metrics(request: Request) -> Response:
        m: Metrics = request.app.state.metrics
        queue = request.app.state.service.queue
        m.observe_queue(queue.counters())
        with contextlib.suppress(Exception):  # the scrape must still answer when the queue is down
            m.queue_depth.set(await queue.depth())
        return Response(m.render(), media_type=m.content_type)

    @app.get("/v1/models", tags=["openai"])
    async def models(request: Request):
        info: ModelInfo = request.app.state.model_info
        return {"object": "list", "data": [{"id": name, "object": "model", "created": info.created,
                                            "owned_by": "janus-server", "generator": info.generator}
                                           for name in info.names]}


# --- native routes -------------------------------------------------------------------------------------


def _add_native_routes(app: FastAPI) -> None:
    # Its two request bodies (JSON, multipart) are documented by server.http.openapi.
    @app.post("/v1/understand", tags=["janus"])
    async def understand(request: Request):
        settings: Settings = request.app.state.settings
        body, images = await _read_understand(request, settings)
        messages = None
        if body.messages is not None:
            messages, images = await read_messages(body.messages, settings)
        max_new_tokens = body.max_new_tokens if "max_new_tokens" in body.model_fields_set else min(
            body.max_new_tokens, settings.max_new_tokens)  # the default, within this server's limit
        params = UnderstandParams(body.prompt or "", images, max_new_tokens, body.temperature, body.top_p,
                                  body.seed, messages=messages, **body.extensions())
        service: Service = request.app.state.service
        spec = await async_spec(request, "understand", body)
        ticket = await service.submit_understand(params, origin_of(request), stream=body.stream,
                                                 require_image=messages is None, spec=spec)
        if spec is not None:
            return await accepted(request, ticket)
        if body.stream:
            return sse_response(stream_job(service, ticket, _understand_sse), ticket)
        event = await wait_for_result(service, ticket, request)
        if event["type"] == "error":
            raise job_error(event)
        return answer(request, understand_body(ticket.job_id, event), event)

    @app.post("/v1/generate", tags=["janus"], responses={200: {"content": {"image/png": {}}}})
    async def generate(body: GenerateBody, request: Request):
        service: Service = request.app.state.service
        params = GenerateParams(body.prompt, body.n, body.cfg_weight, body.temperature, body.top_p, body.seed,
                                body.steps, body.output_format, body.output_compression, body.previews)
        spec = await async_spec(request, "generate", body)
        ticket = await service.submit_generate(params, origin_of(request), stream=body.stream, spec=spec)
        if spec is not None:
            return await accepted(request, ticket)
        if body.stream:
            return sse_response(stream_job(service, ticket, lambda e: _generate_sse(e, ticket.job_id)), ticket)
        event = await wait_for_result(service, ticket, request)
        if event["type"] == "error":
            raise job_error(event)
        media_type = f"image/{event.get('format', 'png')}"
        if body.n == 1 and media_type in request.headers.get("accept", ""):
            headers = {"X-Seed": str(event["seed"]), "X-Job-Id": ticket.job_id,
                       **timing_header(answer_timings(request, event))}
            return Response(J.result_images(event)[0], media_type=media_type, headers=headers)
        return answer(request, images_body(ticket.job_id, event), event)


async def _read_understand(request: Request, settings: Settings) -> tuple[UnderstandBody, list[bytes]]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _read_multipart(request, settings)
    if not content_type.startswith("application/json"):
        raise HTTPError(415, f"unsupported content type {content_type or '(none)'!r}; "
                             "send application/json or multipart/form-data")
    try:
        raw = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise HTTPError(400, "request body nests too deeply") from exc
    body = _validate(UnderstandBody, raw)
    # base64 of several MB takes milliseconds: keep it off the event loop
    images = await asyncio.to_thread(
        lambda: [decode_image_payload(s, i, settings.max_image_bytes) for i, s in enumerate(body.images or [])])
    return body, images


async def _read_multipart(request: Request, settings: Settings) -> tuple[UnderstandBody, list[bytes]]:
    try:
        form = await request.form(max_files=settings.max_images + 1, max_fields=16,
                                  max_part_size=settings.max_image_bytes)
    except Exception as exc:
        raise HTTPError(400, f"cannot parse the multipart form: {exc}") from exc
    images: list[bytes] = []
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key == "image" and isinstance(value, UploadFile):
            images.append(await value.read())
        elif isinstance(value, str):
            fields[key] = value
        else:
            raise HTTPError(400, f"unexpected file field {key!r}; upload images in fields named 'image'")
    if not images:
        raise HTTPError(400, "multipart request has no 'image' file")
    raw: dict[str, Any] = {"prompt": fields.pop("prompt", ""), "images": ["-"] * len(images)}
    if "webhook" in fields:
        raw["webhook"] = fields.pop("webhook")
    for key, cast in (("max_new_tokens", form_int), ("temperature", float), ("top_p", float), ("seed", form_int),
                      ("top_k", form_int), ("min_p", float), ("repetition_penalty", float), ("min_tokens", form_int)):
        if key in fields:
            try:
                raw[key] = cast(fields.pop(key))
            except ValueError as exc:
                raise HTTPError(422, f"{key}: not a valid {'integer' if cast is form_int else 'number'}") from exc
    for key in ("stream", "ignore_eos"):
        if key in fields:
            flag = fields.pop(key).strip().lower()
            if flag not in ("true", "false"):
                raise HTTPError(422, f"{key}: must be true or false")
            raw[key] = flag == "true"
    if fields:
        raise HTTPError(422, f"unknown form field(s): {', '.join(sorted(fields))}")
    return _validate(UnderstandBody, raw), images


def inline_schema(model) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` written in place, so it can sit inside an OpenAPI document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            # a discriminator's mapping names $defs entries; the oneOf alone says the same
            return {k: resolve(v) for k, v in node.items() if k != "discriminator"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def _validate(model, raw: Any):
    from pydantic import ValidationError

    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise HTTPError(422, _describe_validation(exc.errors())) from exc


def _understand_sse(event: dict[str, Any]) -> list[Any]:
    if event["type"] == "delta":
        return [{"delta": event["text"]}]
    if event["type"] == "result":
        return [{"finish_reason": event["finish_reason"], "text": event["text"],
                 "usage": {"prompt_tokens": event["prompt_tokens"],
                           "completion_tokens": event["completion_tokens"]}, "timings": event.get("timings")}]
    return []


def _generate_sse(event: dict[str, Any], job_id: str) -> list[Any]:
    if event["type"] == "progress":
        return [{"step": event["step"], "total": event["total"]}]
    if event["type"] == "preview":
        return [{k: event[k] for k in ("step", "total", "image", "preview")}]
    if event["type"] == "result":
        return [images_body(job_id, event)]
    return []
