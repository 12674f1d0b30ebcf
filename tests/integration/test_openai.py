"""The OpenAI-compatible routes, driven by the official `openai` Python client."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.support.images import b64, png_bytes

DATA_URL = "data:image/png;base64," + b64(png_bytes())


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def _vision_message(text: str, url: str = DATA_URL) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_chat_completion_with_image_equals_native_route(server, client, model):
    reply = client.chat.completions.create(model=model, messages=_vision_message("What is this?"), max_tokens=10,
                                           temperature=0)
    native = httpx.post(server.url + "/v1/understand", json={"prompt": "What is this?", "images": [b64(png_bytes())],
                                                             "max_new_tokens": 10}, timeout=60).json()
    assert reply.choices[0].message.content == native["text"]
    assert reply.choices[0].finish_reason == native["finish_reason"]
    assert reply.usage.completion_tokens == native["usage"]["completion_tokens"]
    assert reply.object == "chat.completion"


def test_chat_completion_stream(client, model):
    stream = client.chat.completions.create(model=model, messages=_vision_message("Describe"), max_tokens=8,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    full = client.chat.completions.create(model=model, messages=_vision_message("Describe"), max_tokens=8,
                                          temperature=0)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_completion_text_only(client, model):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=4)
    assert reply.usage.prompt_tokens > 0


def test_chat_refuses_remote_urls(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=_vision_message("x", "https://example.com/cat.png"))
    assert "remote image URLs are refused" in str(info.value)


def test_images_generate_b64(client, model):
    result = client.images.generate(model=model, prompt="a lighthouse", n=2, response_format="b64_json")
    assert len(result.data) == 2
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64)


def test_images_generate_refuses_other_sizes(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model=model, prompt="a lighthouse", size="1024x1024")
    assert "64x64" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model=model, prompt="a lighthouse", response_format="url")


def test_models_list(client, server):
    assert [m.object for m in client.models.list().data] == ["model"]


def test_model_is_served_as_given_with_its_directory_name_as_alias(client, server, tiny_hf_dir):
    """As vLLM: `--model` as given is the id (clients such as guidellm load the tokenizer by it); the last
    path component is accepted too, and not listed."""
    assert [m.id for m in client.models.list().data] == [str(tiny_hf_dir)]
    reply = client.chat.completions.create(model=tiny_hf_dir.name, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
    assert reply.model == tiny_hf_dir.name


# --- legacy completions ---------------------------------------------------------------------------------------


def _transformers_completion(tiny_hf, prompt: str, max_tokens: int, **generate) -> tuple[list[int], list[int]]:
    """transformers' greedy tokens for a plain prompt (tokenized by default: BOS first), to EOS or the limit."""
    import torch

    ids = tiny_hf.tokenizer(prompt)["input_ids"]
    mask = torch.ones(1, len(ids), dtype=torch.long)
    out = tiny_hf.model.generate(input_ids=torch.tensor([ids]), attention_mask=mask,
                                 max_new_tokens=max_tokens, do_sample=False, **generate)[0, len(ids):].tolist()
    eos = tiny_hf.special["eos"]
    return ids, out[:out.index(eos)] if eos in out and not generate.get("ignore_eos") else out


def test_completions_equal_transformers_on_the_plain_prompt(client, model, tiny_hf):
    ids, expected = _transformers_completion(tiny_hf, "The quick brown fox", 12)
    reply = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == tiny_hf.tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected)
    assert reply.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
    as_ids = client.completions.create(model=model, prompt=ids, max_tokens=12, temperature=0)
    assert as_ids.choices[0].text == reply.choices[0].text
    as_list = client.completions.create(model=model, prompt=["The quick brown fox"], max_tokens=12, temperature=0)
    assert as_list.choices[0].text == reply.choices[0].text


def test_completions_repetition_penalty_equals_transformers(client, model, tiny_hf):
    _, expected = _transformers_completion(tiny_hf, "one two one two", 12, repetition_penalty=1.8)
    reply = client.completions.create(model=model, prompt="one two one two", max_tokens=12, temperature=0,
                                      extra_body={"repetition_penalty": 1.8})
    assert reply.choices[0].text == tiny_hf.tokenizer.decode(expected, skip_special_tokens=True)


def test_completions_stream_with_usage(client, model):
    full = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0.8, seed=4)
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0.8,
                                            seed=4, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_ignore_eos_and_min_tokens_reach_the_sampler(client, model, route):
    """guidellm's way of fixing output lengths. Seeded answers that end at EOS (the tiny model's, found by
    trying seeds) go on to max_tokens with ignore_eos, drawing the same tokens up to there; with min_tokens
    they run at least that long."""
    def ask(seed: int, **extra):
        common = dict(model=model, max_tokens=48, temperature=1.5, seed=seed, extra_body=extra)
        if route == "chat":
            reply = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **common)
            return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens
        reply = client.completions.create(prompt="hi", **common)
        return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens

    stopped = [(seed, answer) for seed in range(40) if (answer := ask(seed))[1] == "stop"][:2]
    assert stopped, "no seed of 40 ended at EOS: the test needs another prompt or temperature"
    for seed, (text, _, tokens) in stopped:
        longer, finish, count = ask(seed, ignore_eos=True)
        # (random tokens end mid UTF-8 sequence: its bytes decode as U+FFFD alone, and join the next ones)
        assert (finish, count) == ("length", 48) and longer.startswith(text.rstrip("\ufffd"))
        _, _, floor = ask(seed, min_tokens=tokens + 5)
        assert floor >= tokens + 5


def test_completions_of_several_prompts_equal_one_at_a_time(client, model):
    """A list of prompts: one choice each, in order, as each alone gives; usage sums them; streamed too."""
    prompts = ["The quick brown fox", "Once upon", "A"]
    alone = [client.completions.create(model=model, prompt=p, max_tokens=10, temperature=0.7, seed=9) for p in prompts]
    together = client.completions.create(model=model, prompt=prompts, max_tokens=10, temperature=0.7, seed=9)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]
    assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    chunks = list(client.completions.create(model=model, prompt=prompts, max_tokens=10, temperature=0.7, seed=9,
                                            stream=True, stream_options={"include_usage": True}))
    for i, one in enumerate(alone):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.text for c in mine) == one.choices[0].text
        assert mine[-1].finish_reason == one.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == together.usage.total_tokens
    ids = client.completions.create(model=model, prompt=[[5, 6, 7], [8, 9]], max_tokens=4, temperature=0)
    assert [c.text for c in ids.choices] == [client.completions.create(model=model, prompt=p, max_tokens=4,
                                                                       temperature=0).choices[0].text
                                             for p in ([5, 6, 7], [8, 9])]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 2}, "n=2"),
    ({"echo": True}, "echo"),
    ({"logprobs": 1}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"best_of": 3}, "best_of=3"),
    ({"prompt": ["a"] * 17}, "at most 16"),
    ({"prompt": [[5, 6], [0, 10**6]]}, "outside the vocabulary"),
    ({"prompt": []}, "empty"),
    ({"extra_body": {"min_p": 2}}, "min_p"),
    ({"extra_body": {"min_tokens": 50}}, "min_tokens (50)"),
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"max_tokens": 10**6}, "max_tokens must be at most"),
])
def test_completions_refuse_what_they_cannot_honour(client, model, kwargs, message):
    kwargs = {"prompt": "hi", "max_tokens": 8, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, **kwargs)
    assert message in str(info.value)


def test_chat_takes_what_openai_clients_send(client, model):
    """litellm's shapes: a text part with `cache_control`, an assistant turn without content, a `name`."""
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief.",
                                                "cache_control": {"type": "ephemeral"}}]},
                {"role": "user", "content": "hi", "name": "ada"},
                {"role": "assistant"},
                {"role": "user", "content": [{"type": "text", "text": "and?", "cache_control": {"type": "ephemeral"}},
                                             {"type": "image_url", "image_url": {"url": DATA_URL, "format": "png"}}]}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=3)
    assert reply.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": None}])
    assert "needs content" in str(info.value)


@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_images_output_format(client, model, server, fmt, pil):
    result = client.images.generate(model=model, prompt="a lighthouse", output_format=fmt, output_compression=60,
                                    extra_body={"seed": 2})
    assert result.output_format == fmt
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).format == pil
    native = httpx.post(server.url + "/v1/generate", json={"prompt": "a lighthouse", "seed": 2, "output_format": fmt,
                                                           "output_compression": 60},
                        headers={"Accept": f"image/{fmt}"}, timeout=60)
    assert native.headers["content-type"] == f"image/{fmt}"
    assert native.content == base64.b64decode(result.data[0].b64_json)  # the same pixels, the same encoder


def test_refusals_are_in_the_access_log(server):
    """One line per request; a refusal carries its reason and the request id (the access log is on by default)."""
    import json
    import time

    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "n": 5}, headers={"X-Request-Id": "acc-1"})
    assert r.status_code == 400
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server writes the line after the response: wait for it to appear
        lines = [json.loads(line) for line in server.log().splitlines() if '"acc-1"' in line]
        if lines:
            break
        time.sleep(0.05)
    (entry,) = lines
    assert entry["logger"] == "janus.access" and entry["status"] == 400 and entry["path"] == "/v1/completions"
    assert "n=5" in entry["error"] and entry["method"] == "POST" and entry["duration_ms"] >= 0


def test_a_failing_prompt_ends_the_stream_of_several_with_its_error(server, model):
    body = {"model": model, "prompt": [[5, 6, 7], [0, 10**6]], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and len(r.headers["x-job-id"].split(",")) == 2
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "outside the vocabulary" in events[-2]
