"""The static decode step compiles on CPU with inductor: one graph, no breaks, no recompilation as
positions move, one compilation per batch bucket, and the same logits and keys as the eager paged step.

This is what `--compile` needs on CUDA, caught without a GPU: a graph break, a guard on a value
that changes every step, a quantized weight that does not trace, or a wrong kernel (inductor's CPU flex
attention misread KV views at a storage offset, hence one allocation per layer in `PagedKV`).
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

from janus_core.attention.flex import bucket
from janus_core.attention.paged import DecodeBatch, PrefillBatch
from janus_core.models.loader import load_model
from janus_core.step.runner import ModelRunner
from janus_core.step.static import StaticDecode, tables_to_tensors

TABLES = [[0, 1, 2], [5, 6, 7], [10, 3, 12], [20, 21, 22], [30, 31, 9]]  # consecutive and scattered blocks
LENGTHS = [20, 33, 17, 40, 25]


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_static_decode_step_compiles_once_per_bucket_and_equals_eager(tiny_hf_dir, quantization):
    """int8: torchao's quantized weights trace into the same single graph (what `--compile` fuses on CUDA)."""
    lm = load_model(str(tiny_hf_dir), "cpu", quantization=quantization)
    runner = ModelRunner(lm, pack_cpu_linears=False)
    kv = runner.new_kv(num_blocks=40, block_size=16)
    scratch = (kv.num_blocks - 1) * kv.block_size  # a block no row holds: where padding rows write
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for table, length in zip(TABLES, LENGTHS, strict=True):
            ids = torch.randint(0, 100, (1, length), generator=gen)
            runner.prefill(PrefillBatch.for_rows(kv, [table], 0, length), runner.embed_text(ids), 0)

    compilations = []

    def counting_inductor(graph, inputs):
        compilations.append(len(graph.graph.nodes))
        return compile_fx(graph, inputs)

    torch._dynamo.reset()
    static = StaticDecode(runner, kv, "text")
    step = torch.compile(static.step, backend=counting_inductor, fullgraph=True, dynamic=False)
    for rows in (3, 5):  # buckets of 4 and 8 rows
        for k in range(3):  # three steps: the positions move on
            positions = [n + k for n in LENGTHS[:rows]]
            ids = torch.randint(0, 100, (rows,), generator=gen)
            before = [t.clone() for t in (*kv.k, *kv.v)]
            with torch.inference_mode():
                args = tables_to_tensors(kv, TABLES[:rows], positions, bucket(rows), scratch)
                padded = torch.cat([ids, torch.zeros(bucket(rows) - rows, dtype=torch.long)])
                got = step(padded, **args)[:rows]
                written = [t.clone() for t in (*kv.k, *kv.v)]
                for buf, saved in zip((*kv.k, *kv.v), before, strict=True):
                    buf.copy_(saved)
                eager = runner.text_logits(runner.decode(DecodeBatch.for_rows(kv, TABLES[:rows], positions),
                                                         runner.embed_text(ids[:, None]), torch.tensor(positions)))
            torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
            for ours, theirs in zip(written, (*kv.k, *kv.v), strict=True):
                torch.testing.assert_close(ours[:, :scratch], theirs[:, :scratch], rtol=1e-5, atol=1e-5)
    assert len(compilations) == 2, compilations  # one per bucket; none as positions moved
    assert not torch._dynamo.utils.counters["graph_break"]
