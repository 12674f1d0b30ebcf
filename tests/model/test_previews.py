"""Previews through the engine, in-process on tiny checkpoints: where they fall, what they show, that they change
nothing else, and that a busy decoder skips them instead of holding anything up."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from janus_core import Engine, EngineConfig, FinishedOutput, GenerateRequest, PreviewOutput, SamplingParams
from janus_core.engine.previews import preview_steps
from janus_core.models.loader import load_model
from janus_core.step.pixels import NEUTRAL, decode_images, decode_rows


@pytest.fixture(scope="module")
def lm384(tmp_path_factory):
    """576 codes a 24 x 24 grid, as the real model's: steps long enough for previews to come back in time."""
    from janus_core.tiny.janus import write_tiny_model

    return load_model(str(write_tiny_model(tmp_path_factory.mktemp("tiny-384"), "hf", seed=0, image_size=384)),
                      device="cpu")


def _run(lm, requests, **config) -> dict[str, list]:
    engine = Engine(lm, EngineConfig(**config))
    outs: dict[str, list] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r, outs[r.request_id].append)
    engine.run_until_idle()
    return outs


def _request(rid: str, seed: int, n: int = 1, previews: int = 0) -> GenerateRequest:
    return GenerateRequest(rid, "a red square", n=n, params=SamplingParams(temperature=1.0, seed=seed),
                           previews=previews)


def test_preview_steps_are_evenly_spaced_inside_the_run():
    assert preview_steps(3, 576) == [144, 288, 432]
    assert preview_steps(1, 576) == [288]
    assert preview_steps(8, 16) == [2, 4, 5, 7, 9, 11, 12, 14]
    assert preview_steps(8, 4) == [1, 2, 3]  # fewer steps than previews: one per step at most
    assert preview_steps(2, 1) == [] and preview_steps(0, 576) == []


def test_decode_rows_shows_the_rows_so_far_and_grey_below(lm384):
    codes = torch.randint(0, 200, (2, 576), generator=torch.Generator().manual_seed(0))
    assert np.array_equal(decode_rows(lm384, codes), decode_images(lm384, codes))  # every row: the image itself
    partial = decode_rows(lm384, codes[:, :300])  # 12 whole rows of 24 (and 12 codes of the 13th, not shown)
    assert partial.shape == (2, 384, 384, 3)
    assert (partial[:, 12 * 16:] == NEUTRAL).all()
    assert (partial[:, :12 * 16] != NEUTRAL).mean() > 0.9
    assert (decode_rows(lm384, codes[:, :23]) == NEUTRAL).all()  # not one whole row yet


def test_previews_come_in_order_and_change_no_image(lm384):
    with_previews = _run(lm384, [_request("a", 5, n=2, previews=3), _request("b", 6)], preview_share=1.0)
    without = _run(lm384, [_request("a", 5, n=2), _request("b", 6)])
    previews = [o for o in with_previews["a"] if isinstance(o, PreviewOutput)]
    assert 1 <= len(previews) <= 3
    assert [p.step for p in previews] == sorted({p.step for p in previews}) and previews[0].step >= 144
    for p in previews:
        assert p.images.shape == (2, 384, 384, 3) and p.images.dtype == np.uint8
        rows = p.step // 24
        assert (p.images[:, rows * 16:] == NEUTRAL).all()
    assert not any(isinstance(o, PreviewOutput) for o in with_previews["b"])  # it asked for none
    for rid in ("a", "b"):
        final, plain = with_previews[rid][-1], without[rid][-1]
        assert isinstance(final, FinishedOutput) and isinstance(plain, FinishedOutput)
        assert np.array_equal(final.result.images, plain.result.images)
        assert torch.equal(final.result.tokens, plain.result.tokens)
    assert with_previews["a"].index(previews[-1]) < len(with_previews["a"]) - 1  # all before the answer


def test_a_busy_decoder_skips_previews_and_holds_nothing_up(lm384):
    """The decoder blocks on its first preview until the request has ended: the engine runs the request to its
    end meanwhile, starts no second decode (nothing queues), and the stale preview is dropped."""
    engine = Engine(lm384, EngineConfig(preview_share=1.0))
    batch = engine.batches["generate"]
    release, calls = threading.Event(), []
    render = batch.render

    def slow_render(snapshot):
        calls.append(snapshot.shape)
        assert release.wait(60)
        return render(snapshot)

    batch.render = slow_render
    outs: list = []
    engine.add_request(_request("a", 1, previews=8), outs.append)
    engine.run_until_idle()  # returns with the decoder still blocked: nothing waited for it
    assert isinstance(outs[-1], FinishedOutput) and engine.previews._thread.is_alive()
    release.set()
    engine.previews._thread.join(60)
    engine.step()  # collects the late preview: its request is gone, so it goes nowhere
    assert len(calls) == 1 and not any(isinstance(o, PreviewOutput) for o in outs)


def test_a_zero_share_makes_no_previews(lm384):
    outs = _run(lm384, [_request("a", 1, previews=8)], preview_share=0.0)["a"]
    assert not any(isinstance(o, PreviewOutput) for o in outs) and isinstance(outs[-1], FinishedOutput)


def test_flow_previews_are_the_denoised_estimate(tiny_flow_dir):
    lm = load_model(str(tiny_flow_dir), device="cpu", dtype="float32")
    request = GenerateRequest("f", "a cat", n=2, params=SamplingParams(seed=3), steps=12, previews=2)
    engine = Engine(lm, EngineConfig(preview_share=1.0))
    batch = engine.batches["generate"]
    seen: list = []
    snapshot = batch.snapshot

    def spy(seq):  # the estimate is z + (1 - t) v, from the state the step left
        state = seq.data
        expected = state.z + (1.0 - state.steps / state.num_steps) * state.v
        taken = snapshot(seq)
        seen.append(torch.equal(taken, expected))
        return taken

    batch.snapshot = spy
    outs: list = []
    engine.add_request(request, outs.append)
    engine.run_until_idle()
    if engine.previews._thread is not None:
        engine.previews._thread.join(60)
    engine.step()
    previews = [o for o in outs if isinstance(o, PreviewOutput)]
    assert seen and all(seen)
    assert all(p.images.shape[0] == 2 and p.images.dtype == np.uint8 for p in previews)
    plain: list = []
    other = Engine(lm, EngineConfig())
    other.add_request(GenerateRequest("f", "a cat", n=2, params=SamplingParams(seed=3), steps=12), plain.append)
    other.run_until_idle()
    assert np.array_equal(outs[-1].result.images, plain[-1].result.images)


def test_a_preview_that_cannot_start_fails_no_request(lm384):
    engine = Engine(lm384, EngineConfig(preview_share=1.0))
    batch = engine.batches["generate"]

    def broken(seq):
        raise torch.cuda.OutOfMemoryError("no room for a snapshot")

    batch.snapshot = broken
    outs: list = []
    engine.add_request(_request("a", 1, previews=3), outs.append)
    engine.run_until_idle()
    assert isinstance(outs[-1], FinishedOutput) and not any(isinstance(o, PreviewOutput) for o in outs)
    assert not engine.previews._due  # its schedule is dropped, not retried every step
