"""Where understanding time goes on CPU, and how close each part is to its bound, in one run.

    PYTHONPATH=. python bench/bench_cpu_bounds.py                 # mid shape, ~2 minutes on 2 cores

1. Compute ceiling: GFLOP/s of a 2048^3 sgemm, and of the LM's gate projection at prefill sizes
   (670 rows, one request; 5360 rows, eight requests batched) through `F.linear`.
2. Prefill: SigLIP + the whole prompt through the LM for one 384 px image, the engine's runner
   against transformers' forward (DynamicCache, logits for the last position), interleaved.
3. Decode attention at 8 rows x ~700 cached positions over the engine's cache layout: SDPA with a
   bool mask (what the engine passes), a float mask, no mask, and explicit matmuls + softmax;
   the KV bytes read per step and the bandwidth that implies.
4. One 8-row decode step of the engine's runner under torch.profiler: linears, attention, the rest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, JanusForConditionalGeneration

from bench.bench_linear import interleaved
from bench.models import SHAPES, cached_model
from janus_core.attention.paged import DecodeBatch, PagedKV, PrefillBatch, row_tables
from janus_core.models.compat import cache_arg
from janus_core.models.loader import load_model
from janus_core.sched.block_pool import BLOCK_SIZE
from janus_core.step.runner import ModelRunner
from janus_core.text.processor import build_understanding_inputs


def compute_ceiling(shape: str, repeats: int) -> None:
    s = SHAPES[shape]
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    got = interleaved({"sgemm": lambda: a @ b}, repeats)
    print(f"## compute: 2048^3 sgemm {2 * 2048 ** 3 / got['sgemm'] / 1e9:.0f} GFLOP/s")
    weight = torch.randn(s.lm_intermediate, s.lm_hidden)
    for rows in (670, 5360):
        x = torch.randn(rows, s.lm_hidden)
        t = interleaved({"linear": lambda x=x: F.linear(x, weight)}, repeats)["linear"]
        print(f"   F.linear {rows} x {s.lm_hidden} -> {s.lm_intermediate}: "
              f"{2 * rows * s.lm_hidden * s.lm_intermediate / t / 1e9:.0f} GFLOP/s")


@torch.inference_mode()
def prefill(model_dir: Path, repeats: int) -> None:
    reference = JanusForConditionalGeneration.from_pretrained(model_dir).eval()
    lm = load_model(str(model_dir), device="cpu")
    runner = ModelRunner(lm)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8))
    inputs = build_understanding_inputs(lm, [image], "Describe this image in detail.")
    ids, pixels = torch.tensor([inputs.input_ids]), inputs.pixel_values
    image_mask = (ids == lm.model.config.image_token_id).unsqueeze(-1)
    tables = row_tables(1, ids.shape[1], BLOCK_SIZE)
    batch = PrefillBatch.for_rows(runner.new_kv(len(tables[0]), BLOCK_SIZE), tables, 0, ids.shape[1])

    def ours() -> torch.Tensor:
        embeds = runner.embed_text(ids).masked_scatter(image_mask, runner.vision_features(pixels))
        return runner.text_logits(runner.prefill(batch, embeds))

    def theirs() -> torch.Tensor:
        cache = DynamicCache(config=reference.config.text_config)
        out = reference(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), use_cache=True,
                        logits_to_keep=1, **cache_arg(reference, cache))
        return out.logits[:, -1]

    assert ours().argmax().item() == theirs().argmax().item()
    got = interleaved({"ours": ours, "transformers": theirs, "vision": lambda: runner.vision_features(pixels)},
                      repeats)
    print(f"\n## prefill of one 384 px image + prompt ({ids.shape[1]} tokens), medians of {repeats}")
    print(f"   engine runner {got['ours']:.3f} s, transformers {got['transformers']:.3f} s "
          f"(of which SigLIP + aligner {got['vision']:.3f} s)")


@torch.inference_mode()
def decode_attention(shape: str, repeats: int, rows: int = 8, length: int = 708) -> None:
    s = SHAPES[shape]
    heads, head_dim = s.lm_heads, s.lm_hidden // s.lm_heads
    k = torch.randn(s.lm_layers, rows, heads, 2048, head_dim)  # the fixed rows of before (L, R, H, S, D)
    v = torch.randn_like(k)
    q = torch.randn(rows, heads, 1, head_dim)
    positions = torch.arange(length - rows, length)
    visible = (torch.arange(length)[None, :] <= positions[:, None])[:, None, None, :]
    additive = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))

    def sdpa(mask: torch.Tensor | None):
        return lambda: [F.scaled_dot_product_attention(q, k[i, :, :, :length], v[i, :, :, :length], attn_mask=mask)
                        for i in range(s.lm_layers)]

    def matmuls():
        return [torch.softmax(q @ k[i, :, :, :length].transpose(-1, -2) * head_dim ** -0.5 + additive, -1)
                @ v[i, :, :, :length] for i in range(s.lm_layers)]

    # The engine's paged pool: (L, H, slots, D), each row on its own consecutive blocks, attended in place.
    tables = row_tables(rows, length, BLOCK_SIZE)
    pool = PagedKV(layers=s.lm_layers, kv_heads=heads, num_blocks=rows * len(tables[0]), block_size=BLOCK_SIZE,
                   head_dim=head_dim, dtype=torch.float32, device=torch.device("cpu"))
    pool.k.normal_()
    pool.v.normal_()
    # Evenly spaced rows are one strided SDPA call; the same rows in reverse order are one call each.
    together = DecodeBatch.for_rows(pool, tables, positions.tolist())
    apart = DecodeBatch.for_rows(pool, tables[::-1], positions.tolist()[::-1])
    assert len(together.groups) == 1 and len(apart.groups) == rows
    new_k, new_v = torch.randn(rows, heads, 1, head_dim), torch.randn(rows, heads, 1, head_dim)

    def paged(batch: DecodeBatch):
        return lambda: [batch.attend(i, q, new_k, new_v, head_dim ** -0.5) for i in range(s.lm_layers)]

    got = interleaved({"bool mask": sdpa(visible), "float mask": sdpa(additive), "no mask": sdpa(None),
                       "matmuls": matmuls, "paged group": paged(together), "paged per row": paged(apart)},
                      repeats)
    kv_bytes = 2 * s.lm_layers * rows * heads * length * head_dim * 4
    print(f"\n## decode attention, {rows} rows x {length} positions x {s.lm_layers} layers "
          f"({kv_bytes / 1e6:.0f} MB of fp32 KV per step)")
    for name, t in got.items():
        print(f"   {name:10s} {t * 1e3:6.2f} ms  {kv_bytes / t / 1e9:5.1f} GB/s")


@torch.inference_mode()
def decode_step_profile(model_dir: Path, rows: int = 8, context: int = 700) -> None:
    lm = load_model(str(model_dir), device="cpu")
    runner = ModelRunner(lm)
    tables = row_tables(rows, context + 64, BLOCK_SIZE)
    kv = runner.new_kv(rows * len(tables[0]), BLOCK_SIZE)
    positions = torch.arange(context, context + rows)
    ids = torch.zeros((rows, 1), dtype=torch.long)
    batch = DecodeBatch.for_rows(kv, tables, positions.tolist())

    def step():
        return runner.text_logits(runner.decode(batch, runner.embed_text(ids), positions)).argmax(-1).tolist()

    for _ in range(5):
        step()
    steps = 10
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values()) / steps / 1e3
    linears = sum(t for key, t in self_us.items() if "linear" in key or key in ("aten::addmm", "aten::mm"))
    attention = sum(t for key, t in self_us.items() if "scaled_dot_product" in key)
    print(f"\n## one {rows}-row decode step of the engine's runner at ~{context} positions (torch.profiler, "
          f"self CPU time, mean of {steps})")
    linear_ms, attention_ms = linears / steps / 1e3, attention / steps / 1e3
    print(f"   total {total:.1f} ms: linears {linear_ms:.1f} ms, attention {attention_ms:.1f} ms, "
          f"everything else {total - linear_ms - attention_ms:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    parser.add_argument("--model-dir", help="checkpoint (default: the shape's, cached under the temp dir)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model_dir = cached_model(args.shape, args.model_dir)
    print(f"# {args.shape} at {model_dir}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    compute_ceiling(args.shape, args.repeats)
    prefill(model_dir, args.repeats)
    decode_attention(args.shape, args.repeats)
    decode_step_profile(model_dir)


if __name__ == "__main__":
    main()
