"""bench/gpu/all.sh in its CPU mode: every part of a GPU loan's one command runs, so the script cannot rot
between loans (the GPU check itself is tests/integration/test_gpu_check.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("env", "check", "rest", "flow", "previews")


@pytest.fixture(scope="module")
def cpu_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-all")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1",
           "TMPDIR": str(out / "tmp"), "JANUS_BENCH_WHEELS": str(out / "no-wheels")}
    (out / "tmp").mkdir()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "all.sh"), "--cpu"], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_every_part_runs_and_reports(cpu_all):
    proc, out = cpu_all
    summary = (out / "summary.txt").read_text()
    for part in PARTS:
        assert re.search(rf"^== {part}: ok after \d+s$", summary, re.MULTILINE), summary
        assert (out / f"{part}.txt").stat().st_size > 0, part
    assert summary == proc.stdout  # what it printed is what it kept
    assert summary.splitlines()[-1].startswith("== all: ")


def test_each_part_leaves_its_figures(cpu_all):
    _, out = cpu_all
    assert re.search(r"^transformers 5\.", (out / "env.txt").read_text(), re.MULTILINE)
    assert (out / "gpu.md").exists() and (out / "gpu.json").exists()  # the check's table, beside the parts
    rest = (out / "rest.txt").read_text()
    assert "4/4 answers equal transformers' greedy text" in rest  # fp32 on CPU: the oracle holds over HTTP
    assert "generation images/s vs transformers at c=4" in rest
    assert re.search(r"^ratio: x[\d.]+ wall", (out / "flow.txt").read_text(), re.MULTILINE)
    assert "on / off = " in (out / "previews.txt").read_text()


def test_a_failing_part_is_named_and_the_next_still_runs(tmp_path):
    """The REST part on a checkpoint that cannot load: it fails, its verdict says so, and flow still runs."""
    broken = tmp_path / "broken-checkpoint"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path), "JANUS_BENCH_WHEELS": str(tmp_path / "no-wheels"),
           "JANUS_GPU_PARTS": "rest,flow", "JANUS_GPU_CKPT": str(broken)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "all.sh"), "--cpu"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^== rest: failed \(exit 1\) after \d+s$", proc.stdout, re.MULTILINE), proc.stdout
    assert "ModelLoadError" in (tmp_path / "rest.txt").read_text()
    assert re.search(r"^== flow: ok after", proc.stdout, re.MULTILINE), proc.stdout
    # the time rest left unused goes to flow (the last part: all that is left), beyond rest's own share
    allowed = {name: int(secs) for name, secs in re.findall(r"^== (\w+): up to (\d+)s", proc.stdout, re.MULTILINE)}
    assert allowed["flow"] > allowed["rest"], allowed
