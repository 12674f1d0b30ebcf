"""REST request bodies (pydantic). Unknown fields and wrong types are refused with a 422 naming them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class UnderstandBody(_Strict):
    prompt: str = Field(min_length=1, description="The question or instruction about the image(s).")
    images: list[str] = Field(min_length=1, description="Images as base64 or data: URLs.")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False


class GenerateBody(_Strict):
    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1, description="Images to generate (at most the server's max_n).")
    cfg_weight: float = Field(5.0, ge=0.0, le=100.0)
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False


class ImagesGenerationsBody(BaseModel):
    """OpenAI Images API. Extra OpenAI fields (quality, style, user) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: int | None = Field(None, ge=0, lt=2**63)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionsBody(BaseModel):
    """OpenAI Chat Completions; fields we do not use are accepted and ignored, as OpenAI clients send them."""

    model_config = ConfigDict(extra="ignore")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
