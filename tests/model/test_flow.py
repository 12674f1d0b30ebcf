"""JanusFlow on the tiny checkpoint: the batched, cached engine against the official algorithm.

Generation: `tests.support.flow_reference` (DeepSeek's loop, full recompute, one request at a time, on its own
copy of the weights) and the engine agree on the final latents within fp32 tolerance (LATENT_ATOL)
and on the PNGs' pixels, for a mixed batch (prompts, n, CFG weights, step counts, a request joining
mid-run); a seeded request gives the same image alone and batched. Understanding: greedy tokens equal
`LlamaForCausalLM.generate(inputs_embeds=...)` on embeddings built as the official
`prepare_inputs_embeds` builds them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from janus_core import (
    Engine,
    EngineConfig,
    FailedOutput,
    FinishedOutput,
    GenerateRequest,
    ProgressOutput,
    UnderstandRequest,
)
from janus_core.engine.memory import blocks_for
from janus_core.models.loader import load_model
from janus_core.sampling.params import SamplingParams
from janus_core.text.processor import build_generation_ids, build_understanding_inputs
from tests.support.flow_checks import assert_same_pixels, noise
from tests.support.flow_reference import reference_latents, reference_pixels

# Largest |engine - reference| allowed on any latent value (latents are ~N(0, 1) plus the flow's drift).
# Measured: at most 3.3e-5 (the request with w = 5, |z| up to 7.5; ~4e-6 relative): the same fp32 arithmetic in
# another order (batched rows, KV read from
# the pool, the encoder run once per image instead of once per CFG row).
LATENT_ATOL = 1e-4


@pytest.fixture(scope="module")
def flow_lm(tiny_flow_dir):
    return load_model(str(tiny_flow_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ref_lm(tiny_flow_dir):
    """A second copy for the references: the engine packs its own model's linear layers in place."""
    return load_model(str(tiny_flow_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(flow_lm):
    return Engine(flow_lm, EngineConfig(kv_cache_memory=2**24, max_batch_size=16))


class Collector:
    def __init__(self) -> None:
        self.done: dict[str, FinishedOutput | FailedOutput] = {}
        self.progress: dict[str, list[tuple[int, int]]] = {}

    def __call__(self, out) -> None:
        if isinstance(out, ProgressOutput):
            self.progress.setdefault(out.request_id, []).append((out.step, out.total))
        elif isinstance(out, (FinishedOutput, FailedOutput)):
            self.done[out.request_id] = out


def flow_request(rid: str, prompt: str, n: int, weight: float, steps: int, seed: int) -> GenerateRequest:
    return GenerateRequest(rid, prompt, n=n, cfg_weight=weight, steps=steps, params=SamplingParams(seed=seed))


MIXED = [("a", "a red fox in the snow", 2, 2.0, 4, 11), ("b", "a cat", 1, 5.0, 3, 12),
         ("c", "a watercolor painting of a small boat, soft light", 3, 1.5, 5, 13)]
LATE = ("d", "a futuristic city skyline at night", 1, 0.0, 2, 14)


def test_mixed_batch_matches_the_official_algorithm(engine, ref_lm):
    sink = Collector()
    for rid, prompt, n, w, steps, seed in MIXED:
        engine.add_request(flow_request(rid, prompt, n, w, steps, seed), sink)
    engine.step()  # admits and prefills all three
    engine.step()  # their first ODE step, together
    engine.add_request(flow_request(*LATE), sink)  # joins between steps
    engine.run_until_idle()
    assert engine.pool.num_used == 0
    worst: list[float] = []
    for rid, prompt, n, w, steps, seed in [*MIXED, LATE]:
        out = sink.done[rid]
        assert isinstance(out, FinishedOutput), out
        z = reference_latents(ref_lm, build_generation_ids(ref_lm, prompt), noise(ref_lm, seed, n), w, steps)
        got = out.result.tokens
        assert got.shape == z.shape
        assert (got - z).abs().max().item() <= LATENT_ATOL, (rid, (got - z).abs().max().item())
        assert not torch.equal(z, noise(ref_lm, seed, n))  # the ODE moved the latents
        # The PNGs' pixels, against the reference's (its latents decoded one image at a time): within one
        # level, on at most 0.1% of values. Not bit-exact: fp32 convolutions and matmuls sum in another order
        # at another batch size, and a difference of 1e-6 sometimes crosses the uint8 truncation boundary
        # (2 of 24,576 values in this test when it was written).
        assert_same_pixels(out.result.images, reference_pixels(ref_lm, z))
        worst.append((got - z).abs().max().item())
        assert out.result.seed == seed
        assert sink.progress[rid] == [(k, steps) for k in range(1, steps + 1)]
    print("largest latent difference from the reference:", max(worst))


def test_a_seeded_request_gives_the_same_image_alone_and_batched(engine):
    alone = Collector()
    engine.add_request(flow_request("x", "a red car", 2, 2.0, 3, 99), alone)
    engine.run_until_idle()
    batched = Collector()
    engine.add_request(flow_request("y1", "a cat on a chair", 3, 4.0, 5, 1), batched)
    engine.add_request(flow_request("x", "a red car", 2, 2.0, 3, 99), batched)
    engine.add_request(flow_request("y2", "a red car", 1, 2.0, 3, 7), batched)
    engine.run_until_idle()
    a, b = alone.done["x"].result, batched.done["x"].result
    assert_same_pixels(a.images, b.images)
    assert (a.tokens - b.tokens).abs().max().item() <= LATENT_ATOL
    assert not np.array_equal(b.images[0], b.images[1])  # image 1 has its own noise
    assert not np.array_equal(batched.done["y2"].result.images[0], b.images[0])  # another seed, another image


def test_prompt_kv_is_held_once_per_request(engine, flow_lm):
    sink = Collector()
    engine.add_request(flow_request("k", "a mountain lake at sunrise", 4, 2.0, 3, 5), sink)
    engine.step()  # admitted and prefilled
    prompt = len(build_generation_ids(flow_lm, "a mountain lake at sunrise")) - 1
    # The conditional prompt and the unconditional BOS, for all 4 images and every step: nothing per image.
    assert engine.pool.num_used == blocks_for(prompt, engine.pool.block_size) + 1
    engine.run_until_idle()
    assert isinstance(sink.done["k"], FinishedOutput) and engine.pool.num_used == 0


def test_cancellation_stops_one_request_and_not_the_others(engine):
    sink = Collector()
    engine.add_request(flow_request("long", "a red fox", 2, 2.0, 50, 1), sink)
    engine.add_request(flow_request("short", "a cat", 1, 2.0, 4, 2), sink)
    for _ in range(3):
        engine.step()
    engine.cancel("long")
    engine.run_until_idle()
    assert isinstance(sink.done["long"], FailedOutput) and sink.done["long"].reason == "cancelled"
    assert len(sink.progress["long"]) < 10  # stopped well short of its 50 steps
    assert isinstance(sink.done["short"], FinishedOutput)
    assert engine.pool.num_used == 0


@pytest.mark.parametrize(("request_", "message"), [
    (GenerateRequest("p", "a cat", steps=3, params=SamplingParams(temperature=1.0), given=frozenset({"top_p"})),
     "top_p"),
    (GenerateRequest("t", "a cat", steps=3, given=frozenset({"temperature"})), "temperature"),
    (GenerateRequest("s0", "a cat", steps=0), "steps must be between 1 and 100"),
    (GenerateRequest("s1", "a cat", steps=101), "steps must be between 1 and 100"),
    (GenerateRequest("w", "a cat", steps=3, cfg_weight=-1.0), "cfg_weight"),
])
def test_flow_refuses_meaningless_or_bad_parameters(engine, request_, message):
    sink = Collector()
    engine.add_request(request_, sink)
    engine.run_until_idle()
    out = sink.done[request_.request_id]
    assert isinstance(out, FailedOutput) and out.reason == "invalid" and message in out.message


def test_vq_models_refuse_steps(tiny_ds_dir):
    eng = Engine(load_model(str(tiny_ds_dir), device="cpu"), EngineConfig(kv_cache_memory=2**22))  # its own copy
    sink = Collector()
    eng.add_request(GenerateRequest("v", "a cat", steps=10), sink)
    eng.run_until_idle()
    out = sink.done["v"]
    assert isinstance(out, FailedOutput) and out.reason == "invalid" and "steps" in out.message


def official_embeds(lm, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """`prepare_inputs_embeds` of DeepSeek's JanusFlow: SigLIP -> linear aligner, beg_of_und_embed first, written
    over the begin-of-image token and the placeholders (images_seq_mask)."""
    net = lm.model.model
    feats = net.vision_und_enc_aligner(net.vision_model(pixels).last_hidden_state)  # (n, 576, D)
    beg = net.beg_of_und_embed[0].detach().clone()
    images_embeds = torch.cat([beg.view(1, 1, -1).repeat(feats.shape[0], 1, 1), feats], dim=1)
    embeds = net.language_model.get_input_embeddings()(ids)
    seq_mask = (ids == lm.special["image"]) | (ids == lm.special["boi"])
    embeds[seq_mask] = images_embeds.reshape(-1, embeds.shape[-1])
    return embeds


@torch.inference_mode()
def test_understanding_greedy_equals_llama_generate_on_official_embeddings(engine, ref_lm):
    from transformers import LlamaForCausalLM

    config = ref_lm.model.config.text_config
    llama = LlamaForCausalLM(config).eval()
    state = {f"model.{k}": v for k, v in ref_lm.model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = ref_lm.model.lm_head.weight
    llama.load_state_dict(state)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    cases = [("What is in this image?", images[:1]), ("Describe both pictures.", images[1:3]),
             ("What colour is it?", [Image.new("RGB", (48, 80), "red")])]
    sink = Collector()
    for i, (prompt, imgs) in enumerate(cases):
        engine.add_request(UnderstandRequest(f"u{i}", prompt, imgs, max_new_tokens=24), sink)
    engine.run_until_idle()
    answers = set()
    for i, (prompt, imgs) in enumerate(cases):
        inputs = build_understanding_inputs(ref_lm, imgs, prompt)
        ids = torch.tensor([inputs.input_ids])
        embeds = official_embeds(ref_lm, ids, inputs.pixel_values)
        out = llama.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                             do_sample=False, eos_token_id=ref_lm.special["eos"], pad_token_id=ref_lm.special["eos"],
                             bos_token_id=ref_lm.special["bos"])[0].tolist()
        if out and out[-1] == ref_lm.special["eos"]:
            out = out[:-1]
        got = sink.done[f"u{i}"]
        assert isinstance(got, FinishedOutput)
        assert got.result.token_ids == out, prompt
        answers.add(tuple(out))
    assert len(answers) == len(cases)  # the answers depend on the images and prompts


def test_tiny_model_cli_writes_a_janusflow_checkpoint_and_a_vae(tmp_path, capsys):
    import json

    from server.cli import main

    out = tmp_path / "flow"
    assert main(["tiny-model", str(out), "--family", "janusflow", "--seed", "3"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "multi_modality"
    assert {"vision_und_enc_config", "vision_gen_enc_config", "vision_gen_dec_config", "language_config"} <= set(config)
    assert json.loads((out / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    lm = load_model(str(out), device="cpu")
    assert (lm.generator, lm.chat_format, lm.flow.grid, lm.flow.latent_size) == ("flow", "janus", 4, 8)
    assert main(["tiny-model", str(tmp_path / "hf"), "--family", "janusflow", "--format", "hf"]) == 2
    assert "DeepSeek's layout only" in capsys.readouterr().err


def test_loading_names_a_missing_weight_and_a_bad_vae(tiny_flow_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from janus_core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot load the VAE"):
        load_model(str(tiny_flow_dir), device="cpu", vae=str(tmp_path))  # a directory with no VAE in it
    broken = tmp_path / "broken"
    shutil.copytree(tiny_flow_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["beg_of_und_embed"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing weight.*beg_of_und_embed"):
        load_model(str(broken), device="cpu")


def test_vae_decode_off_the_model_loop_gives_the_same_images(flow_lm, engine):
    """The CUDA path (PixelDecoder on its own thread), forced on CPU: same pixels, answered in order."""
    from janus_core.step.pixels import PixelDecoder

    inline = Collector()
    for rid, prompt, n, w, steps, seed in MIXED:
        engine.add_request(flow_request(rid, prompt, n, w, steps, seed), inline)
    engine.run_until_idle()
    off = Engine(flow_lm, EngineConfig(kv_cache_memory=2**24, max_batch_size=16))
    off.batches["generate"].pixels = PixelDecoder(flow_lm.flow, off._notify)
    threaded = Collector()
    off.start()
    try:
        for rid, prompt, n, w, steps, seed in MIXED:
            off.add_request(flow_request(rid, prompt, n, w, steps, seed), threaded)
        deadline = time.time() + 60
        while len(threaded.done) < len(MIXED) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        off.stop(10)
    for rid, *_ in MIXED:
        a, b = inline.done[rid], threaded.done[rid]
        assert isinstance(b, FinishedOutput), b
        assert_same_pixels(a.result.images, b.result.images)  # requests may join at other steps here
    assert not off.batches["generate"].pending
