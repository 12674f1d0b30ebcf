"""Quantized weights against full precision, side by side in one run: quality, memory and decode-step time.

    python -m bench.bench_quant                       # mid shape (fp32) and the 1B shape (bf16), on CPU
    python -m bench.bench_quant --shapes mid --quantization int8,bfloat16   # beside ordinary bf16 rounding
    python -m bench.bench_quant --shapes 7b --device cuda --quantization int8,fp8 --step-images 1,16,64 --compile

For each shape one random-weight model is built in memory and a second copy quantized with
`janus_core.models.quantize.place` (the server's own path). Reported per quantization:
- teacher-forced understanding tokens and image codes (>= 32 prompts each, bench/quant_quality.py): mean and
  largest KL(full || quantized) per position and top-1 agreement;
- greedy generated tokens through the engine: understanding answers (and, with --image-agreement, whole
  images of 576 codes) compared position by position and as the share before the first difference;
- weight bytes as stored (`stored_bytes`), the CUDA load peak of the quantized copy, and the engine's decode
  step with 8 images (16 CFG rows; `--step-images`) in flight.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

from bench.gpu.model import build_random_model, resolve_shape
from bench.quant_quality import prompts, teacher_forced_codes, teacher_forced_text, token_agreement
from janus_core import Engine, EngineConfig, GenerateRequest, UnderstandRequest
from janus_core.models.quantize import place, stored_bytes
from janus_core.sampling.params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def quantized_copy(lm, quantization: str):
    """A quantized copy placed as the server places one (on CUDA from a host copy, so `load_peak_bytes` is the
    allocator's peak of a real load); "bfloat16": a plain bf16 copy of an fp32 model, the scale of rounding."""
    if lm.device.type == "cuda":
        lm.model.to("cpu")
        model = copy.deepcopy(lm.model)
        lm.model.to(lm.device)
    else:
        model = copy.deepcopy(lm.model)
    if quantization == "bfloat16":
        model.to(device=lm.device, dtype=torch.bfloat16)
        return dataclasses.replace(lm, model=model, dtype=torch.bfloat16, weights_bytes=stored_bytes(model))
    placed = place(model, lm.device, quantization)
    return dataclasses.replace(lm, model=model, quantization=quantization, weights_bytes=placed.weights_bytes,
                               load_peak_bytes=placed.load_peak_bytes)


COMPILE = False  # --compile: every engine here compiles its decode step (CUDA)


def engine_for(lm, max_batch_size: int, cpu_pool: int) -> Engine:
    return Engine(lm, EngineConfig(max_batch_size=max_batch_size, compile=COMPILE,
                                   kv_cache_memory=cpu_pool if lm.device.type == "cpu" else None))


def run_engine(lm, requests) -> dict:
    engine = engine_for(lm, 64, 2**30)
    last: dict = {}
    for req in requests:
        engine.add_request(req, lambda out: last.__setitem__(out.request_id, out))
    engine.run_until_idle()
    return {rid: out.result for rid, out in last.items()}


def greedy_answers(lm, count: int, tokens: int) -> list[list[int]]:
    reqs = [UnderstandRequest(f"u{i}", p, [], max_new_tokens=tokens, params=GREEDY)
            for i, p in enumerate(prompts(count))]
    done = run_engine(lm, reqs)
    return [done[r.request_id].token_ids for r in reqs]


def greedy_images(lm, count: int) -> list[list[int]]:
    reqs = [GenerateRequest(f"g{i}", p, n=1, params=GREEDY) for i, p in enumerate(prompts(count, seed=3))]
    done = run_engine(lm, reqs)
    return [done[r.request_id].tokens[0].tolist() for r in reqs]


def decode_step_ms(lm, images: int, steps: int = 12) -> float:
    """Mean wall time of an engine step once `images` requests (2 rows each) are all decoding."""
    engine = engine_for(lm, 2 * images, 2**29)
    for i, p in enumerate(prompts(images, seed=5)):
        engine.add_request(GenerateRequest(f"t{i}", p, n=1, params=GREEDY), lambda _out: None)
    for _ in range(4):  # admit, prefill, warm up
        engine.step()
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    return (time.perf_counter() - start) / steps * 1e3


def measure(shape: str, device: str, dtype: torch.dtype, quantizations: list[str], prompts_n: int,
            code_positions: int | None, image_agreement: int, step_images: list[int]) -> list[dict]:
    full = build_random_model(shape, torch.device(device), dtype)
    rows = []
    full_bytes = stored_bytes(full.model)  # before an engine packs CPU linears in place
    quants = {q: quantized_copy(full, q) for q in quantizations}
    ref_answers = greedy_answers(full, prompts_n, 16)
    ref_images = greedy_images(full, image_agreement) if image_agreement else None
    ref_ms = {k: decode_step_ms(full, k) for k in step_images}
    for q, qlm in quants.items():
        text = teacher_forced_text(full, qlm, prompts_n)
        codes = teacher_forced_codes(full, qlm, prompts_n, code_positions)
        answers = token_agreement(ref_answers, greedy_answers(qlm, prompts_n, 16))
        images = token_agreement(ref_images, greedy_images(qlm, image_agreement)) if image_agreement else None
        rows.append({
            "shape": shape, "dtype": str(dtype).removeprefix("torch."), "quantization": q,
            "text_kl_mean": text.mean_kl, "text_kl_max": text.max_kl, "text_top1": text.top1_rate,
            "text_positions": len(text.kl), "code_kl_mean": codes.mean_kl, "code_kl_max": codes.max_kl,
            "code_top1": codes.top1_rate, "code_positions": len(codes.kl), "greedy_text": answers,
            "greedy_images": images, "weights_full": full_bytes, "weights_quant": qlm.weights_bytes,
            "step_ms_full": ref_ms, "step_ms_quant": {k: decode_step_ms(qlm, k) for k in step_images},
            "load_peak": qlm.load_peak_bytes,
        })
    return rows


def report(rows: list[dict]) -> None:
    print(f"{'shape':>5} {'dtype':>8} {'quant':>5} | {'text KL mean/max':>17} {'top-1':>6} | {'code KL mean/max':>17} "
          f"{'top-1':>6} | {'greedy text':>11} {'greedy img':>10} | {'weights GiB':>13} {'saved':>6} | load peak")
    for r in rows:
        gi = "-" if r["greedy_images"] is None else f"{r['greedy_images'][0]:.1%}"
        peak = "-" if r["load_peak"] is None else f"{r['load_peak'] / 2**30:.2f} GiB"
        print(f"{r['shape']:>5} {r['dtype']:>8} {r['quantization'][:5]:>5} | "
              f"{r['text_kl_mean']:>8.2e}/{r['text_kl_max']:<8.2e} {r['text_top1']:>6.1%} | "
              f"{r['code_kl_mean']:>8.2e}/{r['code_kl_max']:<8.2e} {r['code_top1']:>6.1%} | "
              f"{r['greedy_text'][0]:>11.1%} {gi:>10} | "
              f"{r['weights_full'] / 2**30:>5.2f} -> {r['weights_quant'] / 2**30:<5.2f} "
              f"{1 - r['weights_quant'] / r['weights_full']:>6.1%} | {peak}")
    print("KL: nats per position, full || quantized (teacher forced); top-1: argmax agreement; greedy: equal tokens "
          "position by position; load peak: CUDA allocator's peak while placing the quantized copy")
    print(f"{'shape':>5} {'quant':>5} | decode step ms, full -> quantized, by images in flight (2 CFG rows each)")
    for r in rows:
        steps = "  ".join(f"{k}: {r['step_ms_full'][k]:.1f} -> {r['step_ms_quant'][k]:.1f}" for k in r["step_ms_full"])
        print(f"{r['shape']:>5} {r['quantization'][:5]:>5} | {steps}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mid,1b", help="comma-separated: tiny, mid, 1b, 7b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 for tiny/mid on CPU, else bfloat16")
    parser.add_argument("--quantization", default="int8",
                        help="comma-separated: int8, fp8, and bfloat16 (an fp32 model's plain bf16 copy, for scale)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--step-images", default="8", help="images in flight for the step times, e.g. 1,16,64")
    parser.add_argument("--compile", action="store_true", help="compiled decode steps (CUDA; int8 fuses there)")
    args = parser.parse_args()
    global COMPILE
    COMPILE = args.compile
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        shape = resolve_shape(name.strip())
        small = shape in ("tiny", "mid")
        dtype = getattr(torch, args.dtype) if args.dtype else (
            torch.float32 if small and args.device == "cpu" else torch.bfloat16)
        # On 2 CPU cores the 1B shape gets its image codes teacher-forced over the first 64 positions and no
        # greedy image runs (576 steps of a 1B model in bf16 take tens of minutes there).
        cpu_big = args.device == "cpu" and not small
        rows += measure(shape, args.device, dtype, args.quantization.split(","), args.prompts,
                        64 if cpu_big else None, 0 if cpu_big else 8, [int(k) for k in args.step_images.split(",")])
        report(rows[-len(args.quantization.split(",")):])
    print()
    report(rows)


if __name__ == "__main__":
    main()
