"""The OpenAPI document at /openapi.json, told true: what each route really accepts and returns.

FastAPI derives request schemas from the pydantic bodies; this module adds, in one place, what it
cannot see, so routes added later are documented by the same rules:

- error responses: every route lists the statuses it can answer with, all with the
  `{"error": {"code", "message"}}` body (FastAPI's own 422 schema is replaced: ours is not that);
  POST routes 400/413/422/503/504, routes under /v1/ 401 when API keys are on, /ready 503, plus
  `EXTRA_ERRORS` per route (415 where a content type is refused; the job routes' 404/409/410); the async
  routes' 202; no `webhook` field while webhooks are off;
- content types: `text/event-stream` for bodies with `stream`, `text/plain` for /metrics;
- bounds that are settings, not constants: `n`, token counts, image counts, prompt length; and a
  prompt must hold a non-blank character (`NON_BLANK`, the server's own test);
- enums narrowed to what a route accepts (`EXTRA_ENUMS`, e.g. the one image size the model makes);
- the generation parameters the loaded model takes: no `steps` for a VQ model (Janus-Pro), no
  `temperature` / `top_p` for a flow model (JanusFlow), since those are a 400 there;
- /v1/understand's two bodies (JSON and multipart/form-data), the second derived from the first, so
  both carry the same bounds.

It knows routes by path only; it never imports the route modules.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.http.schemas import MAX_PROMPTS, NON_BLANK, UnderstandBody
from server.settings import Settings

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string", "description": "invalid_request, payload_too_large, queue_full, ..."},
        "message": {"type": "string", "description": "What was wrong, naming the field or limit."}}}},
}
MEANINGS = {
    400: "Invalid input (the message names the field): bad JSON, an image that does not decode, a limit.",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`).",
    404: "The `model` named is not the one this server serves.",
    413: "Body, image or prompt larger than the server's limit.",
    415: "A content type this route does not read.",
    422: "The body does not match the schema (wrong type, unknown field, out of range).",
    503: "Queue full, queue unreachable or no worker ready; retry after `Retry-After` seconds.",
    504: "The request's deadline passed before its job finished.",
}
POST_ERRORS = (400, 413, 422, 503, 504)
EXTRA_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/understand"): (415,),
    ("get", "/ready"): (503,),
    ("get", "/v1/jobs"): (401,),  # anonymous callers, even with no keys
    ("get", "/v1/jobs/{job_id}"): (404, 410),
    ("delete", "/v1/jobs/{job_id}"): (404, 410),
    ("get", "/v1/jobs/{job_id}/events"): (400, 404, 410),
    ("get", "/v1/jobs/{job_id}/images/{index}"): (404, 409, 410),
}
JOB_MEANINGS = {
    401: "Missing or wrong API key (`Authorization: Bearer KEY`); on a server without keys, listing jobs still "
         "needs a bearer token of your own (it names whose jobs they are).",
    404: "No such job for this API key (unknown, expired, or another key's).",
    409: "The job has not succeeded (yet): its images come when it has.",
    410: "The job's result was dropped before its TTL (the in-process queue's bounds); the message says why.",
}
OPERATION_IDS = {("get", "/v1/jobs/{job_id}"): "get_job", ("delete", "/v1/jobs/{job_id}"): "cancel_job"}
ASYNC_ROUTES = ("/v1/generate", "/v1/understand", "/v1/images/generations", "/v1/chat/completions")
ACCEPTED = {"description": "With `Prefer: respond-async`: the job object (see GET /v1/jobs/{job_id}).",
            "headers": {"Location": {"schema": {"type": "string"}, "description": "/v1/jobs/{id}"}},
            "content": {"application/json": {"schema": {"type": "object"}}}}
SSE = {"text/event-stream": {"schema": {
    "type": "object", "description": "One server-sent event; `data` is JSON, the last one `[DONE]` (see the README).",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}}}}}


def install_openapi(app: FastAPI, settings: Settings, native_size: Callable[[], str],
                    generator: Callable[[], str | None] = lambda: None) -> None:
    """Replace `app.openapi` with the truthful document (built on first request, again once the model is known)."""
    built_for: list[tuple[str, str | None]] = []

    def openapi() -> dict[str, Any]:
        facts = (native_size(), generator())
        if app.openapi_schema is None or built_for != [facts]:
            with warnings.catch_warnings():  # one function serving GET and DELETE: `describe` names the two apart
                warnings.filterwarnings("ignore", "Duplicate Operation ID", UserWarning)
                doc = get_openapi(title=app.title, version=app.version, description=app.description,
                                  routes=app.routes)
            app.openapi_schema = describe(doc, settings, *facts)
            built_for[:] = [facts]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# Generation fields that mean nothing for a kind of model (a 400 there), so not in its document.
UNUSED_FIELDS = {"vq": ("steps",), "flow": ("temperature", "top_p")}


def describe(doc: dict[str, Any], settings: Settings, native_size: str,
             generator: str | None = None) -> dict[str, Any]:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for body in ("GenerateBody", "ImagesGenerationsBody"):
        for field in UNUSED_FIELDS.get(generator or "", ()):
            schemas.get(body, {}).get("properties", {}).pop(field, None)
    schemas["Error"] = ERROR_SCHEMA
    _add_understand_bodies(doc, settings)
    for body in ("GenerateBody", "ImagesGenerationsBody", "UnderstandBody", "UnderstandForm", "ChatCompletionsBody"):
        if not settings.allowed_webhook_hosts:  # webhooks are off: the field is a 400 whatever it says
            schemas.get(body, {}).get("properties", {}).pop("webhook", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for schema in schemas.values():
        _apply_bounds(schema, settings)
        _flatten_optionals(schema)
    enums = {("ImagesGenerationsBody", "size"): [native_size, "auto", None],
             ("ImagesGenerationsBody", "response_format"): ["b64_json"]}
    for (model, field), values in enums.items():
        if model in schemas and field in schemas[model].get("properties", {}):
            prop = schemas[model]["properties"][field]
            prop.pop("anyOf", None)
            prop.pop("type", None)
            prop["enum"] = values
    _document_openai_refusals(schemas, settings)
    for body, field in (("GenerateBody", "previews"), ("ImagesGenerationsBody", "partial_images")):
        if body in schemas:  # previews are stream events (or an async job's, with Prefer: respond-async)
            schemas[body]["if"] = {"properties": {field: {"type": "integer", "minimum": 1}}, "required": [field]}
            schemas[body]["then"] = {"properties": {"stream": {"const": True}}, "required": ["stream"]}
    content = schemas.get("ChatMessage", {}).get("properties", {}).get("content", {})
    for branch in content.get("anyOf", []):
        if branch.get("type") == "array":  # images per message, as the chat route counts them
            branch.update({"contains": {"type": "object", "required": ["type"],
                                        "properties": {"type": {"const": "image_url"}}},
                           "minContains": 0, "maxContains": settings.max_images})
    for path, methods in doc.get("paths", {}).items():
        for method, operation in methods.items():
            _document_responses(path, method, operation, schemas, settings)
            operation["operationId"] = OPERATION_IDS.get((method, path), operation.get("operationId"))
    if settings.auth_enabled:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


# OpenAI options the server refuses unless they keep their defaults (each is a 400 naming it): the document
# says exactly which values pass.
OPENAI_FIXED: dict[str, dict[str, Any]] = {
    "n": {"type": "integer", "enum": [1], "default": 1},
    "presence_penalty": {"type": ["number", "null"], "enum": [0, None]},
    "frequency_penalty": {"type": ["number", "null"], "enum": [0, None]},
    "logit_bias": {"type": ["object", "null"], "maxProperties": 0},
}
COMPLETIONS_FIXED: dict[str, dict[str, Any]] = {
    "echo": {"type": "boolean", "enum": [False], "default": False},
    "logprobs": {"type": "null"},
    "best_of": {"type": ["integer", "null"], "enum": [1, None]},
    "suffix": {"type": ["string", "null"], "maxLength": 0},
}


def _document_openai_refusals(schemas: dict[str, Any], settings: Settings) -> None:
    for name, fixed in (("ChatCompletionsBody", OPENAI_FIXED), ("CompletionsBody", OPENAI_FIXED | COMPLETIONS_FIXED)):
        props = schemas.get(name, {}).get("properties", {})
        for field, schema in fixed.items():
            if field in props:
                props[field] = {**schema, "description": props[field].get("description", "")}
    prompt = schemas.get("CompletionsBody", {}).get("properties", {}).get("prompt")
    if prompt is not None:  # one prompt: text, token ids, or a list holding one of either
        text = {"type": "string", "minLength": 1, "maxLength": settings.max_prompt_chars, "pattern": NON_BLANK}
        ids = {"type": "array", "minItems": 1, "maxItems": settings.max_prompt_chars,
               "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}
        prompt.clear()
        prompt.update({"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": MAX_PROMPTS}, ids,
                                 {"type": "array", "items": ids, "minItems": 1, "maxItems": MAX_PROMPTS}],
                       "description": "Text or token ids (within the model's vocabulary, no image placeholder), "
                                      f"or a list of up to {MAX_PROMPTS} prompts: one choice each, in order."})


def _apply_bounds(schema: dict[str, Any], settings: Settings) -> None:
    """Settings-dependent bounds on whichever body has these fields (one table for every route)."""
    tokens = settings.max_new_tokens
    bounds: dict[str, dict[str, Any]] = {
        "n": {"maximum": settings.max_n},
        "max_new_tokens": {"maximum": tokens},
        "max_tokens": {"maximum": tokens},
        "max_completion_tokens": {"maximum": tokens},
        "images": {"maxItems": settings.max_images},
        "prompt": {"maxLength": settings.max_prompt_chars, "pattern": NON_BLANK},
    }
    for field, extra in bounds.items():
        prop = schema.get("properties", {}).get(field)
        if prop is None:
            continue
        for branch in prop.get("anyOf", [prop]):  # Optional fields: bound the non-null branch
            if branch.get("type") == "null":
                continue
            if field == "n" and "maximum" in branch:
                extra = {"maximum": min(branch["maximum"], settings.max_n)}
            branch.update(extra)
        if isinstance(prop.get("default"), int) and "maximum" in extra and not isinstance(prop["default"], bool):
            prop["default"] = min(prop["default"], extra["maximum"])  # the server clamps defaults the same way


def _flatten_optionals(schema: dict[str, Any]) -> None:
    """`anyOf: [{type: integer, minimum: 1}, {type: null}]` -> `type: [integer, null], minimum: 1`: the
    same set of values (bounds do not apply to null), in the form fuzzers read without mistakes."""
    for prop in schema.get("properties", {}).values():
        for part in [prop, *prop.get("anyOf", [])]:
            _json_bound_names(part)
        branches = prop.get("anyOf", [])
        if len(branches) != 2 or {"type": "null"} not in branches:
            continue
        [other] = [b for b in branches if b != {"type": "null"}]
        if isinstance(other.get("type"), str) and "$ref" not in other and other["type"] in ("integer", "number",
                                                                                            "string"):
            del prop["anyOf"]
            prop.update({**other, "type": [other["type"], "null"]})


def _json_bound_names(schema: dict[str, Any]) -> None:
    """pydantic leaves the bounds of an Optional annotated type under their Python names."""
    for python, json_name in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"),
                              ("lt", "exclusiveMaximum")):
        if python in schema:
            schema[json_name] = schema.pop(python)


def _add_understand_bodies(doc: dict[str, Any], settings: Settings) -> None:
    operation = doc.get("paths", {}).get("/v1/understand", {}).get("post")
    if operation is None:
        return
    schema = UnderstandBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = doc["components"]["schemas"]
    schemas.update(schema.pop("$defs", {}))
    schemas["UnderstandBody"] = schema
    form = copy.deepcopy(schema)
    form["title"] = "UnderstandForm"
    form["properties"].pop("images", None)
    form["properties"]["image"] = {"type": "array", "minItems": 1, "maxItems": settings.max_images,
                                   "items": {"type": "string", "format": "binary"},
                                   "description": "Image files (PNG, JPEG, WebP, ...), one part each."}
    for prop in form["properties"].values():  # a form field is present or absent, never null
        if isinstance(prop.get("type"), list):
            prop["type"] = [t for t in prop["type"] if t != "null"][0]
        prop["anyOf"] = [b for b in prop.get("anyOf", []) if b.get("type") != "null"] or prop.pop("anyOf", None)
        if prop.get("anyOf") is None:
            prop.pop("anyOf", None)
        if prop.get("default", 0) is None:
            prop.pop("default")
    form["required"] = ["prompt", "image"]
    form.pop("additionalProperties", None)
    form["additionalProperties"] = False
    schemas["UnderstandForm"] = form
    operation["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/UnderstandBody"}},
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/UnderstandForm"}},
    }}


def _has_field(operation: dict[str, Any], schemas: dict[str, Any], field: str) -> bool:
    for media in operation.get("requestBody", {}).get("content", {}).values():
        ref = media.get("schema", {}).get("$ref", "")
        body = schemas.get(ref.rsplit("/", 1)[-1], media.get("schema", {}))
        if field in body.get("properties", {}):
            return True
    return False


def _streams(operation: dict[str, Any], schemas: dict[str, Any]) -> bool:
    return _has_field(operation, schemas, "stream")


def _document_responses(path: str, method: str, operation: dict[str, Any], schemas: dict[str, Any],
                        settings: Settings) -> None:
    responses = operation.setdefault("responses", {})
    statuses = set(EXTRA_ERRORS.get((method, path), ()))
    if method == "post":
        statuses |= set(POST_ERRORS)
        if _has_field(operation, schemas, "model"):
            statuses.add(404)
    if path.startswith("/v1/") and settings.auth_enabled:
        statuses.add(401)
        operation["security"] = [{"bearer": []}]
    if "422" in responses and method != "post":
        statuses.add(422)
    meanings = {**MEANINGS, **JOB_MEANINGS} if path.startswith("/v1/jobs") else MEANINGS
    if method == "post" and path in ASYNC_ROUTES:
        responses["202"] = ACCEPTED
    for status in sorted(statuses):
        entry: dict[str, Any] = {"description": meanings[status],
                                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if status == 503:
            entry["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds"}}
        if status == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        responses[str(status)] = entry
    if "422" in responses and 422 not in statuses:
        responses.pop("422")  # FastAPI's guess for a route that takes no body
    ok = responses.get("200")
    if ok is not None:
        if path == "/metrics":
            ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        elif path == "/v1/jobs/{job_id}/events":
            ok["content"] = SSE
        elif path == "/v1/jobs/{job_id}/images/{index}":
            ok["content"] = {f"image/{fmt}": {"schema": {"type": "string", "format": "binary"}}
                             for fmt in ("png", "jpeg", "webp")}
        elif _streams(operation, schemas):
            ok.setdefault("content", {}).update(SSE)
