"""Engine benchmark: janus-server's batching engine against the reference implementations, one run.

    PYTHONPATH=. python bench/bench_engine.py --shape mid               # CPU, ~10 minutes on 2 cores
    PYTHONPATH=. python bench/bench_engine.py --shape tiny --quick      # a smoke run in seconds
    PYTHONPATH=. python bench/bench_engine.py --shape janus-pro-7b --device cuda --dtype bfloat16 --compile

Generation: images/s and p50/p95 latency at each concurrency (c requests with different prompts
and seeds arrive together) for the engine, transformers' `generate(generation_mode="image")` one
request at a time, and the official loop (one prompt, parallel_size = c); ms per decode step and
its fraction of the roofline (LM weight bytes per step / measured copy bandwidth).
Understanding: tokens/s and TTFT (128 new tokens, a different image per request) against
transformers' `generate` one at a time; TTFT of a second question on the same image with and
without prefix reuse. One-at-a-time references are timed on a few requests and their latencies at
concurrency c computed as c requests queued in front of a serial server. `x_hf_cpu` is the same ratio
in process CPU seconds, which holds up better than wall time on a machine shared with other jobs.

The references run on their own copy of the model (`ref`), loaded before the engine exists: the
engine packs the linear layers of the model it is given in place (CPU fp32), and a reference on
those weights would be ours, not transformers'.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from bench.models import cached_model, lm_weight_bytes
from bench.references import (
    PROMPTS,
    hf_generate_image,
    hf_understand,
    mean,
    memcpy_bandwidth,
    official_loop,
    percentile,
    serial_latencies,
)
from janus_core import (
    Engine,
    EngineConfig,
    FailedOutput,
    FinishedOutput,
    GenerateRequest,
    TokenOutput,
    UnderstandRequest,
)
from janus_core.models.loader import LoadedModel, load_model
from janus_core.sampling.params import SamplingParams


@dataclass
class Clock:
    started: float = field(default_factory=time.perf_counter)
    first: dict[str, float] = field(default_factory=dict)
    done: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def __call__(self, out) -> None:
        now = time.perf_counter() - self.started
        if isinstance(out, TokenOutput):
            self.first.setdefault(out.request_id, now)
            self.tokens[out.request_id] = self.tokens.get(out.request_id, 0) + 1
        elif isinstance(out, FailedOutput):
            raise RuntimeError(f"{out.request_id} failed: {out.message}")
        elif isinstance(out, FinishedOutput):
            self.done[out.request_id] = now


def run_engine(engine: Engine, requests: list) -> Clock:
    """Submit `requests` together and step the engine on this thread until all are answered."""
    clock = Clock()
    for req in requests:
        engine.add_request(req, clock)
    engine.run_until_idle()
    return clock


def images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def row(*cells) -> str:
    return "  ".join(f"{c:>12}" if not isinstance(c, float) else f"{c:>12.3f}" for c in cells)


# --- generation -------------------------------------------------------------------------------------


def bench_generation(lm: LoadedModel, ref: LoadedModel, engine: Engine, levels: list[int], ref_requests: int,
                     bandwidth: float, official: bool) -> dict[int, float]:
    steps = lm.num_image_tokens
    roof_ms = 1000 * lm_weight_bytes(ref.model) / bandwidth
    hf_generate_image(ref, PROMPTS[0], seed=0)  # warm-up
    run_engine(engine, [GenerateRequest("warm", PROMPTS[0], params=SamplingParams(temperature=1.0, seed=0))])
    engine.stats()
    ref_times = []
    cpu_started = time.process_time()
    for i in range(ref_requests):
        started = time.perf_counter()
        hf_generate_image(ref, PROMPTS[i % len(PROMPTS)], seed=i)
        ref_times.append(time.perf_counter() - started)
    ref_one, ref_cpu = mean(ref_times), (time.process_time() - cpu_started) / ref_requests
    print(f"\n## generation ({steps} steps/image; roofline step {roof_ms:.2f} ms = LM weights / copy bandwidth)")
    print(f"transformers generate one at a time: {1 / ref_one:.3f} images/s, {1000 * ref_one / steps:.2f} ms/step")
    print(row("concurrency", "img/s", "x_hf", "p50_s", "p95_s", "hf_p50_s", "hf_p95_s", "ms/step", "roofline",
              "official/s", "x_official", "x_hf_cpu"))
    ratios = {}
    for c in levels:
        reqs = [GenerateRequest(f"g{c}-{i}", PROMPTS[i % len(PROMPTS)] + f" #{i}",
                                params=SamplingParams(temperature=1.0, seed=i)) for i in range(c)]
        cpu_started = time.process_time()
        clock = run_engine(engine, reqs)
        cpu_per_image = (time.process_time() - cpu_started) / c
        makespan = max(clock.done.values())
        lat = list(clock.done.values())
        step_s = [s for kind, s in engine.stats().step_seconds if kind == "generate"]
        ms_step = 1000 * mean(step_s)
        hf_lat = serial_latencies(ref_one, c)
        off_rate = float("nan")
        if official:
            started = time.perf_counter()
            official_loop(ref, PROMPTS[0], parallel_size=c)
            off_rate = c / (time.perf_counter() - started)
        rate = c / makespan
        ratios[c] = rate * ref_one
        print(row(c, rate, rate * ref_one, percentile(lat, 50), percentile(lat, 95), percentile(hf_lat, 50),
                  percentile(hf_lat, 95), ms_step, roof_ms / ms_step, off_rate, rate / off_rate,
                  ref_cpu / cpu_per_image))
    return ratios


# --- understanding ----------------------------------------------------------------------------------


def bench_understanding(lm: LoadedModel, ref: LoadedModel, engine: Engine, levels: list[int], ref_requests: int,
                        max_new_tokens: int) -> dict[int, float]:
    prompt = "Describe this image in detail."
    pics = images(max(levels) + ref_requests + 1, lm.image_size, seed=1)
    hf_understand(ref, pics[-1:], prompt, max_new_tokens=4)  # warm-up
    cpu_started = time.process_time()
    refs = [hf_understand(ref, [pics[-2 - i]], prompt, max_new_tokens=max_new_tokens) for i in range(ref_requests)]
    ref_cpu_rate = sum(r.tokens for r in refs) / (time.process_time() - cpu_started)
    ref_rate = sum(r.tokens for r in refs) / sum(r.seconds for r in refs)
    ref_one, ref_ttft = mean([r.seconds for r in refs]), mean([r.ttft for r in refs])
    print(f"\n## understanding ({max_new_tokens} new tokens, one {lm.image_size}px image per request, greedy)")
    print(f"transformers generate one at a time: {ref_rate:.1f} tokens/s, TTFT {ref_ttft:.3f} s, "
          f"{mean([r.tokens for r in refs]):.0f} tokens/request")
    print(row("concurrency", "tok/s", "x_hf", "ttft_p50", "ttft_p95", "hf_ttft_p50", "hf_ttft_p95", "lat_p50",
              "x_hf_cpu"))
    ratios = {}
    for c in levels:
        # Fresh images per level: no vision or prefix cache hits inflate the figure.
        reqs = [UnderstandRequest(f"u{c}-{i}", prompt, [pics[i]], max_new_tokens=max_new_tokens) for i in range(c)]
        engine.clear_caches()
        cpu_started = time.process_time()
        clock = run_engine(engine, reqs)
        cpu_rate = sum(clock.tokens.values()) / (time.process_time() - cpu_started)
        rate = sum(clock.tokens.values()) / max(clock.done.values())
        ttft = list(clock.first.values())
        hf_ttft = serial_latencies(ref_one, c, first_offset=ref_ttft)
        ratios[c] = rate / ref_rate
        print(row(c, rate, rate / ref_rate, percentile(ttft, 50), percentile(ttft, 95), percentile(hf_ttft, 50),
                  percentile(hf_ttft, 95), percentile(list(clock.done.values()), 50), cpu_rate / ref_cpu_rate))
    return ratios


def bench_second_question(lm: LoadedModel, ref: LoadedModel, config: EngineConfig) -> float:
    pic = images(1, lm.image_size, seed=99)
    first = UnderstandRequest("q1", "Describe this image in detail.", pic, max_new_tokens=1)
    second = UnderstandRequest("q2", "What color is the car in the picture?", pic, max_new_tokens=1)
    reuse = Engine(lm, config)
    run_engine(reuse, [UnderstandRequest("warm", "hi", images(1, lm.image_size, 98), max_new_tokens=1)])
    t_first = run_engine(reuse, [first]).first["q1"]
    t_second = run_engine(reuse, [second]).first["q2"]
    cold_cfg = EngineConfig(**{**config.__dict__, "prefix_caching": False, "vision_cache_bytes": 0})
    cold = Engine(lm, cold_cfg)
    run_engine(cold, [UnderstandRequest("warm", "hi", images(1, lm.image_size, 98), max_new_tokens=1)])
    run_engine(cold, [first])
    t_cold = run_engine(cold, [second]).first["q2"]
    hf = hf_understand(ref, pic, second.prompt, max_new_tokens=1).ttft
    print("\n## second question on the same image (TTFT, seconds)")
    print(row("first", "second", "no_reuse", "transformers", "first/second", "noreuse/reuse", "hf/reuse"))
    print(row(t_first, t_second, t_cold, hf, t_first / t_second, t_cold / t_second, hf / t_second))
    print(f"prefix hits {reuse.stats().prefix_cache_hits}, tokens reused {reuse.stats().prefix_tokens_reused}")
    return t_first / t_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mid", help="tiny | mid | janus-pro-1b | janus-pro-7b")
    parser.add_argument("--model-dir", help="checkpoint directory (default: a random one of --shape, cached)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--ref-requests", type=int, default=2, help="one-at-a-time reference requests timed")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--only", default="gen,und,prefix")
    parser.add_argument("--no-official", action="store_true", help="skip the official-loop reference")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="concurrency 1,4; 16 new tokens; 1 reference")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.max_new_tokens, args.ref_requests = "1,4", 16, 1
    levels = [int(c) for c in args.concurrency.split(",")]
    path = cached_model(args.shape, args.model_dir)
    ref = load_model(str(path), args.device, args.dtype)  # stock: the engine never sees this copy
    lm = load_model(str(path), args.device, args.dtype)
    config = EngineConfig(max_batch_size=max(levels), max_context=min(lm.max_context, 1024),
                          max_generation_prompt=64, compile=args.compile)
    engine = Engine(lm, config)
    engine.warm_up()
    bandwidth = memcpy_bandwidth(lm.device)
    params = sum(p.numel() for p in ref.model.parameters())  # packed weights are buffers, not parameters
    print(f"# {args.shape}: {params / 1e6:.1f}M parameters on {lm.device} ({lm.dtype}), "
          f"torch threads {torch.get_num_threads()}, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    summary = []
    if "gen" in args.only:
        r = bench_generation(lm, ref, engine, levels, args.ref_requests, bandwidth, not args.no_official)
        summary += [f"generation throughput vs transformers at c={c}: {x:.2f}x" for c, x in r.items()]
    if "und" in args.only:
        r = bench_understanding(lm, ref, engine, levels, args.ref_requests, args.max_new_tokens)
        summary += [f"understanding tokens/s vs transformers at c={c}: {x:.2f}x" for c, x in r.items()]
    if "prefix" in args.only:
        summary.append(f"second-question TTFT, first/second: {bench_second_question(lm, ref, config):.2f}x")
    print("\n## summary (targets at mid-size, CPU, c=8: generation >= 4x, understanding >= 3x, TTFT >= 3x)")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
