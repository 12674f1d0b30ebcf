"""OpenAI-compatible surfaces over the same jobs: /v1/chat/completions and /v1/images/generations.

OpenAI SDK clients work unchanged. Chat answers the last user message (its text and images);
system prompts are replaced by Janus-Pro's own, as the model was trained with it. Images come as
`data:` URLs; a remote http(s) URL is fetched only when its host is in `allowed_image_hosts`.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlparse

import httpx
from fastapi import FastAPI, Request

from server.http_common import (
    HTTPError,
    check_api_key,
    decode_image_payload,
    job_error,
    stream_job,
    wait_for_result,
)
from server.jobs import GenerateParams, UnderstandParams
from server.schemas import ChatCompletionsBody, ImagesGenerationsBody
from server.service import BadRequest, Service
from server.settings import Settings


def add_openai_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionsBody, request: Request):
        check_api_key(request, request.app.state.settings.api_key)
        settings: Settings = request.app.state.settings
        prompt, images = await _last_user_turn(body, settings)
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        params = UnderstandParams(prompt, images, max_tokens, body.temperature, body.top_p, body.seed)
        service: Service = request.app.state.service
        ticket = await service.submit_understand(params, stream=body.stream, require_image=False)
        model = body.model or request.app.state.model_info.name
        created = int(time.time())
        chunk_id = f"chatcmpl-{ticket.job_id}"
        if body.stream:
            from server.app import _sse_response

            first = {"sent": False}

            def render(event: dict[str, Any]) -> list[Any]:
                out = []
                if not first["sent"]:
                    first["sent"] = True
                    out.append(_chunk(chunk_id, created, model, {"role": "assistant", "content": ""}, None))
                if event["type"] == "delta":
                    out.append(_chunk(chunk_id, created, model, {"content": event["text"]}, None))
                elif event["type"] == "result":
                    out.append(_chunk(chunk_id, created, model, {}, event["finish_reason"], _usage(event)))
                return out

            return _sse_response(stream_job(service, ticket, render))
        event = await wait_for_result(service, ticket, request)
        if event["type"] == "error":
            raise job_error(event)
        return {
            "id": chunk_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": event["text"]},
                         "finish_reason": event["finish_reason"], "logprobs": None}],
            "usage": _usage(event),
        }

    @app.post("/v1/images/generations", tags=["openai"])
    async def images_generations(body: ImagesGenerationsBody, request: Request):
        check_api_key(request, request.app.state.settings.api_key)
        info = request.app.state.model_info
        native = f"{info.image_size}x{info.image_size}"
        if body.size not in (None, "auto", native):
            raise HTTPError(400, f"size {body.size!r} is not supported; this model generates {native} images")
        if body.response_format != "b64_json":
            raise HTTPError(400, "response_format 'url' is not supported; use 'b64_json'")
        service: Service = request.app.state.service
        ticket = await service.submit_generate(GenerateParams(body.prompt, body.n, seed=body.seed))
        event = await wait_for_result(service, ticket, request)
        if event["type"] == "error":
            raise job_error(event)
        return {"created": int(time.time()), "data": [{"b64_json": p, "revised_prompt": None}
                                                       for p in event["pngs"]]}


def _usage(event: dict[str, Any]) -> dict[str, int]:
    return {"prompt_tokens": event["prompt_tokens"], "completion_tokens": event["completion_tokens"],
            "total_tokens": event["prompt_tokens"] + event["completion_tokens"]}


def _chunk(chunk_id: str, created: int, model: str, delta: dict, finish: str | None,
           usage: dict | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


async def _last_user_turn(body: ChatCompletionsBody, settings: Settings) -> tuple[str, list[bytes]]:
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise BadRequest("messages must contain a user message")
    content = users[-1].content
    if content is None:
        raise BadRequest("the last user message has no content")
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[bytes] = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"content[{i}].text must be a string")
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise BadRequest(f"content[{i}].image_url.url must be a string")
            images.append(await _fetch_image(url, len(images), settings))
        else:
            raise BadRequest(f"content[{i}] has unsupported type {kind!r}; use 'text' or 'image_url'")
    return " ".join(texts), images


async def _fetch_image(url: str, index: int, settings: Settings) -> bytes:
    if url.startswith("data:"):
        return decode_image_payload(url, index, settings.max_image_bytes, field="image_url")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise BadRequest(f"image_url[{index}] must be a data: URL (or an allowed http(s) URL)")
    if parsed.hostname not in settings.allowed_image_hosts:
        raise BadRequest(f"image_url[{index}]: remote image URLs are refused (host {parsed.hostname!r} is not "
                         "in JANUS_ALLOWED_IMAGE_HOSTS); send a data: URL")
    try:
        async with httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise BadRequest(f"image_url[{index}]: fetching it returned HTTP {response.status_code}")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > settings.max_image_bytes:
                    raise BadRequest(f"image_url[{index}] is larger than {settings.max_image_bytes} bytes", 413)
            return bytes(data)
    except httpx.HTTPError as exc:
        raise BadRequest(f"image_url[{index}] could not be fetched: {exc}") from exc
