"""What goes into the engine and what comes out of it: requests, step outputs, results. Plain Python.

A request goes in with `Engine.add_request(request, sink)`; everything the engine has to say about it
reaches `sink` (called on the engine thread): `TokenOutput` / `ProgressOutput` / `PreviewOutput` while it runs, then
exactly one `FinishedOutput` or `FailedOutput`. No torch here: the API layer builds these types
without importing the model runtime (results carry arrays, typed loosely).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from janus_core.sampling.params import SamplingParams
from janus_core.text.conversation import Message

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class UnderstandRequest:
    """One prompt about `images`, or (with `messages`) a whole conversation whose images are `images`
    in order; `prompt` is then unused. `raw` (a plain completion): `prompt`, or `prompt_ids`, is the whole
    prompt, without the chat format. The answer ends at EOS, `max_new_tokens` or a `stop` string."""

    kind: ClassVar[str] = "understand"
    request_id: str
    prompt: str
    images: list[Image.Image]
    max_new_tokens: int = 256
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[Message] | None = None
    stop: list[str] = field(default_factory=list)
    raw: bool = False
    prompt_ids: list[int] | None = None


@dataclass
class GenerateRequest:
    """`cfg_weight` None: the model's default (`janus_core.limits`: 5.0 for VQ models, 2.0 for flow ones).
    `steps`: a flow model's ODE steps (None: 30); a VQ model refuses it. `given`: the sampling parameters
    the client set (a flow model refuses temperature and top_p, which mean nothing to it; only
    `params.seed` applies). `previews`: how many `PreviewOutput`s to send while the images form (evenly
    spaced; fewer when the preview decoder is busy: `janus_core.engine.previews`)."""

    kind: ClassVar[str] = "generate"
    request_id: str
    prompt: str
    n: int = 1
    cfg_weight: float | None = None
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0))
    steps: int | None = None
    given: frozenset[str] = frozenset()
    previews: int = 0


Request = UnderstandRequest | GenerateRequest


@dataclass
class UnderstandResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerateResult:
    seed: int
    tokens: Any  # torch (n, num_image_tokens) int64 VQ codes on CPU; a flow model's final latents (n, C, L, L)
    images: Any  # numpy (n, H, W, 3) uint8
    prompt_tokens: int = 0
    image_tokens: int = 0  # codes per image (VQ); 0 for a flow model, which makes latents


@dataclass
class TokenOutput:
    request_id: str
    token_id: int
    delta: str


@dataclass
class ProgressOutput:
    request_id: str
    step: int
    total: int


@dataclass
class PreviewOutput:
    """The images of a generation request as they look after `step` of `total` steps: (n, H, W, 3) uint8."""

    request_id: str
    step: int
    total: int
    images: Any


@dataclass
class FinishedOutput:
    """`stamps`: when (epoch seconds) the request reached each phase in the engine: "prefill" (its prefill was
    launched; the first one if it was preempted), "first" (its first token or image step came out),
    "finished" (its last step), "done" (its answer was ready: for images, once their pixels were decoded)."""

    request_id: str
    result: UnderstandResult | GenerateResult
    stamps: dict[str, float] = field(default_factory=dict)


@dataclass
class FailedOutput:
    request_id: str
    reason: str  # "invalid" (bad request), "cancelled" or "internal"
    message: str


EngineOutput = TokenOutput | ProgressOutput | PreviewOutput | FinishedOutput | FailedOutput
Sink = Callable[[EngineOutput], None]
