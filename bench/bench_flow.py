"""JanusFlow benchmark: the engine's batched flow generation against DeepSeek's loop one request at a time.

    PYTHONPATH=. python bench/bench_flow.py                          # mid shape, CPU, 8 concurrent requests
    PYTHONPATH=. python bench/bench_flow.py --shape tiny --steps 3   # a smoke run in seconds

The reference is the tests' oracle (`tests.support.flow_reference`, written from `demo/app_janusflow.py`): per
request, 2 rows (cond, uncond), a full forward pass of the LM over prompt + 577 step tokens at every
Euler step, then the VAE; it runs on its own copy of the weights (the engine packs its model's linear
layers in place on CPU). The engine gets `--concurrency` requests at once (different prompts and seeds,
n = 1 each) and runs them batched: prompt KV once per request, the step tokens of every request in one
forward pass per step, one VAE call. Printed: images/s of each, the ratio (wall and process CPU time),
and the largest latent difference between the two for the same requests (a check that both did the same
work). The reference is timed on `--reference-requests` requests; its images/s at any concurrency is
1 / its time per request (a one-at-a-time server).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.models import write_once
from janus_core import Engine, EngineConfig, FailedOutput, FinishedOutput, GenerateRequest
from janus_core.models.device import resolve_dtype
from janus_core.models.loader import LoadedModel, load_model
from janus_core.sampling.params import SamplingParams, image_seeds
from janus_core.sampling.sampler import make_generator
from janus_core.text.processor import build_generation_ids
from janus_core.tiny.flow import FlowShape, write_tiny_flow_model
from tests.support.flow_reference import reference_latents, reference_pixels  # the tests' oracle, unchanged

# The Janus-Pro `mid` shape's LM (bench/models.py) with the real image geometry: 384 px, 48x48x4 latents,
# 576 latent tokens; a narrower ShallowUViT (256 channels, the real one 768) and VAE (64 channels per block).
FLOW_SHAPES = {
    "tiny": FlowShape(),
    "mid": FlowShape(lm_hidden=512, lm_layers=8, lm_heads=8, lm_intermediate=1408, vocab=16384, vision_hidden=384,
                     vision_layers=6, vision_heads=6, uvit_width=256, uvit_layers=2, vae_width=64, image_size=384,
                     max_context=2048),
    # JanusFlow-1.3B's LM, SigLIP-L-sized vision tower and UViT widths; the VAE's blocks all 256 wide (SDXL's decoder
    # goes 512, 512, 256, 128): for GPU runs.
    "1.3b": FlowShape(lm_hidden=2048, lm_layers=24, lm_heads=16, lm_intermediate=5632, vocab=102400,
                      vision_hidden=1024, vision_layers=24, vision_heads=16, uvit_width=768, uvit_layers=2,
                      vae_width=256, image_size=384, max_context=4096),
}
PROMPTS = ["a photo of a mountain lake at sunrise", "a red car", "a watercolor painting of a small boat, soft light",
           "a futuristic city skyline at night with neon lights", "a cat on a chair", "a bowl of fruit on a table",
           "an old lighthouse in a storm", "a field of sunflowers under a blue sky"]


def cached_flow_model(shape: str, device: str = "cpu", dtype: str = "auto") -> Path:
    """A random checkpoint of `shape`, written once under the temp dir. On CUDA it is built on the device in
    the run's dtype (bf16 by default): seconds and half the bytes, where a 1.3B-shape fp32 build on the host
    takes minutes."""
    on_cuda = device.startswith("cuda")
    torch_dtype = resolve_dtype(dtype, torch.device(device)) if on_cuda else torch.float32
    out = Path(tempfile.gettempdir()) / f"janus-bench-janusflow-{shape}-{str(torch_dtype).removeprefix('torch.')}"

    def write(folder: Path) -> None:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            with torch.device(device if on_cuda else "cpu"):
                write_tiny_flow_model(folder, shape=FLOW_SHAPES[shape])
        except Exception as exc:  # an init this torch cannot run there: the host's fp32 build, slower
            if not on_cuda:
                raise
            print(f"building the checkpoint on {device} failed ({exc}); building it on the host in float32")
            shutil.rmtree(folder, ignore_errors=True)
            torch.set_default_dtype(torch.float32)
            write_tiny_flow_model(folder, shape=FLOW_SHAPES[shape])
        finally:
            torch.set_default_dtype(previous)

    return write_once(out, write)


def matmul_flops(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 5) -> float:
    """The machine's FLOP/s on one (m x k) @ (k x n) product of the LM's sizes: the compute roofline."""
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * m * k * n / best


def lm_flops_per_image_step(lm: LoadedModel) -> float:
    """Matrix-product FLOPs of the LM layers for one image's ODE step: 2 rows x (1 + g*g) tokens (attention aside)."""
    t = lm.model.config.text_config
    per_token = t.num_hidden_layers * (4 * t.hidden_size ** 2 + 3 * t.hidden_size * t.intermediate_size)
    return 2 * 2 * (1 + lm.flow.grid ** 2) * per_token


def count_params(lm: LoadedModel) -> int:
    return sum(p.numel() for p in lm.model.parameters())


def noise(lm: LoadedModel, seed: int) -> torch.Tensor:
    p = lm.flow
    shape = (p.latent_channels, p.latent_size, p.latent_size)
    return torch.stack([torch.randn(shape, generator=make_generator(s, lm.device), device=lm.device)
                        for s in image_seeds(seed, 1)])


def run_reference(ref: LoadedModel, prompts: list[str], steps: int, cfg_weight: float) -> tuple[float, float, list]:
    """Seconds (wall, CPU) per request and the final latents, one request after another."""
    wall, cpu = time.perf_counter(), time.process_time()
    latents = []
    for i, prompt in enumerate(prompts):
        z = reference_latents(ref, build_generation_ids(ref, prompt), noise(ref, 1000 + i), cfg_weight, steps)
        reference_pixels(ref, z)
        latents.append(z)
    return (time.perf_counter() - wall) / len(prompts), (time.process_time() - cpu) / len(prompts), latents


def run_engine(engine: Engine, prompts: list[str], steps: int, cfg_weight: float) -> tuple[float, float, dict]:
    """Wall and CPU seconds for all of `prompts` submitted at once, and each request's final latents."""
    done: dict[str, torch.Tensor] = {}

    def sink(out) -> None:
        if isinstance(out, FinishedOutput):
            done[out.request_id] = out.result.tokens
        elif isinstance(out, FailedOutput):
            raise RuntimeError(f"{out.request_id} failed: {out.message}")

    wall, cpu = time.perf_counter(), time.process_time()
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerateRequest(f"r{i}", prompt, cfg_weight=cfg_weight, steps=steps,
                                           params=SamplingParams(seed=1000 + i)), sink)
    engine.run_until_idle()
    return time.perf_counter() - wall, time.process_time() - cpu, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mid", choices=list(FLOW_SHAPES))
    parser.add_argument("--model", help="a JanusFlow checkpoint directory instead of a random --shape")
    parser.add_argument("--steps", type=int, default=10, help="Euler steps per image (the model's default is 30)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--reference-requests", type=int, default=2)
    parser.add_argument("--cfg-weight", type=float, default=2.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    path = args.model or str(cached_flow_model(args.shape, args.device, args.dtype))
    ref = load_model(path, device=args.device, dtype=args.dtype)  # stock: loaded before any engine packs layers
    lm = load_model(path, device=args.device, dtype=args.dtype)
    engine = Engine(lm, EngineConfig(max_batch_size=max(16, args.concurrency), kv_cache_memory=2**28))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]
    print(f"JanusFlow {args.model or args.shape}: {count_params(ref) / 1e6:.0f}M parameters, {lm.flow.grid ** 2} "
          f"latent tokens, {lm.image_size}x{lm.image_size} images, {args.steps} steps, cfg {args.cfg_weight}, "
          f"{lm.device} {lm.dtype}, {torch.get_num_threads()} threads")

    run_reference(ref, prompts[:1], 1, args.cfg_weight)  # warm-up: first calls allocate and pick kernels
    run_engine(engine, prompts[:2], 1, args.cfg_weight)
    ref_wall, ref_cpu, ref_latents = run_reference(ref, prompts[:args.reference_requests], args.steps,
                                                   args.cfg_weight)
    eng_wall, eng_cpu, eng_latents = run_engine(engine, prompts, args.steps, args.cfg_weight)

    worst = max((eng_latents[f"r{i}"] - z.cpu()).abs().max().item() for i, z in enumerate(ref_latents))
    ref_ips, eng_ips = 1.0 / ref_wall, args.concurrency / eng_wall
    print(f"reference, one request at a time: {ref_wall:.2f} s/image ({ref_cpu:.2f} CPU s) = {ref_ips:.3f} images/s")
    print(f"engine, {args.concurrency} concurrent: {eng_wall:.2f} s for {args.concurrency} images "
          f"({eng_cpu:.2f} CPU s) = {eng_ips:.3f} images/s")
    print(f"ratio: x{eng_ips / ref_ips:.2f} wall, x{ref_cpu * args.concurrency / eng_cpu:.2f} CPU time")
    print(f"largest latent difference engine - reference over {len(ref_latents)} requests: {worst:.2e}")
    t = lm.model.config.text_config
    peak = matmul_flops(lm.device, lm.dtype, 2 * (1 + lm.flow.grid ** 2), t.hidden_size, t.intermediate_size)
    roof = peak / (lm_flops_per_image_step(lm) * args.steps)
    print(f"compute roofline: {peak / 1e9:.0f} GFLOP/s on one image-step's MLP product = {roof:.3f} images/s "
          f"(LM matrix products only); engine at {eng_ips / roof:.0%} of it, reference at {ref_ips / roof:.0%}")


if __name__ == "__main__":
    main()
