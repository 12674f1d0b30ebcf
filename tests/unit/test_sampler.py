"""The batched sampler: exact in distribution, transformers' top-p set, exact greedy, batch-invariant draws.

Frequencies are checked with Pearson's chi-square against the distribution computed independently
(softmax of logits / temperature, transformers' `TopPLogitsWarper` for the kept set), at a critical
value with p = 1e-4: a correct sampler fails it once in ten thousand runs, and every draw is seeded,
so a run that passes passes forever.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from janus_core.attention.paged import _general_groups, _single_run_groups
from janus_core.sampling.params import SamplingParams
from janus_core.sampling.philox import philox4x32, uniforms
from janus_core.sampling.sampler import RowSampling, sample, stream_uniforms, top_p_filter, warp
from janus_core.step.rows import DecodeRows, RowValues

CPU = torch.device("cpu")


def _logits(rows: int, vocab: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_philox_matches_random123_known_answers():
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in vectors:
        assert tuple(int(w) for w in philox4x32(counter, key)) == expected


PINNED_SEED_7 = [0.9545971285563128, 0.40696040388408333, 0.006075128975906285, 0.3901990670720374]


def test_streams_are_pinned():
    """The uniforms of a seed are part of the API from this release: seeded outputs must not drift."""
    assert stream_uniforms(7, 3).tolist() == pytest.approx(
        uniforms(7, np.arange(3, dtype=np.uint64)).tolist(), abs=0)
    first = stream_uniforms(7, 4).tolist()
    assert [round(u, 12) for u in first] == [round(u, 12) for u in PINNED_SEED_7]
    u = stream_uniforms(123, 200_000).numpy()
    assert u.min() > 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.003 and abs(u.var() - 1 / 12) < 0.002
    assert stream_uniforms(123, 5, start=10).tolist() == u[10:15].tolist()  # any step, in any order


def _chi_square_critical(dof: int, z: float = 3.719) -> float:
    """Wilson-Hilferty: the chi-square quantile for a standard normal quantile z (3.719: p = 1e-4)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_frequencies_follow_the_distribution(temperature, top_p):
    vocab, draws = 24, 40_000
    logits = _logits(1, vocab, seed=3)
    scaled = logits / temperature
    kept = ~TopPLogitsWarper(top_p)(None, scaled.clone()).isinf()[0] if top_p < 1 else torch.ones(vocab, dtype=bool)
    probs = torch.softmax(scaled[0].masked_fill(~kept, float("-inf")), dim=-1).double()
    # Many rows of the same logits, each with its own step of one stream: draws of one sequence over time.
    rows = RowSampling.of([SamplingParams(temperature=temperature, top_p=top_p)] * draws,
                          stream_uniforms(2024, draws), CPU)
    chosen = sample(logits.expand(draws, -1).contiguous(), rows)
    counts = torch.bincount(chosen, minlength=vocab).double()
    assert counts[~kept].sum() == 0  # nothing outside the nucleus, ever
    expected = probs[kept] * draws
    stat = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert stat < _chi_square_critical(int(kept.sum()) - 1), (stat, counts.tolist())
    if top_p < 1:
        assert int(kept.sum()) < vocab  # the test exercised a real cut


def test_top_p_keeps_what_transformers_keeps():
    logits = _logits(6, 500, seed=1, scale=3.0)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.1, 0.95, 0.7])
    ours = top_p_filter(logits, top_p)
    for i, p in enumerate(top_p.tolist()):
        ref = TopPLogitsWarper(p)(None, logits[i:i + 1].clone())
        assert torch.equal(ours[i].isinf(), ref[0].isinf()), p
        assert torch.equal(ours[i][~ours[i].isinf()], logits[i][~ref[0].isinf()])


def test_greedy_rows_are_the_argmax_beside_sampled_rows():
    logits = _logits(8, 300, seed=5)
    params = [SamplingParams() if i % 2 else SamplingParams(temperature=1.0, top_p=0.8) for i in range(8)]
    chosen = sample(logits, RowSampling.of(params, torch.rand(8, dtype=torch.float64), CPU))
    best = logits.argmax(dim=-1)
    assert torch.equal(chosen[1::2], best[1::2])
    all_greedy = RowSampling.of([SamplingParams()] * 8, torch.full((8,), 0.5, dtype=torch.float64), CPU)
    assert torch.equal(sample(logits, all_greedy), best)


def test_a_rows_draw_does_not_depend_on_the_batch():
    logits = _logits(16, 400, seed=9)
    params = [SamplingParams(temperature=0.5 + i / 10, top_p=1.0 if i % 3 else 0.85) for i in range(16)]
    u = torch.cat([stream_uniforms(100 + i, 1, start=i) for i in range(16)])
    together = sample(logits, RowSampling.of(params, u, CPU))
    alone = [int(sample(logits[i:i + 1], RowSampling.of([params[i]], u[i:i + 1], CPU))[0]) for i in range(16)]
    assert together.tolist() == alone
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = sample(logits[order], RowSampling.of([params[i] for i in order], u[order], CPU))
    assert shuffled.tolist() == together[order].tolist()


def test_rows_read_their_own_stream_at_their_own_step():
    rows = DecodeRows(capacity=8, horizon=32, device=CPU)
    a, b = object(), object()
    streams = {a: stream_uniforms(1, 32)[None].repeat(2, 1), b: stream_uniforms(2, 32)[None]}
    steps = {a: 5, b: 0}

    def values(seq):
        return RowValues(last=torch.zeros(len(streams[seq]), dtype=torch.long), position=10, step=steps[seq],
                         temperature=1.0, top_p=0.9 if seq is b else 1.0, greedy=False, uniforms=streams[seq])

    rows.sync([a], lambda s: 2, values)
    assert rows.sampling().uniform.tolist() == [streams[a][0, 5].item()] * 2
    rows.advance(torch.tensor([3, 4]))
    rows.sync([b, a], lambda s: 2 if s is a else 1, values)  # b joins in front; a's rows move, keep their state
    view = rows.sampling()
    assert view.uniform.tolist() == [streams[b][0, 0].item(), streams[a][0, 6].item(), streams[a][0, 6].item()]
    assert rows.last[:3].tolist() == [0, 3, 4] and rows.host_position[:3].tolist() == [10, 11, 11]
    assert view.top_p_rows.tolist() == [0]
    assert not rows.sync([b, a], lambda s: 2 if s is a else 1, values)  # same rows: nothing to do


def test_single_run_grouping_equals_the_general_one():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 12))
        if rng.random() < 0.5:
            starts = sorted(rng.choice(np.arange(0, 400, 4), n, replace=False).tolist())
        else:
            first, gap = int(rng.choice([0, 16, 32])), int(rng.choice([16, 32, 48]))
            starts = [first + i * gap for i in range(n)]
        runs = [[(s, s + int(rng.choice([rng.integers(1, 40), 16])))] for s in starts]
        slots = int(rng.choice([300, 500, 800]))

        def shape(groups):
            return [(g.lo, g.hi, [(p.start, p.step, p.length, None if p.mask is None else p.mask.tolist())
                                  for p in g.parts]) for g in groups]

        assert shape(_single_run_groups([r[0] for r in runs], slots, CPU)) == shape(_general_groups(runs, slots, CPU))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_decode_rows_successive_steps_follow_the_distribution(top_p):
    """An understanding row as the engine drives it: its stream read step by step through `DecodeRows`
    (beside a greedy neighbour), advanced in place after each draw."""
    vocab, steps, temperature = 12, 6000, 0.8
    logits = _logits(1, vocab, seed=11)
    rows = DecodeRows(capacity=4, horizon=steps, device=CPU)
    me, neighbour = object(), object()

    def values(seq):
        greedy = seq is neighbour
        return RowValues(last=torch.zeros(1, dtype=torch.long), position=0, step=0, temperature=temperature,
                         top_p=top_p, greedy=greedy, uniforms=stream_uniforms(99, 1 if greedy else steps)[None])

    rows.sync([neighbour, me], lambda s: 1, values)
    both = logits.expand(2, -1)
    drawn = []
    for _ in range(steps):
        chosen = sample(both, rows.sampling())
        assert int(chosen[0]) == int(logits.argmax())
        drawn.append(int(chosen[1]))
        rows.advance(chosen)
    scaled = logits / temperature
    kept = ~TopPLogitsWarper(top_p)(None, scaled.clone()).isinf()[0] if top_p < 1 else torch.ones(vocab, dtype=bool)
    probs = torch.softmax(scaled[0].masked_fill(~kept, float("-inf")), dim=-1).double()
    counts = torch.bincount(torch.tensor(drawn), minlength=vocab).double()
    assert counts[~kept].sum() == 0
    expected = probs[kept] * steps
    stat = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert stat < _chi_square_critical(int(kept.sum()) - 1), (stat, counts.tolist())
    assert drawn == sample(logits.expand(steps, -1).contiguous(), RowSampling.of(
        [SamplingParams(temperature=temperature, top_p=top_p)] * steps, stream_uniforms(99, steps), CPU)).tolist()


# --- vLLM's extensions: top-k, min-p, the repetition penalty, min_tokens ---------------------------------------


@pytest.mark.parametrize(("top_k", "min_p", "top_p"), [(5, 0.0, 1.0), (0, 0.2, 1.0), (7, 0.05, 0.9), (500, 0.0, 1.0)])
def test_top_k_min_p_keep_transformers_sets(top_k, min_p, top_p):
    """The tokens left to draw from equal transformers' warpers applied in its order (temperature, top-k,
    top-p, min-p); a top_k past the vocabulary keeps everything."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper

    logits, temperature = _logits(1, 60, seed=21, scale=3.0), 0.7
    params = SamplingParams(temperature=temperature, top_k=top_k, min_p=min_p, top_p=top_p)
    rows = RowSampling.of([params], torch.full((1,), 0.5, dtype=torch.float64), CPU)
    expected = logits / temperature
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    if min_p:
        expected = MinPLogitsWarper(min_p)(None, expected)
    assert torch.equal(warp(logits, rows).isinf(), expected.isinf())
    drawn = sample(logits.expand(2000, -1).contiguous(), RowSampling.of([params] * 2000, stream_uniforms(5, 2000), CPU))
    assert not expected[0, drawn].isinf().any()


def test_repetition_penalty_equals_transformers_and_moves_the_argmax():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = _logits(2, 50, seed=3)
    history = [[int(logits[0].argmax()), 4, 4, 9], [int(logits[1].argmin()), 7]]
    params = [SamplingParams(repetition_penalty=1.7), SamplingParams(repetition_penalty=0.6)]
    rows = RowSampling.of(params, torch.full((2,), 0.5, dtype=torch.float64), CPU, history=history, vocab=50)
    for r in range(2):
        ids = torch.tensor([history[r]])
        expected = RepetitionPenaltyLogitsProcessor(params[r].repetition_penalty)(ids, logits[r:r + 1].clone())
        assert int(sample(logits, rows)[r]) == int(expected.argmax())
    assert int(sample(logits, rows)[0]) != history[0][0]  # the best token, seen, lost its place


def test_min_tokens_masks_eos_until_reached_and_ignore_eos_does_not():
    logits = _logits(3, 40, seed=8)
    eos = int(logits[0].argmax())
    logits[:, eos] = 50.0  # EOS is every row's best by far
    params = [SamplingParams(min_tokens=3), SamplingParams(temperature=1.0, min_tokens=3), SamplingParams()]
    u = torch.full((3,), 0.5, dtype=torch.float64)
    early = sample(logits, RowSampling.of(params, u, CPU, produced=[2, 2, 0], eos=eos)).tolist()
    assert early[0] != eos and early[1] != eos and early[2] == eos
    assert sample(logits, RowSampling.of(params, u, CPU, produced=[3, 3, 0], eos=eos)).tolist() == [eos] * 3


def test_decode_rows_carry_the_extensions_like_a_fresh_view():
    """The engine's path (rows written once, then advanced on the device: the penalty's token sets grow, the EOS
    mask lifts at min_tokens) draws what `RowSampling.of` from the host state draws, row by row."""
    vocab, eos = 30, 2
    logits = _logits(3, vocab, seed=17)
    params = {"a": SamplingParams(temperature=0.9, top_k=6, min_tokens=4, repetition_penalty=1.3, seed=1),
              "b": SamplingParams(repetition_penalty=2.0, min_tokens=2),
              "c": SamplingParams(temperature=1.1, min_p=0.1, top_p=0.9, seed=3)}
    streams = {k: stream_uniforms(p.seed or 0, 40)[None] for k, p in params.items()}
    history = {"a": [5, 6], "b": [6, 7, 7], "c": [1]}
    rows = DecodeRows(capacity=4, horizon=40, device=CPU, vocab=vocab, eos=eos)

    def values(key):
        p = params[key]
        return RowValues(last=torch.tensor([history[key][-1]]), position=len(history[key]), step=0,
                         temperature=p.temperature, top_p=p.top_p, greedy=p.greedy, uniforms=streams[key],
                         top_k=p.top_k, min_p=p.min_p, penalty=p.repetition_penalty, min_tokens=p.min_tokens,
                         history=torch.tensor(history[key]))

    order = ["b", "a", "c"]
    produced = dict.fromkeys(order, 0)
    for step in range(8):
        if step == 3:
            order = ["c", "a"]  # b leaves, the survivors move
        rows.sync(order, lambda k: 1, values)
        chosen = sample(logits[:len(order)], rows.sampling())
        for i, key in enumerate(order):
            fresh = RowSampling.of([params[key]], streams[key][:, produced[key]], CPU, produced=[produced[key]],
                                   history=[history[key]], vocab=vocab, eos=eos)
            assert int(chosen[i]) == int(sample(logits[i:i + 1], fresh)[0]), (step, key)
            history[key].append(int(chosen[i]))
            produced[key] += 1
        rows.advance(chosen)
