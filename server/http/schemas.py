"""REST request bodies (pydantic). Unknown fields and wrong types are refused with a 422 naming them."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from server.jobs import MAX_PREVIEWS

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
    model_config = ConfigDict(extra="ignore")  # e.g. Anthropic-style `cache_control`, which litellm passes on
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(description="A data: URL (base64), or http(s) on a host in JANUS_ALLOWED_IMAGE_HOSTS.")
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="Accepted for compatibility; every image is read at the model's native size.")


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


MAX_MESSAGES = 256  # turns of one conversation; its text is bounded by max_prompt_chars as well
MAX_PARTS = 64  # content parts of one message

ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One turn. Text parts of a message are joined with newlines; its images go ahead of its text."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send `name` and the like
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' is OpenAI's newer name for 'system'.")
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = Field(
        None, description="Required but for assistant turns, where missing or null means empty.")

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self


class SamplingExtensions(BaseModel):
    """vLLM's sampling extensions, as vLLM's OpenAI server takes them (the SDK's `extra_body`)."""

    top_k: Int | None = Field(None, ge=-1, lt=2**31, description="Keep the k most likely tokens; 0 or -1: off.")
    min_p: float | None = Field(None, ge=0.0, le=1.0,
                                description="Drop tokens below min_p times the most likely one's probability.")
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0,
                                             description="Above 1 discourages every token of the prompt and answer.")
    min_tokens: Int | None = Field(None, ge=0, lt=2**31,
                                   description="EOS and stop strings count only after this many tokens.")
    ignore_eos: bool = Field(False, description="Go on past EOS, to the length limit.")

    def extensions(self) -> dict[str, Any]:
        """Keyword arguments for UnderstandParams (the defaults where unset)."""
        return dict(top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0,
                    repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                    min_tokens=self.min_tokens or 0, ignore_eos=self.ignore_eos)


WEBHOOK = ("Async jobs only (Prefer: respond-async): an https URL on JANUS_ALLOWED_WEBHOOK_HOSTS that receives "
           "the job object, signed, when the job ends.")


class Webhook(BaseModel):
    webhook: str | None = Field(None, min_length=1, max_length=2048, description=WEBHOOK)


class UnderstandBody(Webhook, SamplingExtensions, _Strict):
    """Either `prompt` + `images` or `messages` (a whole conversation), not both."""

    prompt: str | None = Field(None, min_length=1, description="The question or instruction about the image(s).")
    images: list[str] | None = Field(None, min_length=1, description="Images as base64 or data: URLs.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=MAX_MESSAGES,
        description="A whole conversation instead of prompt + images; images as image_url parts.")
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


OutputFormat = Literal["png", "jpeg", "webp"]
COMPRESSION = "JPEG / WebP quality, 0-100 (default: Pillow's, 75 / 80); PNG is lossless and ignores it."
PREVIEWS = ("With stream: true (or Prefer: respond-async): events with each image as it forms, at this many evenly "
            "spaced steps (fewer when the server's preview decoder is busy).")


class GenerateBody(Webhook, _Strict):
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
    output_format: OutputFormat = Field("png", description="How the images are encoded.")
    output_compression: Int | None = Field(None, ge=0, le=100, description=COMPRESSION)
    previews: Int = Field(0, ge=0, le=MAX_PREVIEWS, description=PREVIEWS)


class ImagesGenerationsBody(Webhook):
    """OpenAI Images API. Extra OpenAI fields (quality, style, user) are accepted and ignored; the
    sampling fields (the SDK's `extra_body`) reach the model."""

    model_config = ConfigDict(extra="ignore", strict=True)  # unknown fields ignored; known ones as typed (false: no 0)
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: Int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: Int | None = Field(None, ge=0, lt=2**63)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0, description="CFG weight (vllm-omni's name).")
    cfg_weight: float | None = Field(None, ge=0.0, le=100.0,
                                     description="CFG weight; default 5.0 (Janus-Pro) or 2.0 (JanusFlow).")
    temperature: float | None = Field(None, ge=0.0, le=100.0,
                                      description="VQ models only; default 1.0, 0 means greedy.")
    steps: Int | None = Field(None, ge=1, le=100, description="Flow models (JanusFlow) only: ODE steps, default 30.")
    output_format: OutputFormat = Field("png", description="How the images are encoded.")
    output_compression: Int | None = Field(None, ge=0, le=100, description=COMPRESSION)
    stream: bool | None = Field(False, description="Server-sent events: image_generation.partial_image events (as "
                                                   "many as partial_images asks for), then image_generation.completed "
                                                   "per image. null: false, as the OpenAI SDK may send it.")
    partial_images: Int | None = Field(None, ge=0, le=3,
                                       description="Partial images per image while it forms (stream: true, or "
                                                   "Prefer: respond-async).")
    quality: str | None = Field(None, description="Accepted and echoed in stream events; it changes nothing.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str


class OpenAIOptions(SamplingExtensions):
    """What chat and legacy completions share. Unknown fields are ignored (OpenAI clients send many);
    options that would change the answer and that we cannot honour are each refused with a 400 naming them."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; generation ends before any of them.")
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    presence_penalty: float | None = Field(None, description="Not supported: anything but 0 is a 400.")
    frequency_penalty: float | None = Field(None, description="Not supported: anything but 0 is a 400.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: a non-empty map is a 400.")

    def unsupported(self) -> list[str]:
        """The options given that this server cannot honour, each with what to do instead."""
        out = [f"n={self.n} is not supported (one choice per request: send several requests)"] if self.n != 1 else []
        out += [f"{name} is not supported (use repetition_penalty)" for name in ("presence_penalty",
                                                                                  "frequency_penalty")
                if getattr(self, name)]
        return out + (["logit_bias is not supported"] if self.logit_bias else [])


class ChatCompletionsBody(Webhook, OpenAIOptions):
    """OpenAI Chat Completions. Fields that change the answer and that we cannot honour (`logprobs`,
    `tools`, a non-text `response_format`, `n` > 1, penalties other than `repetition_penalty`) are refused
    with a 400; others are ignored."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="Not supported: true is a 400.")
    top_logprobs: int | None = Field(None, ge=0, description="Not supported: a 400.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: a non-empty list is a 400.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Not supported: anything but 'none' is a 400.")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'}.")


MAX_PROMPTS = 16  # prompts in one completions request (each is a job)


class CompletionsBody(OpenAIOptions):
    """OpenAI's legacy Completions, as vLLM serves it: the prompt as given, no chat format."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text or token ids, or a list of several prompts (one choice each, in order).")
    max_tokens: int | None = Field(None, ge=1, description="16 when not given (OpenAI's default), within the "
                                                          "server's limit.")
    echo: bool = Field(False, description="Not supported: true is a 400.")
    logprobs: int | None = Field(None, ge=0, description="Not supported: a number is a 400.")
    best_of: int | None = Field(None, ge=1, description="Only 1.")
    suffix: str | None = Field(None, description="Not supported: a 400.")
