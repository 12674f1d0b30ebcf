"""`--quantization int8` on the tiny checkpoints: what is quantized (and what is not), both layouts and JanusFlow
serving through the engine, quality within the bounds bench/bench_quant.py measured, seeds still batch-invariant,
and fp8 refused with a reason off CUDA. (The compiled step with int8 weights: tests/model/test_compiled_step.py.)

Quality bounds, from `python -m bench.bench_quant --shapes tiny` and the sharpened tiny checkpoint when they
were set (KL in nats per position, teacher forced over 32 prompts): the sharp checkpoint's text KL had mean
0.0064, top-1 agreement 91.7%; its image codes mean KL 0.075, top-1 92.4%. Random weights make near-flat
distributions whose argmax a rounding can flip: real checkpoints agree more, never less, than these floors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bench.quant_quality import teacher_forced_codes, teacher_forced_text, token_agreement
from janus_core import Engine, GenerateRequest, ModelLoadError, UnderstandRequest
from janus_core.models.loader import load_model
from janus_core.models.quantize import is_quantized, place, stored_bytes
from janus_core.sampling.params import SamplingParams
from tests.support.engine_oracle import run

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def int8_hf(tiny_hf_dir):
    return load_model(str(tiny_hf_dir), "cpu", quantization="int8")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (56, 64, 3), dtype=np.uint8))


def quantized_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantized(m.weight)}


def test_int8_covers_the_lm_linears_and_both_heads_and_nothing_else(int8_hf, tiny_hf_dir):
    model = int8_hf.model
    layers = model.model.language_model.layers
    expected = {f"model.language_model.layers.{i}.{part}" for i in range(len(layers))
                for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    expected |= {"lm_head", "model.generation_head.proj_out", "model.generation_head.vision_head"}
    assert quantized_names(model) == expected
    # The vision tower, aligners, VQ model and embeddings keep the model's dtype.
    for name, param in model.named_parameters():
        if not any(name.startswith(prefix + ".") for prefix in expected):
            assert type(param) is nn.Parameter and param.dtype == torch.float32, name
    full = load_model(str(tiny_hf_dir), "cpu")
    saved = stored_bytes(full.model) - int8_hf.weights_bytes
    linear_bytes = sum(m.weight.numel() * 4 for name, m in full.model.named_modules() if name in expected)
    # Each weight goes from 4 bytes to 1, plus a float32 scale per output channel.
    assert 0.7 * linear_bytes < saved < 0.75 * linear_bytes
    assert int8_hf.quantization == "int8" and int8_hf.load_peak_bytes is None  # measured on CUDA only


def test_both_layouts_serve_understanding_and_generation_the_same(int8_hf, tiny_ds_dir, image):
    int8_ds = load_model(str(tiny_ds_dir), "cpu", quantization="int8")
    assert quantized_names(int8_ds.model) == quantized_names(int8_hf.model)
    requests = [GenerateRequest("g", "a lighthouse", n=2, params=GREEDY),
                UnderstandRequest("u", "Describe it.", [image], max_new_tokens=12, params=GREEDY)]
    hf, ds = run(Engine(int8_hf), requests), run(Engine(int8_ds), requests)
    assert hf.result("g").images.shape == (2, 64, 64, 3) and len(hf.result("u").token_ids) == 12
    # The same weights quantize to the same bytes whichever layout they came in.
    assert torch.equal(hf.result("g").tokens, ds.result("g").tokens)
    assert hf.result("u").token_ids == ds.result("u").token_ids


def test_quality_stays_within_the_measured_bounds(tiny_sharp_dir):
    full = load_model(str(tiny_sharp_dir), "cpu")
    int8 = load_model(str(tiny_sharp_dir), "cpu", quantization="int8")
    text = teacher_forced_text(full, int8, 32)
    codes = teacher_forced_codes(full, int8, 32)
    assert len(text.kl) >= 32 * 16 and len(codes.kl) == 32 * full.num_image_tokens
    assert text.mean_kl < 0.02 and text.top1_rate >= 0.85, (text.mean_kl, text.top1_rate)
    assert codes.mean_kl < 0.2 and codes.top1_rate >= 0.85, (codes.mean_kl, codes.top1_rate)
    assert text.mean_kl > 0  # quantized: not the same model by accident
    answers = [UnderstandRequest(f"u{i}", f"Question number {i}?", [], max_new_tokens=16, params=GREEDY)
               for i in range(8)]
    a, b = run(Engine(full), answers), run(Engine(int8), answers)
    same, _ = token_agreement([a.result(r.request_id).token_ids for r in answers],
                              [b.result(r.request_id).token_ids for r in answers])
    assert same >= 0.5, same


def test_seeded_outputs_are_the_same_alone_and_batched(int8_hf, image):
    gen = GenerateRequest("g", "a watercolor boat", n=2, params=SamplingParams(temperature=1.0, seed=123))
    und = UnderstandRequest("u", "Describe this image.", [image], max_new_tokens=10,
                            params=SamplingParams(temperature=1.0, seed=5))
    crowd = [GenerateRequest(f"c{i}", f"crowd {i}", n=2, params=SamplingParams(temperature=1.0, seed=i))
             for i in range(3)]
    crowd += [UnderstandRequest(f"d{i}", f"Other {i}", [image], max_new_tokens=8) for i in range(2)]
    alone = run(Engine(int8_hf), [gen, und])
    batched = run(Engine(int8_hf), [*crowd[:2], gen, *crowd[2:], und])
    assert torch.equal(alone.result("g").tokens, batched.result("g").tokens)
    assert np.array_equal(alone.result("g").images, batched.result("g").images)
    assert alone.result("u").token_ids == batched.result("u").token_ids


def test_janusflow_quantizes_its_lm_and_keeps_its_generator(tiny_flow_dir):
    full = load_model(str(tiny_flow_dir), "cpu")
    int8 = load_model(str(tiny_flow_dir), "cpu", quantization="int8")
    names = quantized_names(int8.model)
    assert "lm_head" in names and all(n == "lm_head" or n.startswith("model.language_model.layers.") for n in names)
    assert not any(is_quantized(p) for n, p in int8.model.named_parameters() if "vision_gen" in n)
    requests = [UnderstandRequest(f"u{i}", f"What is {i}?", [], max_new_tokens=12, params=GREEDY) for i in range(6)]
    requests.append(GenerateRequest("g", "a red car", n=1, steps=3, params=SamplingParams(seed=1)))
    a, b = run(Engine(full), requests), run(Engine(int8), requests)
    same, _ = token_agreement([a.result(f"u{i}").token_ids for i in range(6)],
                              [b.result(f"u{i}").token_ids for i in range(6)])
    assert same >= 0.5, same
    assert b.result("g").images.shape == a.result("g").images.shape


def test_fp8_and_unknown_quantizations_are_refused_with_the_reason(tiny_hf_dir):
    with pytest.raises(ModelLoadError, match="fp8 weights need a CUDA GPU of compute capability 8.9"):
        load_model(str(tiny_hf_dir), "cpu", quantization="fp8")
    with pytest.raises(ModelLoadError, match="unknown quantization 'int4'"):
        load_model(str(tiny_hf_dir), "cpu", quantization="int4")


def test_each_full_precision_weight_is_released_as_soon_as_it_is_quantized(tiny_hf_dir):
    """What keeps the load peak at the quantized model plus one layer: placing onto another device (cpu:0
    stands in for a GPU), no full-precision weight outlives its own quantization."""
    lm = load_model(str(tiny_hf_dir), "cpu")
    placed = place(lm.model, torch.device("cpu", 0), "int8")
    assert placed.quantized_layers == len(quantized_names(lm.model)) > 0
    assert placed.lingering == 0


def test_a_head_tied_to_the_embedding_stays_tied_and_unquantized(tiny_hf_dir):
    lm = load_model(str(tiny_hf_dir), "cpu")
    embedding = lm.model.model.language_model.embed_tokens
    lm.model.lm_head.weight = embedding.weight  # as a checkpoint with tie_word_embeddings loads
    place(lm.model, torch.device("cpu", 0), "int8")
    assert lm.model.lm_head.weight is embedding.weight and not is_quantized(embedding.weight)
    assert "model.generation_head.vision_head" in quantized_names(lm.model)
