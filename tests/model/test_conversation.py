"""Conversations on the engine against transformers: every turn rendered by the checkpoint's chat
template, both chat formats (Janus-Pro's `<|User|>`, Janus-1.3B's `User:`), stop strings, and the
prefix cache never mixing two conversations that differ only in their image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import JanusForConditionalGeneration, JanusProcessor

from janus_core import Engine, EngineConfig, FinishedOutput, TokenOutput, UnderstandRequest
from janus_core.models.loader import family_from_name, load_model
from janus_core.sampling.params import SamplingParams
from janus_core.text.conversation import Message
from janus_core.text.processor import build_conversation_inputs, build_generation_ids
from janus_core.tiny.janus import write_tiny_model

GREEDY = SamplingParams(temperature=0.0)
ANSWER = "A red square on a blue field."


def _image(seed: int, size=(40, 56)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[0], size[1], 3) * 255).astype("uint8"))


def three_turns(system: str | None) -> list[Message]:
    head = [Message("system", system)] if system is not None else []
    return head + [Message("user", "What is in this image?", 1), Message("assistant", ANSWER),
                   Message("user", "What colour is it?")]


def hf_messages(messages: list[Message]) -> list[dict]:
    """The same conversation in transformers' message shape (system included, as a client sends it)."""
    return [{"role": m.role, "content": [{"type": "image"}] * m.num_images + [{"type": "text", "text": m.text}]}
            for m in messages]


def reference_answer(path, messages: list[Message], images, max_new_tokens: int) -> tuple[list[int], int]:
    """transformers' `generate` on the conversation rendered by the checkpoint's own chat template;
    returns the new tokens (EOS cut) and the prompt length."""
    model = JanusForConditionalGeneration.from_pretrained(path).eval()
    processor = JanusProcessor.from_pretrained(path)
    if any(m.role == "system" for m in messages):
        processor.use_default_system_prompt = False  # the template places the client's system text
    text = processor.apply_chat_template(hf_messages(messages), add_generation_prompt=True)
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    return (new[:new.index(eos)] if eos in new else new), inputs["input_ids"].shape[1]


def run(engine: Engine, *requests: UnderstandRequest) -> dict[str, list]:
    outputs: dict[str, list] = {}
    for request in requests:
        engine.add_request(request, lambda out: outputs.setdefault(out.request_id, []).append(out))
    engine.run_until_idle()
    return outputs


def finished(outputs: dict[str, list], rid: str):
    last = outputs[rid][-1]
    assert isinstance(last, FinishedOutput), last
    return last.result


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-janus"), "hf", variant="janus")


@pytest.mark.parametrize("system", [None, "You describe pictures briefly."])
def test_three_turn_conversation_matches_transformers(tiny_hf_dir, system):
    lm = load_model(str(tiny_hf_dir), "cpu")
    messages, images = three_turns(system), [_image(0)]
    expected, prompt_len = reference_answer(tiny_hf_dir, messages, images, 16)
    result = finished(run(Engine(lm), UnderstandRequest("c", "", images, 16, GREEDY, messages=messages)), "c")
    assert result.token_ids == expected
    assert result.prompt_tokens == prompt_len


def test_conversation_text_places_system_and_turns(tiny_hf):
    inputs = build_conversation_inputs(tiny_hf, three_turns("Be brief."), [_image(1)])
    text = tiny_hf.tokenizer.decode(inputs.input_ids)
    assert text.count("<|User|>") == 2 and text.count("<|Assistant|>") == 2
    assert "Be brief.\n\n<|User|>: <begin_of_image>" in text
    assert "You are a helpful" not in text  # the client's system text replaces the default one
    assert f"<|Assistant|>: {ANSWER}<｜end▁of▁sentence｜><|User|>: What colour is it?\n\n<|Assistant|>:" in text
    default = tiny_hf.tokenizer.decode(build_conversation_inputs(tiny_hf, three_turns(None), [_image(1)]).input_ids)
    assert "You are a helpful language and vision assistant." in default


def test_janus_13b_format_matches_transformers(janus_dir):
    lm = load_model(str(janus_dir), "cpu")
    assert lm.chat_format == "janus"
    messages, images = three_turns(None), [_image(2)]
    text = lm.tokenizer.decode(build_conversation_inputs(lm, messages, images).input_ids)
    assert "User: <begin_of_image>" in text and text.endswith("\n\nAssistant:") and "<|User|>" not in text
    generation = lm.tokenizer.decode(build_generation_ids(lm, "a cat"))
    assert generation.startswith("<｜begin▁of▁sentence｜>User: a cat\n\nAssistant:")
    expected, _ = reference_answer(janus_dir, messages, images, 12)
    result = finished(run(Engine(lm), UnderstandRequest("j", "", images, 12, GREEDY, messages=messages)), "j")
    assert result.token_ids == expected


def test_chat_format_detection_and_override(tmp_path, tiny_hf_dir):
    ds = write_tiny_model(tmp_path / "models--deepseek-ai--Janus-1.3B", "deepseek")
    assert load_model(str(ds), "cpu").chat_format == "janus"  # a DeepSeek layout has no template: its name
    assert load_model(str(ds), "cpu", chat_format="janus-pro").chat_format == "janus-pro"
    overridden = load_model(str(tiny_hf_dir), "cpu", chat_format="janus")
    assert "User: hi" in overridden.tokenizer.decode(build_generation_ids(overridden, "hi"))
    assert family_from_name("deepseek-ai/Janus-Pro-7B") == "janus-pro"
    assert family_from_name("deepseek-ai/JanusFlow-1.3B") == "janus"
    assert family_from_name("deepseek-ai/Janus-1.3B") == "janus"


def test_conversations_differing_only_in_image_share_no_kv(tiny_hf_dir):
    """The KV block keys cover image content: B (same tokens as A, another image) reuses nothing of A's
    from the image on (only the system prompt before it), and each answer equals transformers'.
    Turn 2 of A then reuses A's first turn up to where its made-up answer differs from the real one."""
    lm = load_model(str(tiny_hf_dir), "cpu")
    engine = Engine(lm, EngineConfig(max_batch_size=2))
    first = [Message("user", "Describe the image.", 1)]
    a, b = _image(3), _image(4)
    outs = run(engine, UnderstandRequest("a", "", [a], 10, GREEDY, messages=first))
    outs |= run(engine, UnderstandRequest("b", "", [b], 10, GREEDY, messages=first))
    stats = engine.stats()
    first_image = build_conversation_inputs(lm, first, [b]).input_ids.index(lm.special["image"])
    assert stats.prefix_cache_misses == 1 and 0 < stats.prefix_tokens_reused <= first_image
    assert stats.vision_cache_misses == 2 and stats.vision_cache_hits == 0
    assert finished(outs, "a").token_ids == reference_answer(tiny_hf_dir, first, [a], 10)[0]
    assert finished(outs, "b").token_ids == reference_answer(tiny_hf_dir, first, [b], 10)[0]
    second = first + [Message("assistant", ANSWER), Message("user", "And the colour?")]
    outs = run(engine, UnderstandRequest("a2", "", [a], 10, GREEDY, messages=second))
    reused = engine.stats().prefix_tokens_reused - stats.prefix_tokens_reused
    assert engine.stats().prefix_cache_hits == 2 and reused >= first_image + lm.num_image_tokens  # the image too
    turn2 = finished(outs, "a2").token_ids
    assert turn2 == reference_answer(tiny_hf_dir, second, [a], 10)[0]
    engine.clear_caches()
    outs = run(engine, UnderstandRequest("a3", "", [a], 10, GREEDY, messages=second))
    stats = engine.stats()
    assert stats.prefix_cache_hits == 2 and stats.vision_cache_misses == 3  # cleared: all computed again
    assert finished(outs, "a3").token_ids == turn2


def test_stop_strings_end_the_answer_and_are_not_returned(tiny_hf_dir):
    engine = Engine(load_model(str(tiny_hf_dir), "cpu"))  # its own model: an engine packs the linears in place
    messages = [Message("user", "Say something.", 0)]
    free = finished(run(engine, UnderstandRequest("free", "", [], 24, GREEDY, messages=messages)), "free")
    assert len(free.text) >= 4, free.text
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]
    outs = run(engine, UnderstandRequest("s", "", [], 24, GREEDY, messages=messages, stop=["\x00never", stop]))
    result = finished(outs, "s")
    assert result.finish_reason == "stop"
    assert result.text == free.text[:free.text.index(stop)]
    streamed = "".join(o.delta for o in outs["s"] if isinstance(o, TokenOutput))
    assert streamed == result.text and stop not in streamed


def test_two_images_render_like_janus_pro_template(tiny_hf):
    """transformers' converted Janus-Pro template puts a blank line between two images of a message."""
    text = tiny_hf.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}],
        add_generation_prompt=True)
    assert text == "<|User|>: <image_placeholder>\n\n<image_placeholder>\nCompare.\n\n<|Assistant|>:"
