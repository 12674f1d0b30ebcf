"""CPU linear layers: transformers' `F.linear` (MKL) against janus_core's oneDNN-packed weights, one run.

    PYTHONPATH=. python bench/bench_linear.py                       # mid shape, rows 1, 8, 16, 670
    PYTHONPATH=. python bench/bench_linear.py --shape janus-pro-1b --rows 1,8

Part 1 times every linear product of one LM forward pass (all layers' q/k/v/o/gate/up/down, then
the text head) for `rows` input rows, with fresh weights of the shape's sizes: the plain modules as
transformers runs them, then the same modules after `pack_linears`. A decode step runs a few rows
(weights are read once per step, so it is bandwidth-bound); a prefill runs hundreds (compute-bound).
Part 2 (`--model-dir`, or the shape's cached checkpoint) times a whole 8-row decode step of the
engine's runner with and without packing. Both sides run interleaved in this process; the script
prints medians and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.models import SHAPES, cached_model
from janus_core.attention.paged import DecodeBatch, row_tables
from janus_core.models.loader import load_model
from janus_core.sched.block_pool import BLOCK_SIZE
from janus_core.step.packed_linear import pack_linears, packing_supported
from janus_core.step.runner import ModelRunner


def lm_linears(shape: str) -> nn.ModuleList:
    s = SHAPES[shape]
    layers = []
    for _ in range(s.lm_layers):
        layers += [nn.Linear(s.lm_hidden, s.lm_hidden, bias=False) for _ in range(4)]  # q, k, v, o
        layers += [nn.Linear(s.lm_hidden, s.lm_intermediate, bias=False) for _ in range(2)]  # gate, up
        layers.append(nn.Linear(s.lm_intermediate, s.lm_hidden, bias=False))  # down
    layers.append(nn.Linear(s.lm_hidden, s.vocab, bias=False))  # text head
    return nn.ModuleList(layers).eval()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, alternating between them to share the machine's moods."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.inference_mode()
def bench_products(shape: str, rows: list[int], repeats: int) -> None:
    plain = lm_linears(shape)
    packed = lm_linears(shape)
    packed.load_state_dict(plain.state_dict())
    pack_linears(packed)
    weight_mb = sum(m.weight.numel() for m in plain) * 4 / 1e6
    print(f"## {shape}: {len(plain)} linear layers, {weight_mb:.0f} MB of fp32 weights per pass")
    print(f"{'rows':>6} {'F.linear_ms':>12} {'packed_ms':>10} {'speed-up':>9} {'packed_GB/s':>12}")
    for n in rows:
        inputs = {m.in_features: torch.randn(n, m.in_features) for m in plain}

        def run(mods: nn.ModuleList, inputs: dict[int, torch.Tensor] = inputs) -> Callable[[], object]:
            return lambda: [m(inputs[m.in_features]) for m in mods]

        got = interleaved({"plain": run(plain), "packed": run(packed)}, repeats if n < 100 else max(3, repeats // 4))
        print(f"{n:>6} {got['plain'] * 1e3:>12.2f} {got['packed'] * 1e3:>10.2f} {got['plain'] / got['packed']:>8.2f}x "
              f"{weight_mb / 1e3 / got['packed']:>12.1f}")


@torch.inference_mode()
def bench_decode_step(model_dir: Path, rows: int, context: int, repeats: int) -> None:
    runners = {}
    for packed in (False, True):
        lm = load_model(str(model_dir), device="cpu")
        runners["packed" if packed else "plain"] = ModelRunner(lm, pack_cpu_linears=packed)
    tables = row_tables(rows, context + 64, BLOCK_SIZE)
    kvs = {name: r.new_kv(rows * len(tables[0]), BLOCK_SIZE) for name, r in runners.items()}
    positions = torch.arange(context, context + rows)  # rows at slightly different lengths, as in a batch
    ids = torch.zeros((rows, 1), dtype=torch.long)

    def step(name: str) -> Callable[[], object]:
        r = runners[name]
        batch = DecodeBatch.for_rows(kvs[name], tables, positions.tolist())
        return lambda: r.text_logits(r.decode(batch, r.embed_text(ids), positions)).argmax(-1).tolist()

    got = interleaved({name: step(name) for name in runners}, repeats)
    print(f"\n## decode step of the engine's runner: {rows} rows at ~{context} cached positions ({model_dir})")
    print(f"plain {got['plain'] * 1e3:.1f} ms, packed {got['packed'] * 1e3:.1f} ms: "
          f"{got['plain'] / got['packed']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    parser.add_argument("--rows", default="1,8,16,670")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model-dir", help="checkpoint for the decode-step part (default: the shape's, cached)")
    parser.add_argument("--no-step", action="store_true", help="skip the decode-step part")
    args = parser.parse_args()
    if not packing_supported(torch.device("cpu"), torch.float32):
        raise SystemExit("this torch build has no oneDNN linear ops; nothing to compare")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_products(args.shape, [int(r) for r in args.rows.split(",")], args.repeats)
    if not args.no_step:
        bench_decode_step(cached_model(args.shape, args.model_dir), rows=8, context=700, repeats=args.repeats)


if __name__ == "__main__":
    main()
