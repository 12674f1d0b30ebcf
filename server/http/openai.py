"""OpenAI-compatible surfaces over the same jobs: /v1/chat/completions, /v1/completions (legacy, as vLLM
serves it) and /v1/images/generations.

OpenAI SDK clients work unchanged. Chat renders the whole conversation (system, user and assistant
turns, images in any user turn; see `server.http.messages`); completions take the prompt as given (text or
token ids, no chat format, no images). Both honour vLLM's sampling extensions (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`). `model` must be one of the served names
(`--served-model-name`, default the checkpoint's name), as vLLM does: another is a 404
`model_not_found`. Options that would change the answer and that the model cannot honour are a
400, never silently ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request

from server import jobs as J
from server.http.bodies import chat_completion_body, openai_images_body, usage
from server.http.common import (
    HTTPError,
    abandon_all,
    answer,
    job_error,
    last_to_end,
    origin_of,
    sse_response,
    stream_job,
    stream_jobs,
    wait_for_result,
    wait_for_results,
)
from server.http.jobs import accepted, async_spec
from server.http.messages import read_messages
from server.http.schemas import MAX_PROMPTS, ChatCompletionsBody, CompletionsBody, ImagesGenerationsBody, OpenAIOptions
from server.jobs import GenerateParams, UnderstandParams
from server.service import BadRequest, Service
from server.settings import Settings


def add_openai_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionsBody, request: Request):
        settings, model, stop = _begin(request, body)
        _refuse_chat_options(body)
        messages, images = await read_messages(body.messages, settings)
        for name in ("max_tokens", "max_completion_tokens"):  # both are checked, whichever is used
            _check_max_tokens(settings, name, getattr(body, name))
        max_tokens = body.max_completion_tokens or body.max_tokens or min(256, settings.max_new_tokens)
        params = UnderstandParams("", images, max_tokens, body.temperature, body.top_p, body.seed,
                                  messages=messages, stop=stop, **body.extensions())
        service: Service = request.app.state.service
        spec = await async_spec(request, "chat.completions", body, {"model": model})
        ticket = await service.submit_understand(params, origin_of(request), stream=body.stream, require_image=False,
                                                 spec=spec)
        if spec is not None:
            return await accepted(request, ticket)
        created = int(time.time())
        chunk_id = f"chatcmpl-{ticket.job_id}"
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            first = {"sent": False}

            def render(event: dict[str, Any]) -> list[Any]:
                out = []
                if not first["sent"]:
                    first["sent"] = True
                    out.append(_chunk(chunk_id, created, model, {"role": "assistant", "content": ""}, None))
                if event["type"] == "delta":
                    out.append(_chunk(chunk_id, created, model, {"content": event["text"]}, None))
                elif event["type"] == "result":
                    out.append({**_chunk(chunk_id, created, model, {}, event["finish_reason"]),
                                "timings": event.get("timings")})
                    if include_usage:  # OpenAI's shape: one more chunk, no choices, the usage
                        out.append({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "choices": [], "usage": usage(event)})
                return out

            return sse_response(stream_job(service, ticket, render), ticket)
        event = await wait_for_result(service, ticket, request)
        if event["type"] == "error":
            raise job_error(event)
        return answer(request, chat_completion_body(ticket.job_id, event, model, created), event)

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionsBody, request: Request):
        settings, model, stop = _begin(request, body)
        _refuse_completion_options(body)
        prompts = _prompts(body.prompt)
        _check_max_tokens(settings, "max_tokens", body.max_tokens)
        origin = origin_of(request)
        if len(prompts) > 1 and origin.idempotency_key is not None:
            raise BadRequest("an Idempotency-Key covers one prompt; send several prompts as several requests")
        service: Service = request.app.state.service
        max_tokens = body.max_tokens or min(16, settings.max_new_tokens)
        tickets = []
        try:
            for text, ids in prompts:  # one job per prompt: the engine batches them with everything else
                params = UnderstandParams(text or "", [], max_tokens, body.temperature, body.top_p,
                                          body.seed, stop=stop, raw=True, prompt_ids=ids, **body.extensions())
                tickets.append(await service.submit_understand(params, origin, stream=body.stream,
                                                               require_image=False))
        except BaseException:  # all or nothing: a refused prompt (or a full queue) stops the others
            await abandon_all(service, tickets)
            raise
        created = int(time.time())
        completion_id = f"cmpl-{tickets[0].job_id}"

        def choice(i: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

        def body_of(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                    "choices": choices, **extra}

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            results: list[dict[str, Any]] = []

            def render(i: int, event: dict[str, Any]) -> list[Any]:
                if event["type"] == "delta":
                    return [body_of([choice(i, event["text"], None)])]
                if event["type"] != "result":
                    return []
                results.append(event)
                return [body_of([choice(i, "", event["finish_reason"])], timings=event.get("timings"))]

            def finish() -> list[Any]:  # OpenAI's shape: one more chunk, no choices, the usage of them all
                return [body_of([], usage=usage(*results))] if include_usage else []

            return sse_response(stream_jobs(service, tickets, render, finish), tickets)
        events = await wait_for_results(service, tickets, request)
        return answer(request, body_of([choice(i, e["text"], e["finish_reason"]) for i, e in enumerate(events)],
                                       usage=usage(*events)), last_to_end(events))

    @app.post("/v1/images/generations", tags=["openai"])
    async def images_generations(body: ImagesGenerationsBody, request: Request):
        check_model(request, body.model)
        info = request.app.state.model_info
        native = f"{info.image_size}x{info.image_size}"
        if body.size not in (None, "auto", native):
            raise HTTPError(400, f"size {body.size!r} is not supported; this model generates {native} images")
        if body.response_format != "b64_json":
            raise HTTPError(400, "response_format 'url' is not supported; use 'b64_json'")
        if None not in (body.guidance_scale, body.cfg_weight) and body.guidance_scale != body.cfg_weight:
            raise BadRequest(f"guidance_scale ({body.guidance_scale}) and cfg_weight ({body.cfg_weight}) are two "
                             "names for the same setting; send one")
        params = GenerateParams(body.prompt, body.n, seed=body.seed)
        weight = body.guidance_scale if body.guidance_scale is not None else body.cfg_weight
        if weight is not None:
            params.cfg_weight = weight
        if body.temperature is not None:
            params.temperature = body.temperature
        params.steps = body.steps
        params.output_format, params.output_compression = body.output_format, body.output_compression
        params.previews = body.partial_images or 0
        service: Service = request.app.state.service
        spec = await async_spec(request, "images.generations", body, {"size": native})
        if params.previews and not body.stream and spec is None:
            raise BadRequest("partial_images are sent as stream events: set stream: true (or send the request with "
                             "Prefer: respond-async and follow GET /v1/jobs/{id}/events)")
        # stream events only with partial images: the completed events need just the result
        ticket = await service.submit_generate(params, origin_of(request), stream=bool(body.stream and params.previews),
                                               spec=spec)
        if spec is not None:
            return await accepted(request, ticket)
        if body.stream:
            return sse_response(stream_job(service, ticket, image_events(body, native)), ticket)
        event = await wait_for_result(service, ticket, request)
        if event["type"] == "error":
            raise job_error(event)
        return answer(request, openai_images_body(event, native, int(time.time())), event)


QUALITIES = ("low", "medium", "high", "auto")


def image_events(body: ImagesGenerationsBody, size: str) -> Callable[[dict[str, Any]], list[Any]]:
    """OpenAI's image stream: `image_generation.partial_image` for each preview (numbered per image from 0; with n
    > 1 an extra `index` names the image), then `image_generation.completed` for each image, with its usage (the
    prompt's tokens counted with the first image)."""
    partials: dict[int, int] = {}
    shared = {"size": size, "quality": body.quality if body.quality in QUALITIES else "auto", "background": "opaque",
              "output_format": body.output_format}
    many = body.n > 1

    def render(event: dict[str, Any]) -> list[Any]:
        if event["type"] == "preview":
            i = event["image"]
            partials[i] = partials.get(i, -1) + 1
            return [{"type": "image_generation.partial_image", "b64_json": event["preview"],
                     "created_at": int(time.time()), "partial_image_index": partials[i], **shared,
                     **({"index": i} if many else {})}]
        if event["type"] != "result":
            return []
        prompt, per_image = event.get("prompt_tokens", 0), event.get("image_tokens", 0)

        def usage(i: int) -> dict[str, Any]:  # the prompt counts once, with the first image: the sum is the request's
            inputs = prompt if i == 0 else 0
            return {"input_tokens": inputs, "input_tokens_details": {"image_tokens": 0, "text_tokens": inputs},
                    "output_tokens": per_image, "total_tokens": inputs + per_image}

        return [{"type": "image_generation.completed", "b64_json": b64, "created_at": int(time.time()), **shared,
                 "usage": usage(i), "timings": event.get("timings"), **({"index": i} if many else {})}
                for i, b64 in enumerate(J.result_b64(event))]

    return render


def check_model(request: Request, name: str | None) -> str:
    """The model name to answer with; a name we do not serve is a 404 that lists the served ones."""
    info = request.app.state.model_info
    served: list[str] = info.names
    if name is None or name in info.accepted:
        return name or served[0]
    raise HTTPError(404, f"the model {name!r} does not exist; this server serves {', '.join(map(repr, served))}",
                    "model_not_found")


def _begin(request: Request, body: OpenAIOptions) -> tuple[Settings, str, list[str]]:
    """What both text routes check first (the API key was checked before the body was read): the model (the
    name to answer with), the options they share (the stop strings)."""
    return request.app.state.settings, check_model(request, body.model), _common_options(body)


def _common_options(body: OpenAIOptions) -> list[str]:
    """400 for shared options that would change the answer and that we cannot honour; returns the stop strings."""
    refused = body.unsupported()
    if refused:
        raise BadRequest("; ".join(refused))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or not all(stop):
        raise BadRequest(f"stop takes at most 4 non-empty strings, got {len(stop)}")
    return stop


def _check_max_tokens(settings: Settings, name: str, given: int | None) -> None:
    if given is not None and given > settings.max_new_tokens:
        raise BadRequest(f"{name} must be at most {settings.max_new_tokens}, got {given}")


def _prompts(prompt: str | list) -> list[tuple[str | None, list[int] | None]]:
    """A completion's prompts, each as text or token ids: a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if not prompt:
        raise BadRequest("prompt is an empty list")
    if isinstance(prompt[0], int):
        return [(None, list(prompt))]
    if len(prompt) > MAX_PROMPTS:
        raise BadRequest(f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} in one request")
    return [(p, None) if isinstance(p, str) else (None, list(p)) for p in prompt]


def _refuse_completion_options(body: CompletionsBody) -> None:
    if body.echo:
        raise BadRequest("echo is not supported by this server")
    if body.logprobs is not None:
        raise BadRequest("logprobs are not supported by this server")
    if body.best_of not in (None, 1):
        raise BadRequest(f"best_of={body.best_of} is not supported (only 1)")
    if body.suffix:
        raise BadRequest("suffix (insertion) is not supported by this model")


def _refuse_chat_options(body: ChatCompletionsBody) -> None:
    if body.logprobs or body.top_logprobs:
        raise BadRequest("logprobs are not supported by this server")
    if body.tools:
        raise BadRequest("tools (function calling) are not supported by this model")
    if body.tool_choice not in (None, "none"):
        raise BadRequest("tool_choice is not supported by this model (only 'none')")
    if body.response_format is not None and body.response_format.type != "text":
        raise BadRequest(f"response_format {body.response_format.type!r} is not supported; only 'text'")


def _chunk(chunk_id: str, created: int, model: str, delta: dict, finish: str | None) -> dict[str, Any]:
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
