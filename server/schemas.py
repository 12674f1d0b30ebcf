"""REST request bodies (pydantic). Unknown fields and wrong types are refused with a 422 naming them."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

NON_BLANK = r"[^\s\x1c-\x1f\x85\ufeff]"  # server.service's test for a non-blank prompt


def _integral(value: Any) -> Any:
    """JSON Schema counts 1.0 as an integer; so do we (strict mode would refuse it). Other types
    pass through unchanged and are refused by strict validation as before."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def form_int(text: str) -> int:
    """An integer from a multipart form field ("3", "3.0", "3e0"); ValueError otherwise."""
    try:
        number = Decimal(text.strip())
    except InvalidOperation as exc:
        raise ValueError(text) from exc
    if not number.is_finite() or number != number.to_integral_value():
        raise ValueError(text)
    return int(number)


Int = Annotated[int, BeforeValidator(_integral)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# --- conversations: OpenAI's message shape, shared by /v1/chat/completions and /v1/understand ------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="A data: URL (base64), or http(s) on a host in JANUS_ALLOWED_IMAGE_HOSTS.")
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="Accepted for compatibility; every image is read at the model's native size.")


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One turn. Text parts of a message are joined with newlines; its images go ahead of its text."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send `name` and the like
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' is OpenAI's newer name for 'system'.")
    content: str | list[ContentPart]


class UnderstandBody(_Strict):
    """Either `prompt` + `images` or `messages` (a whole conversation), not both."""

    prompt: str | None = Field(None, min_length=1, description="The question or instruction about the image(s).")
    images: list[str] | None = Field(None, min_length=1, description="Images as base64 or data: URLs.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="A whole conversation instead of prompt + images; images as image_url parts.")
    max_new_tokens: Int = Field(256, ge=1, description="At most the server's limit (the default is capped to it).")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> UnderstandBody:
        if self.messages is not None:
            if self.prompt is not None or self.images is not None:
                raise ValueError("send either messages or prompt + images, not both")
        elif self.prompt is None or self.images is None:
            raise ValueError("prompt and images are required (or send messages instead)")
        return self


class GenerateBody(_Strict):
    """Unset fields take the model's defaults; a field that means nothing for the model is a 400."""

    prompt: str = Field(min_length=1)
    n: Int = Field(1, ge=1, description="Images to generate (at most the server's max_n).")
    cfg_weight: float | None = Field(None, ge=0.0, le=100.0,
                                     description="CFG weight; default 5.0 (Janus-Pro) or 2.0 (JanusFlow).")
    temperature: float | None = Field(None, ge=0.0, le=100.0,
                                      description="VQ models only; default 1.0, 0 means greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="VQ models only; default 1.0.")
    seed: Int | None = Field(None, ge=0, lt=2**63)
    steps: Int | None = Field(None, ge=1, le=100, description="Flow models (JanusFlow) only: ODE steps, default 30.")
    stream: bool = False


class ImagesGenerationsBody(BaseModel):
    """OpenAI Images API. Extra OpenAI fields (quality, style, user) are accepted and ignored; the
    sampling fields (the SDK's `extra_body`) reach the model."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: Int | None = Field(None, ge=0, lt=2**63)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0, description="CFG weight (vllm-omni's name).")
    cfg_weight: float | None = Field(None, ge=0.0, le=100.0,
                                     description="CFG weight; default 5.0 (Janus-Pro) or 2.0 (JanusFlow).")
    temperature: float | None = Field(None, ge=0.0, le=100.0,
                                      description="VQ models only; default 1.0, 0 means greedy.")
    steps: Int | None = Field(None, ge=1, le=100, description="Flow models (JanusFlow) only: ODE steps, default 30.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str


class ChatCompletionsBody(BaseModel):
    """OpenAI Chat Completions. Fields that change the answer and that we cannot honour (`logprobs`,
    `tools`, a non-text `response_format`, `n` > 1) are refused with a 400; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; generation ends before any of them.")
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    logprobs: bool | None = Field(None, description="Not supported: true is a 400.")
    top_logprobs: int | None = Field(None, ge=0, description="Not supported: a 400.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: a non-empty list is a 400.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Not supported: anything but 'none' is a 400.")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'}.")
