"""The GPU check's section runner: failure isolation and the time budget, with plain sections."""

from __future__ import annotations

import pytest
import torch

from bench.gpu.check import Section, State, run_sections
from bench.gpu.measure import Row
from bench.gpu.model import build_random_model, stock_copy
from bench.references import hf_understand
from janus_core.engine.engine import Engine, EngineConfig
from janus_core.step.packed_linear import packing_supported


def _ok(shape: str) -> Section:
    planned = [Row(shape, "understand", "eager", 1)]
    return Section(f"ok {shape}", 0.0, planned, lambda: [Row(shape, "understand", "eager", 1, rate=5.0)])


def test_a_failing_section_prints_its_error_and_the_rest_still_runs(capsys):
    def explode() -> list[Row]:
        raise RuntimeError("compiling exploded")

    sections = [Section("broken", 0.0, [Row("1b", "generate", "compile", 1)], explode), _ok("1b")]
    state = State()
    run_sections(sections, state, budget_s=0)
    assert [s.status for s in sections] == ["failed", "ok"]
    assert state.rows[("1b", "generate", "compile", 1)].note == "failed: RuntimeError: compiling exploded"
    assert state.rows[("1b", "understand", "eager", 1)].rate == 5.0
    captured = capsys.readouterr()
    assert "RuntimeError: compiling exploded" in captured.err  # the traceback
    assert "broken: failed" in captured.out


def test_a_section_that_would_overrun_the_budget_is_skipped_and_keeps_its_rows():
    ran = []
    slow = Section("slow", 100.0, [Row("7b", "generate", "eager", 64)], lambda: ran.append(1) or [])
    sections = [slow, _ok("7b")]
    state = State()
    run_sections(sections, state, budget_s=10)
    assert not ran and [s.status for s in sections] == ["skipped", "ok"]
    assert state.rows[("7b", "generate", "eager", 64)].note.startswith("skipped: time budget")


def test_the_reference_copy_stays_stock_when_the_engine_packs_its_model():
    if not packing_supported(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN packing in this torch build")
    lm = build_random_model("tiny", torch.device("cpu"), torch.float32)
    ref = stock_copy(lm)
    Engine(lm, EngineConfig(max_batch_size=1))  # packs lm's linears in place
    assert hf_understand(ref, [], "hi", max_new_tokens=2).tokens > 0
    with pytest.raises(RuntimeError, match="packed linear layers"):
        hf_understand(lm, [], "hi", max_new_tokens=2)
