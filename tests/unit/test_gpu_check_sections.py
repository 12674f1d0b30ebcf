"""The GPU check's section runner: failure isolation and the time budget, with plain sections."""

from __future__ import annotations

from bench.gpu.check import Section, State, run_sections
from bench.gpu.measure import Row


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
