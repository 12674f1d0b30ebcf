"""Paged attention without a model: the grouped decode attention over block tables equals SDPA row by row."""

from __future__ import annotations

import torch


def test_grouped_attention_over_shared_and_own_runs_equals_row_by_row():
    """Rows of a shared prefix run plus evenly spaced own runs of different lengths: one strided call per run,
    merged by log-sum-exp, equals SDPA over each row's gathered keys."""
    from janus_core.attention.paged import DecodeBatch, PagedKV

    kv = PagedKV(layers=1, kv_heads=4, num_blocks=40, block_size=16, head_dim=8, dtype=torch.float32,
                 device=torch.device("cpu"))
    for buf in (*kv.k, *kv.v):
        buf.normal_()
    tables = [[0, 1, 5 + 4 * b, 6 + 4 * b, 7 + 4 * b] for b in range(4)]  # two shared blocks, then each row's own
    positions = [70, 75, 66, 79]
    batch = DecodeBatch.for_rows(kv, tables, positions)
    assert len(batch.groups) == 1 and [p.step for p in batch.groups[0].parts] == [0, 64]
    q, new = torch.randn(4, 4, 1, 8), torch.randn(4, 4, 1, 8)
    got = batch.attend(0, q, new, new, 8 ** -0.5)
    for b, (table, p) in enumerate(zip(tables, positions, strict=True)):
        slots = torch.tensor([table[i // 16] * 16 + i % 16 for i in range(p + 1)])
        expected = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1], kv.k[0][None, :, slots],
                                                                    kv.v[0][None, :, slots])
        assert torch.allclose(got[b:b + 1], expected, atol=1e-5), b
