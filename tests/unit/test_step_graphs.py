"""`StepGraphs` without a GPU: buckets keyed by their arguments' shapes, inputs copied into each bucket's
buffers before a replay, results the caller's own, and a bucket that cannot be captured outside warm-up
running without a graph (tried once, logged)."""

from __future__ import annotations

import logging

import pytest
import torch

from janus_core.step.graphs import StepGraphs


def step(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return ids[:, None].float() * 10 + table.float().sum(dim=1, keepdim=True)


def args(rows: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 100, (rows,), generator=gen), "table": torch.randint(0, 9, (rows, width),
                                                                                          generator=gen)}


def test_each_bucket_is_its_arguments_shapes_and_replays_the_latest_inputs():
    graphs = StepGraphs(step, torch.device("cpu"))
    for rows, width in [(8, 4), (2, 4), (8, 4), (8, 6)]:  # a wider block table is a bucket of its own
        for seed in range(3):
            a = args(rows, width, seed)
            torch.testing.assert_close(graphs.run(a), step(**a))
    assert graphs.rows() == [8, 2, 8]


def test_a_result_is_not_overwritten_by_the_next_replay():
    graphs = StepGraphs(step, torch.device("cpu"))
    first = graphs.run(args(4, 3, 0))
    kept = first.clone()
    graphs.run(args(4, 3, 1))
    torch.testing.assert_close(first, kept)


def test_a_bucket_that_cannot_be_captured_runs_without_a_graph(monkeypatch, caplog):
    graphs = StepGraphs(step, torch.device("cpu"))
    tries = []

    def refuse(self, a):
        tries.append(a["ids"].shape[0])
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraphs, "capture", refuse)
    with caplog.at_level(logging.INFO, logger="janus_core.step.graphs"):
        for seed in range(3):
            a = args(4, 3, seed)
            torch.testing.assert_close(graphs.run(a), step(**a))
    assert tries == [4], "the capture was retried"
    assert "that bucket runs without a graph" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph")
def test_a_captured_graph_replays_new_inputs_on_cuda():
    graphs = StepGraphs(step, torch.device("cuda"))
    for seed in range(3):
        a = {name: t.cuda() for name, t in args(4, 3, seed).items()}
        torch.testing.assert_close(graphs.run(a), step(**a))
