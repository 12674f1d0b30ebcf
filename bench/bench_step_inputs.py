"""The static decode step's inputs per step: host time and bytes sent to the device, this tree against another.

    git worktree add /tmp/before c681d10                      # e.g. the commit before compact block tables
    PYTHONPATH=. python bench/bench_step_inputs.py --before /tmp/before
    PYTHONPATH=. python bench/bench_step_inputs.py --device cuda --blocks 19000

Each step of the static step (`--compile`, `--cuda-graphs`) turns the rows' block tables and positions into
tensors (`janus_core.step.static.tables_to_tensors`) and sends them to the device. Measured here for rows of
40 random distinct blocks in a pool of `--blocks` blocks (19,000: a Janus-Pro-1B pool on an 80 GB GPU), at
16, 64 and 128 rows (8, 32, 64 images with CFG): the median milliseconds of one call (the copy to the device
included, synchronised, on CUDA) and the bytes of the tensors it returns. `--before DIR` loads DIR's
`janus_core/step/static.py` (another checkout) and times its `tables_to_tensors` on the same inputs, side by side.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from janus_core.attention.paged import PagedKV
from janus_core.step import static

ROWS = (16, 64, 128)
IMAGE_ROW_BLOCKS = 68  # the image head's table width at 512 prompt tokens + 576 codes


def load_before(tree: Path):
    spec = importlib.util.spec_from_file_location("before_static", tree / "janus_core" / "step" / "static.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tables_to_tensors


def time_ms(fn, args: tuple, device: torch.device, repeats: int) -> tuple[float, int]:
    """Median ms of `fn(*args)` (synchronised on CUDA) and the bytes of the tensors it returns."""
    out = fn(*args)
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times), sum(t.numel() * t.element_size() for t in out.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=19000, help="blocks in the KV pool")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--before", type=Path, help="another checkout: time its tables_to_tensors too")
    args = parser.parse_args()
    device = torch.device(args.device)
    kv = PagedKV(layers=1, kv_heads=1, num_blocks=args.blocks, block_size=16, head_dim=8, dtype=torch.float32,
                 device=device)
    rng = np.random.default_rng(0)
    before = load_before(args.before) if args.before else None
    print(f"pool of {args.blocks} blocks, rows of 40 blocks, {device}; median of {args.repeats} calls")
    print(f"{'rows':>5} {'ms':>8} {'bytes':>10}" + (f" {'before ms':>10} {'bytes':>10} {'ms x':>6}" if before else ""))
    for rows in ROWS:
        tables = [rng.choice(args.blocks - 1, 40, replace=False).tolist() for _ in range(rows)]
        positions = rng.integers(16 * 30, 16 * 40, rows).tolist()
        scratch = (args.blocks - 1) * 16
        inputs = (kv, tables, positions, rows, scratch)
        ms, size = time_ms(static.tables_to_tensors, (*inputs, IMAGE_ROW_BLOCKS), device, args.repeats)
        line = f"{rows:>5} {ms:>8.3f} {size:>10}"
        if before:
            old_ms, old_size = time_ms(before, inputs, device, args.repeats)
            line += f" {old_ms:>10.3f} {old_size:>10} {old_ms / ms:>6.1f}"
        print(line)


if __name__ == "__main__":
    main()
