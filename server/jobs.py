"""Jobs and job events: what frontends submit and what workers send back, as plain JSON-able data.

A job is one client request. Events flow worker -> frontend: zero or more `delta` (understanding
text), `progress` (generation steps) or `preview` (an image as it forms) events, then exactly one terminal
event, `result` or `error`.
The same shapes travel through the in-process queue and through Redis.
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from janus_core import InvalidRequestError, Message, check_conversation

JobKind = Literal["understand", "generate"]

# Error codes carried by `error` events; frontends map them to HTTP / gRPC statuses.
INVALID_ARGUMENT = "invalid_argument"
DEADLINE_EXCEEDED = "deadline_exceeded"
CANCELLED = "cancelled"
UNAVAILABLE = "unavailable"
RESOURCE_EXHAUSTED = "resource_exhausted"
INTERNAL = "internal"


MAX_PREVIEWS = 8  # previews a generation job may ask for


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass
class UnderstandParams:
    prompt: str
    images: list[bytes] = field(default_factory=list)  # encoded image files (PNG, JPEG, ...)
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # A whole conversation instead of `prompt`: [{"role", "text", "images": count}], its images in
    # `images` in order.
    messages: list[dict[str, Any]] | None = None
    stop: list[str] = field(default_factory=list)  # strings that end the answer (not returned)
    # vLLM's sampling extensions (janus_core.SamplingParams): 0 / 1.0 / False are off
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    # A plain completion (/v1/completions): `prompt` (or `prompt_ids`) is the whole prompt, no chat format
    raw: bool = False
    prompt_ids: list[int] | None = None

    def sampling(self) -> dict[str, Any]:
        """The keyword arguments of janus_core's SamplingParams."""
        return dict(temperature=self.temperature, top_p=self.top_p, seed=self.seed, top_k=self.top_k,
                    min_p=self.min_p, repetition_penalty=self.repetition_penalty, min_tokens=self.min_tokens,
                    ignore_eos=self.ignore_eos)


@dataclass
class GenerateParams:
    """None: not given, the model's default (cfg_weight 5.0 for Janus-Pro, 2.0 for JanusFlow; temperature 1.0;
    top_p 1.0; steps 30). A model refuses what means nothing to it: `steps` (VQ models), temperature and top_p
    (flow models)."""

    prompt: str
    n: int = 1
    cfg_weight: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    steps: int | None = None
    output_format: str = "png"  # png | jpeg | webp: how the worker encodes the images
    output_compression: int | None = None  # jpeg / webp quality, 0-100 (None: the encoder's default)
    previews: int = 0  # preview events while the images form (streamed and async jobs)


@dataclass
class Job:
    kind: JobKind
    params: UnderstandParams | GenerateParams
    id: str = field(default_factory=new_job_id)
    deadline: float = field(default_factory=lambda: time.time() + 300.0)  # absolute, epoch seconds
    stream: bool = False
    created: float = field(default_factory=time.time)
    # server.idempotency: the caller-scoped hash of the client's Idempotency-Key, and what the request asked
    # for; a retry with the same key and fingerprint is answered by this job
    idempotency_key: str | None = None
    fingerprint: str | None = None
    owner: str | None = None  # who sent it (an API key's name, or server.idempotency.caller_of), never the key
    weight: float = 1.0  # the owner's share of dispatch (server.queue.fair)
    request_id: str | None = None  # the client's X-Request-Id (or gRPC call), for logs across processes
    traceparent: str | None = None  # W3C trace context: the worker's spans join the request's trace (server.tracing)
    # Async jobs (Prefer: respond-async) have a job record: `surface` is the route whose body the result
    # takes ("generate", "understand", "images.generations", "chat.completions"), `render` what that body
    # needs besides the result (e.g. the model name), `webhook` where the job object goes when it ends.
    surface: str | None = None
    render: dict[str, Any] = field(default_factory=dict)
    webhook: str | None = None
    ttl: float | None = None  # seconds its result is kept once it ends (None: the queue's default)

    @property
    def is_async(self) -> bool:
        return self.surface is not None

    def expired(self, now: float | None = None) -> bool:
        return (now or time.time()) >= self.deadline

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(self.params, GenerateParams) and not self.params.previews:
            del data["params"]["previews"]  # as workers from before previews expect it
        if isinstance(self.params, UnderstandParams):
            data["params"]["images"] = [base64.b64encode(b).decode("ascii") for b in self.params.images]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        raw = dict(data["params"])
        if data["kind"] == "understand":
            raw["images"] = [base64.b64decode(s) for s in raw.get("images", [])]
            params: UnderstandParams | GenerateParams = UnderstandParams(**raw)
        elif data["kind"] == "generate":
            params = GenerateParams(**raw)
        else:
            raise ValueError(f"unknown job kind {data['kind']!r}")
        return cls(kind=data["kind"], params=params, id=data["id"], deadline=float(data["deadline"]),
                   stream=bool(data.get("stream", False)), created=float(data.get("created", time.time())),
                   idempotency_key=data.get("idempotency_key"), fingerprint=data.get("fingerprint"),
                   owner=data.get("owner"), request_id=data.get("request_id"), traceparent=data.get("traceparent"),
                   weight=float(data.get("weight", 1.0)), surface=data.get("surface"),
                   render=dict(data.get("render") or {}), webhook=data.get("webhook"),
                   ttl=None if data.get("ttl") is None else float(data["ttl"]))


@dataclass
class JobState:
    """What a queue knows of an async job: its record, where it is now, and its terminal event once it ended.
    `gone` is set (with the reason) when the queue had to drop the result before its time."""

    id: str
    owner: str
    surface: str
    created: float
    deadline: float
    render: dict[str, Any] = field(default_factory=dict)
    webhook: str | None = None
    started: float | None = None
    finished: float | None = None
    progress: dict[str, int] | None = None  # the last {"step", "total"}
    position: int | None = None  # while queued: jobs waiting ahead of it
    terminal: dict[str, Any] | None = None  # the result or error event (None while it runs, or not fetched)
    status: str | None = None  # set by a queue that knows it without the terminal event
    gone: str | None = None

    @classmethod
    def of(cls, job: Job) -> JobState:
        assert job.surface is not None
        return cls(job.id, job.owner or "", job.surface, job.created, job.deadline, dict(job.render), job.webhook)

    def meta(self) -> dict[str, Any]:
        """The fixed part, as stored."""
        return {"id": self.id, "owner": self.owner, "surface": self.surface, "created": self.created,
                "deadline": self.deadline, "render": self.render, "webhook": self.webhook}

    @property
    def state(self) -> str:
        """queued | running | succeeded | failed | cancelled"""
        if self.terminal is not None:
            return terminal_status(self.terminal)
        if self.status is not None:
            return self.status
        return "running" if self.started is not None else "queued"


def terminal_status(event: dict[str, Any]) -> str:
    if event.get("type") == "result":
        return "succeeded"
    return "cancelled" if event.get("code") == CANCELLED else "failed"


# --- events (plain dicts so they serialise unchanged through Redis) --------------------------------


def delta_event(text: str) -> dict[str, Any]:
    return {"type": "delta", "text": text}


def progress_event(step: int, total: int) -> dict[str, Any]:
    return {"type": "progress", "step": step, "total": total}


def preview_event(step: int, total: int, image: int, encoded: bytes) -> dict[str, Any]:
    """Image `image` of the job after `step` of `total` steps, encoded as its result will be (base64)."""
    return {"type": "preview", "step": step, "total": total, "image": image,
            "preview": base64.b64encode(encoded).decode("ascii")}


def understand_result(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"type": "result", "kind": "understand", "text": text, "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


def generate_result(seed: int, images: list[bytes], output_format: str = "png", prompt_tokens: int = 0,
                    image_tokens: int = 0) -> dict[str, Any]:
    return {"type": "result", "kind": "generate", "seed": seed, "format": output_format,
            "images": [base64.b64encode(p).decode("ascii") for p in images], "prompt_tokens": prompt_tokens,
            "image_tokens": image_tokens}


# A job's phases, from the stamps (epoch seconds) its worker keeps: "created" (the frontend accepted it), "claimed"
# (a worker took it), the engine's "prefill", "first", "finished" and "done" (janus_core.FinishedOutput), "decoded"
# (an image job's pixels were ready) and "encoded" (its result was encoded: the end). Image decoding counts as
# encoding: both turn what the model made into what the client gets.
PHASES = {"queue": ("created", "prefill"), "prefill": ("prefill", "first"), "decode": ("first", "finished"),
          "encode": ("finished", "encoded"), "total": ("created", "encoded")}


def phase_seconds(stamps: dict[str, float]) -> dict[str, float]:
    """The phases whose two ends are stamped, in seconds (never negative: clocks of two hosts may disagree)."""
    return {name: max(stamps[end] - stamps[start], 0.0) for name, (start, end) in PHASES.items()
            if start in stamps and end in stamps}


def timings_ms(seconds: dict[str, float]) -> dict[str, float]:
    """`timings` as result events and response bodies carry them: milliseconds, to 0.1 ms."""
    return {name: round(value * 1000.0, 1) for name, value in seconds.items()}


def server_timing(timings: dict[str, float]) -> str:
    """`timings` as a `Server-Timing` header (W3C; also gRPC trailing metadata): `queue;dur=12.5, ...` in ms."""
    return ", ".join(f"{name};dur={value}" for name, value in timings.items())


def error_event(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def is_terminal(event: dict[str, Any]) -> bool:
    return event.get("type") in ("result", "error")


def result_images(event: dict[str, Any]) -> list[bytes]:
    """A generation result's encoded images (in `event["format"]`)."""
    return [base64.b64decode(s) for s in result_b64(event)]


def result_b64(event: dict[str, Any]) -> list[str]:
    return event.get("images", event.get("pngs", []))  # "pngs": what workers before output formats sent


def job_messages(messages: list[dict[str, Any]]) -> list[Message]:
    """Job messages -> janus_core's; `InvalidRequestError` for a malformed one (a worker gets only valid jobs
    from our frontends, but a queue may carry anything)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("text", ""), str) or not isinstance(m.get("images", 0), int):
            raise InvalidRequestError(f"messages[{i}] is malformed")
        out.append(Message(str(m.get("role")), m.get("text", ""), m.get("images", 0)))
    check_conversation(out)
    return out
