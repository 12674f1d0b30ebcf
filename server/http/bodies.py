"""The JSON body each inference route answers with, built from a job's result event.

The synchronous routes and the async job resource (`result` of `GET /v1/jobs/{id}`) both build their bodies
here, so an async job's result is exactly what the same request would have returned synchronously. `render`
is what a body needs besides the result (the model name, the image size), fixed when the job was submitted.
Every body carries `timings` (ms): the job's phases as its worker measured them; a synchronous answer's
`total` is then the frontend's, from the request's arrival to its answer (`server.http.common.answer`).
"""

from __future__ import annotations

from typing import Any

from server import jobs as J

SURFACES = ("generate", "understand", "images.generations", "chat.completions")


def result_body(surface: str, job_id: str, event: dict[str, Any], render: dict[str, Any],
                created: int) -> dict[str, Any]:
    if surface == "generate":
        return images_body(job_id, event)
    if surface == "understand":
        return understand_body(job_id, event)
    if surface == "images.generations":
        return openai_images_body(event, render.get("size", ""), created)
    if surface == "chat.completions":
        return chat_completion_body(job_id, event, render.get("model", ""), created)
    raise ValueError(f"unknown surface {surface!r}")


def understand_body(job_id: str, event: dict[str, Any]) -> dict[str, Any]:
    return {"id": job_id, "text": event["text"], "finish_reason": event["finish_reason"],
            "usage": {"prompt_tokens": event["prompt_tokens"], "completion_tokens": event["completion_tokens"]},
            "timings": timings(event)}


def images_body(job_id: str, event: dict[str, Any]) -> dict[str, Any]:
    """A generation's images in JSON: `b64_png` per image (`b64_jpeg` / `b64_webp` for other output formats)."""
    fmt = event.get("format", "png")
    return {"id": job_id, "seed": event["seed"], "output_format": fmt,
            "images": [{f"b64_{fmt}": p} for p in J.result_b64(event)], "timings": timings(event)}


def openai_images_body(event: dict[str, Any], size: str, created: int) -> dict[str, Any]:
    return {"created": created, "data": [{"b64_json": p, "revised_prompt": None} for p in J.result_b64(event)],
            "output_format": event.get("format", "png"), "size": size, "timings": timings(event)}


def chat_completion_body(job_id: str, event: dict[str, Any], model: str, created: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{job_id}", "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": event["text"]},
                     "finish_reason": event["finish_reason"], "logprobs": None}],
        "usage": usage(event), "timings": timings(event),
    }


def timings(event: dict[str, Any]) -> dict[str, float] | None:
    """Where the job's time went, in ms (`server.jobs.PHASES`); None from a worker older than timings."""
    return event.get("timings")


def usage(*events: dict[str, Any]) -> dict[str, int]:
    """Token counts of one or more results, summed."""
    prompt = sum(e["prompt_tokens"] for e in events)
    completion = sum(e["completion_tokens"] for e in events)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
