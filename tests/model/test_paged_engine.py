"""The paged KV engine against the oracle on the sharpened tiny checkpoint (outputs that use every input
token, many distinct codes, answers that end at EOS): mixed batches, a fragmented pool, shared
prefixes, preemption and resume, and requests that can never fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from janus_core import Engine, EngineConfig, FailedOutput, GenerateRequest, UnderstandRequest
from janus_core.attention.paged import runs_of
from janus_core.engine.memory import kv_bytes_per_token
from janus_core.models.loader import LoadedModel, load_model
from janus_core.sampling.params import SamplingParams
from janus_core.step.pixels import decode_images
from tests.support.engine_oracle import (
    Collector,
    reference_image_tokens,
    run,
    transformers_image_tokens,
    transformers_text_tokens,
)

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def sharp(tiny_sharp_dir) -> LoadedModel:
    """The engines' copy (they pack its linear layers in place)."""
    return load_model(str(tiny_sharp_dir), "cpu")


@pytest.fixture(scope="module")
def oracle(tiny_sharp_dir) -> LoadedModel:
    """An untouched copy: transformers' generate runs on it."""
    return load_model(str(tiny_sharp_dir), "cpu")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(3)]


def understand_mix(images) -> list[UnderstandRequest]:
    return [
        UnderstandRequest("u-stop-image", "What color is the car?", [images[0]], max_new_tokens=24),  # EOS at 11
        UnderstandRequest("u-stop-text", "Compare the two pictures.", [], max_new_tokens=24),  # EOS at 15
        UnderstandRequest("u-stop-early", "a", [images[2]], max_new_tokens=24),  # EOS at 3
        UnderstandRequest("u-two", "What is shown in the picture?", [images[1], images[2]], max_new_tokens=20),
        UnderstandRequest("u-long", "Describe this image in detail.", [images[1]], max_new_tokens=30),
        UnderstandRequest("u-text", "the quick brown fox", [], max_new_tokens=17),
    ]


def generate_mix() -> list[GenerateRequest]:
    return [
        GenerateRequest("g-one", "a cat", n=1, cfg_weight=5.0, params=GREEDY),
        GenerateRequest("g-three", "A photo of a mountain lake at sunrise, with mist", n=3, cfg_weight=3.0,
                        params=GREEDY),
        GenerateRequest("g-two", "neon city at night", n=2, cfg_weight=7.5, params=GREEDY),
    ]


def kv_config(lm: LoadedModel, blocks: int, **kwargs) -> EngineConfig:
    per_token = kv_bytes_per_token(lm.model.config.text_config, lm.dtype)
    return EngineConfig(kv_cache_memory=blocks * 16 * per_token, **kwargs)


def check_understanding(sink: Collector, oracle: LoadedModel, requests: list[UnderstandRequest]) -> None:
    for req in requests:
        got = sink.result(req.request_id)
        expected = transformers_text_tokens(oracle, req)
        assert got.token_ids == expected, req.request_id
        assert got.finish_reason == ("stop" if len(expected) < req.max_new_tokens else "length"), req.request_id


def check_generation(sink: Collector, oracle: LoadedModel, requests: list[GenerateRequest]) -> None:
    for req in requests:
        got = sink.result(req.request_id)
        expected = transformers_image_tokens(oracle, req.prompt, req.cfg_weight)
        for i in range(req.n):  # greedy: every image of the request is the one transformers makes
            assert got.tokens[i].tolist() == expected, (req.request_id, i)
        pixels = decode_images(oracle, got.tokens)
        # Pixels of the same codes; a VQ decode of another batch size may differ by one level (conv order).
        assert np.abs(got.images.astype(int) - pixels.astype(int)).max() <= 1, req.request_id


def test_sharpened_checkpoint_exercises_the_oracle(oracle, images):
    """The checkpoint the oracle tests rely on: varied codes, answers that stop at EOS and some that do not."""
    codes = transformers_image_tokens(oracle, "a cat", 5.0)
    assert len(set(codes)) >= oracle.num_image_tokens * 3 // 4
    finishes = {len(transformers_text_tokens(oracle, r)) < r.max_new_tokens for r in understand_mix(images)}
    assert finishes == {True, False}


def test_mixed_batch_equals_transformers(sharp, oracle, images):
    gens, unds = generate_mix(), understand_mix(images)
    engine = Engine(sharp, EngineConfig(max_batch_size=12))
    sink = run(engine, [*gens[:1], *unds[:3], *gens[1:], *unds[3:]])
    check_understanding(sink, oracle, unds)
    check_generation(sink, oracle, gens)
    assert engine.pool.num_used == 0 and engine.stats().preemptions == 0


def test_flex_attention_over_block_tables_equals_the_oracle(sharp, oracle, images):
    """The CUDA decode attention (one flex_attention over the pool with a BlockMask), run eagerly on CPU."""
    gens, unds = generate_mix()[:2], understand_mix(images)[:4]
    engine = Engine(sharp, kv_config(sharp, 96, attention="flex"))
    assert engine.kv.attention == "flex"
    sink = run(engine, [*gens, *unds])
    check_understanding(sink, oracle, unds)
    check_generation(sink, oracle, gens)


def test_fragmented_pool_and_shared_prefixes_keep_outputs(sharp, oracle, images):
    """Blocks freed out of order leave holes: rows then span several runs of blocks, outputs stay the same."""
    engine = Engine(sharp, EngineConfig(max_batch_size=16))
    sink = Collector()
    fillers = [UnderstandRequest(f"f{i}", "hello world", [images[i % 3]], max_new_tokens=6 + 5 * i) for i in range(5)]
    fillers += [GenerateRequest(f"fg{i}", "a dog", n=1, params=GREEDY) for i in range(2)]
    for req in fillers:
        engine.add_request(req, sink)
    for _ in range(3):
        engine.step()
    for rid in ("f1", "f3", "fg0"):  # holes in the middle of the pool
        engine.cancel(rid)
    gens, unds = generate_mix(), understand_mix(images)
    for req in [*unds, *gens]:
        engine.add_request(req, sink)
    most_runs = 0
    while engine.step():
        for seq in engine.scheduler.running["understand"] + engine.scheduler.running["generate"]:
            most_runs = max(most_runs, *(len(runs_of(t, 16, len(t) * 16)) for t in seq.tables))
    assert most_runs > 1  # some row was attended over blocks that are not consecutive
    check_understanding(sink, oracle, unds)
    check_generation(sink, oracle, gens)
    assert engine.stats().prefix_cache_hits > 0 and engine.pool.num_used == 0


def test_preemption_and_resume_keep_greedy_and_seeded_outputs(sharp, oracle, images):
    seeded = UnderstandRequest("u-seeded", "Describe this image in detail.", [images[0]], max_new_tokens=30,
                               params=SamplingParams(temperature=0.9, top_p=0.9, seed=3))
    alone = run(Engine(sharp), [seeded]).result("u-seeded")
    unds = [*understand_mix(images), seeded]
    for caching in (True, False):
        # 16 blocks of 16 positions: two or three prompts at a time, so growing answers must preempt.
        engine = Engine(sharp, kv_config(sharp, 16, prefix_caching=caching))
        sink = run(engine, [*unds, generate_mix()[0]])
        assert engine.stats().preemptions >= 1, caching
        check_understanding(sink, oracle, unds[:-1])
        assert sink.result("u-seeded").token_ids == alone.token_ids
        assert torch.equal(sink.result("g-one").tokens, reference_image_tokens(oracle, generate_mix()[0]))
        assert engine.pool.num_used == 0


def test_generation_waits_for_blocks_and_never_fails(sharp, oracle):
    # Room for about one n=3 request at a time: the others wait for its blocks, all complete.
    engine = Engine(sharp, kv_config(sharp, 24))
    gens = generate_mix()
    sink = run(engine, gens + [GenerateRequest("g-again", "a cat", n=3, params=GREEDY)])
    check_generation(sink, oracle, gens)
    assert sink.result("g-again").tokens.shape == (3, sharp.num_image_tokens)


@pytest.mark.parametrize(("request_", "words"), [
    (GenerateRequest("r", "a cat", n=4, params=GREEDY), "4 image(s) of"),
    (UnderstandRequest("r", "hello", [], max_new_tokens=600), "plus max_new_tokens 600 need"),
])
def test_requests_larger_than_the_pool_are_refused_with_the_numbers(sharp, request_, words):
    engine = Engine(sharp, kv_config(sharp, 8))
    out = run(engine, [request_]).outputs["r"]
    assert len(out) == 1 and isinstance(out[0], FailedOutput) and out[0].reason == "invalid"
    assert words in out[0].message and "KV pool holds 128" in out[0].message
