"""The clients people already point at OpenAI-compatible servers, unchanged, against a real `janus-server serve`:
litellm (the gateway) and guidellm (the load tool), at the releases the lock pins. Each test asserts on what the
client itself parsed. The OpenAI SDK's own suite is tests/integration/test_openai.py.

Both run offline: litellm reads its bundled model-cost map and tokenizers (LITELLM_LOCAL_MODEL_COST_MAP), and
guidellm loads its tokenizer by the served model id, which is the checkpoint's path (`--model` as given).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.support.images import b64, png_bytes

pytestmark = pytest.mark.timeout(300)
OFFLINE = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def litellm(server):
    previous = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)  # read when litellm is first imported
    import litellm as module

    yield module
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def served(server) -> str:
    import httpx

    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def _kw(server, served: str, provider: str = "hosted_vllm") -> dict:
    return {"model": f"{provider}/{served}", "api_base": server.url + "/v1", "api_key": "unused"}


@pytest.mark.parametrize("provider", ["hosted_vllm", "openai"])
def test_litellm_chat_with_what_it_sends(litellm, server, served, provider):
    """litellm drops `content: None` from assistant turns, and the `openai/` provider passes a text part's
    `cache_control` on: both used to be a 400."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?",
                                              "cache_control": {"type": "ephemeral"}},
                                             {"type": "image_url",
                                              "image_url": {"url": "data:image/png;base64," + b64(png_bytes())}}]},
                {"role": "assistant", "content": None},
                {"role": "user", "content": "And the colour?"}]
    reply = litellm.completion(messages=messages, max_tokens=6, temperature=0, **_kw(server, served, provider))
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 0
    again = litellm.completion(messages=messages, max_tokens=6, temperature=0, **_kw(server, served, provider))
    assert again.choices[0].message.content == reply.choices[0].message.content


def test_litellm_streaming_and_ignore_eos(litellm, server, served):
    chunks = list(litellm.completion(messages=[{"role": "user", "content": "hi"}], max_tokens=7, stream=True,
                                     stream_options={"include_usage": True}, temperature=1.0, seed=3,
                                     extra_body={"ignore_eos": True}, **_kw(server, served)))
    assert chunks[-1].usage.completion_tokens == 7
    whole = litellm.completion(messages=[{"role": "user", "content": "hi"}], max_tokens=7, temperature=1.0, seed=3,
                               extra_body={"ignore_eos": True}, **_kw(server, served))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_litellm_text_completion(litellm, server, served):
    reply = litellm.text_completion(prompt="Once upon a time", max_tokens=5, temperature=0, **_kw(server, served))
    assert reply.object == "text_completion" and reply.usage.completion_tokens <= 5
    twice = litellm.text_completion(prompt="Once upon a time", max_tokens=5, temperature=0, **_kw(server, served))
    assert twice.choices[0].text == reply.choices[0].text


@pytest.mark.parametrize("provider", ["hosted_vllm", "openai"])
def test_litellm_image_generation(litellm, server, served, provider):
    """litellm sends no response_format unless told; b64_json is the default here. With `openai/` it refuses
    response_format for non-DALL-E models itself, so it goes in extra_body."""
    extra = {"response_format": "b64_json"} if provider == "hosted_vllm" else {
        "extra_body": {"response_format": "b64_json", "output_format": "jpeg", "seed": 1}}
    result = litellm.image_generation(prompt="a red square", n=1, **extra, **_kw(server, served, provider))
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64) and image.format == ("PNG" if provider == "hosted_vllm" else "JPEG")


# --- guidellm ---------------------------------------------------------------------------------------------------


def _guidellm(server, out: Path, request_format: str, profile: str, *extra: str) -> dict:
    cli = Path(sys.executable).with_name("guidellm")
    done = subprocess.run(
        [str(cli), "run", "--backend", f"kind=openai_http,target={server.url},request_format={request_format}",
         "--profile", profile, "--constraint", "kind=max_requests,count=6",
         "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
         "--output", f"kind=json,path={out}", "--disable-console", *extra],
        capture_output=True, text=True, cwd=out.parent, env={**os.environ, **OFFLINE}, timeout=240, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("request_format", "profile"), [
    ("/v1/chat/completions", "kind=synchronous"),
    ("/v1/completions", "kind=concurrent,streams=2"),
])
def test_guidellm_gets_every_requested_output_length(server, tmp_path, request_format, profile):
    """guidellm fixes output lengths with `ignore_eos` (and `max_tokens`): every request must come back with
    exactly 8 tokens, counted by guidellm from the streamed usage. It finds the model and its tokenizer through
    /v1/models alone."""
    report = _guidellm(server, tmp_path / "run.json", request_format, profile)
    (bench,) = report["benchmarks"]
    assert bench["metrics"]["request_totals"] == {"successful": 6, "errored": 0, "incomplete": 0, "total": 6}
    for request in bench["requests"]["successful"]:
        assert json.loads(request["request_args"])["body"]["ignore_eos"] is True
        assert request["output_metrics"]["text_tokens"] == 8 and request["output_tokens"] == 8
