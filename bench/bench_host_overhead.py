"""Host overhead per decode step: the engine's time outside the forward pass, at 1, 16 and 64 images.

    PYTHONPATH=. python bench/bench_host_overhead.py                           # tiny shape, CPU, ~1 minute
    PYTHONPATH=. python bench/bench_host_overhead.py --before /path/to/older/checkout

A decode step of the engine is: build the step's inputs, run the forward (the LM layers and the
head), sample, and update the requests from the chosen tokens (progress, streaming). "forward" is
the time inside the runner's `decode` and head calls; "host" is the rest of the engine's step
(scheduling, input building, sampling, copies back, bookkeeping), over the steps that only decode.
Each level is one generation request with n images, sampled (temperature 1.0, seeded), and as many
understanding rows (sampled, one prompt each).

`--before DIR` runs this same script on another checkout (e.g. a worktree of an earlier commit) in a
subprocess and prints both side by side with the ratio after/before: the measurement is the same
code on both sides, only `janus_core` differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

LEVELS = [1, 16, 64]


def use_tree(path: str) -> None:
    """Import `janus_core` from the checkout `path`, not from the installed (editable) package."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    sys.path.insert(0, path)


def measure(shape: str, levels: list[int], steps: int, repeats: int) -> dict[str, dict[str, float]]:
    import torch

    from bench.models import cached_model
    from janus_core import Engine, EngineConfig, FailedOutput, GenerateRequest, UnderstandRequest
    from janus_core.models.loader import load_model
    from janus_core.sampling.params import SamplingParams

    torch.manual_seed(0)
    lm = load_model(str(cached_model(shape)), device="cpu", dtype="float32")
    engine = Engine(lm, EngineConfig(max_batch_size=max(levels), max_context=min(lm.max_context, 1024)))
    runner = engine.runner
    inside = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - started
        return wrapper

    # Instance attributes shadow the methods: every call of the runner's forward and heads is timed, and
    # every engine step (the same on any version of the engine: `run_until_idle` calls `self.step`).
    for name in ("decode", "image_logits", "text_logits"):
        setattr(runner, name, timed(getattr(runner, name)))
    engine_step = engine.step

    results: dict[str, dict[str, float]] = {}
    current: dict[str, list[float]] = {"total": [], "forward": []}

    def timed_step():
        inside[0] = 0.0
        started = time.perf_counter()
        busy = engine_step()
        if busy:
            current["total"].append(time.perf_counter() - started)
            current["forward"].append(inside[0])
        return busy

    engine.step = timed_step

    def sink(out):
        if isinstance(out, FailedOutput):
            raise RuntimeError(out.message)

    def run(label: str, make_requests, repeats: int) -> None:
        best = None
        for _ in range(repeats):  # the quietest of a few runs: the machine may be shared
            current["total"], current["forward"] = [], []
            for req in make_requests():
                engine.add_request(req, sink)
            engine.run_until_idle()
            # Decode steps only: not the first ones (admission and prefill, warming allocators) nor the
            # last (the requests finish: VQ decoding, results). Medians, against the odd slow step.
            total, forward = current["total"][3:-1], current["forward"][3:-1]
            host = [t - f for t, f in zip(total, forward, strict=True)]
            r = {"steps": len(total), "step_ms": 1000 * median(total), "forward_ms": 1000 * median(forward),
                 "host_ms": 1000 * median(host)}
            if best is None or r["host_ms"] < best["host_ms"]:
                best = r
        results[label] = best

    params = SamplingParams(temperature=1.0, seed=7)
    run("warm-up", lambda: [GenerateRequest("warm", "a red car", n=2, params=params)], 1)
    for n in levels:
        run(f"generate n={n}", lambda n=n: [GenerateRequest(f"g{n}", "a red car", n=n, params=params)], repeats)
    for n in levels:
        run(f"understand {n} rows", lambda n=n: [
            UnderstandRequest(f"u{n}-{i}", f"Describe image {i}.", [], max_new_tokens=steps,
                              params=SamplingParams(temperature=1.0, seed=i)) for i in range(n)], repeats)
    results.pop("warm-up")
    return results


def table(after: dict, before: dict | None) -> str:
    head = ["workload", "step_ms", "forward_ms", "host_ms"]
    if before:
        head += ["before_host_ms", "host_after/before"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in after.items():
        cells = [label, f"{r['step_ms']:.2f}", f"{r['forward_ms']:.2f}", f"{r['host_ms']:.2f}"]
        if before:
            b = before.get(label)
            cells += [f"{b['host_ms']:.2f}", f"{r['host_ms'] / b['host_ms']:.2f}"] if b else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--steps", type=int, default=64, help="new tokens per understanding row")
    parser.add_argument("--levels", type=int, nargs="+", default=LEVELS)
    parser.add_argument("--repeats", type=int, default=3, help="runs per level; the quietest is reported")
    parser.add_argument("--before", help="another checkout to measure with the same script, side by side")
    parser.add_argument("--json", action="store_true", help="print the measurement as JSON only")
    parser.add_argument("--tree", help=argparse.SUPPRESS)  # set by --before for its subprocess
    args = parser.parse_args()
    if args.tree:
        use_tree(args.tree)
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    before = None
    if args.before:
        cmd = [sys.executable, __file__, "--shape", args.shape, "--steps", str(args.steps), "--json",
               "--repeats", str(args.repeats),
               "--tree", str(Path(args.before).resolve()), "--levels", *map(str, args.levels)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        before = json.loads(out.strip().splitlines()[-1])
    after = measure(args.shape, args.levels, args.steps, args.repeats)
    if args.json:
        import janus_core

        print(json.dumps({"tree": str(Path(janus_core.__file__).parents[1]), **after}))
        return
    print(f"# host overhead per decode step ({args.shape} shape, CPU, OMP_NUM_THREADS={torch_threads or 'default'})")
    print(table(after, before))


if __name__ == "__main__":
    main()
