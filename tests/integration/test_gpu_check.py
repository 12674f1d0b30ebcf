"""bench/gpu/run.sh as the test command runs it: CPU mode, tiny shape, so the GPU check cannot rot between loans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["shape", "section", "mode", "c", "ms/step", "host ms", "rate", "TTFT s", "peak GiB", "roof ms", "of roof",
           "x ref", "note"]
SERVER_MODULES = ("fastapi", "starlette", "uvicorn", "grpc", "redis", "pydantic", "pydantic_settings",
                  "prometheus_client", "server")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    # One OpenMP thread: on a loaded 2-core box, a second thread makes every tiny op wait for a CPU (3-4x slower).
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(ROOT / "bench" / "gpu" / "run.sh"), "--device", "cpu", "--shape", "tiny"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_cpu_mode_prints_the_full_table(cpu_run):
    proc, _ = cpu_run
    out = proc.stdout
    assert out.index("## dry estimate") < out.index("] setup tiny:"), "the estimate is printed before anything runs"
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert _cells(lines[0]) == COLUMNS
    rows = {tuple(_cells(line)[1:4]): dict(zip(COLUMNS, _cells(line), strict=True)) for line in lines[1:]}
    expected = {("generate", mode, c) for mode in ("eager", "graphs", "compile") for c in ("1", "16", "64")}
    expected |= {("understand", "eager", "1"), ("understand", "eager", "32"), ("transformers image", "eager", "1"),
                 ("transformers text", "eager", "1"), ("greedy check", "understand", "3"),
                 ("greedy check", "generate", "2")}
    assert set(rows) == expected and len(lines) - 1 == len(expected)
    for key in [k for k in expected if k[0] in ("generate", "understand") and k[1] in ("eager", "graphs")]:
        row = rows[key]
        assert float(row["ms/step"]) > 0 and float(row["roof ms"]) >= 0 and float(row["of roof"]) >= 0, row
        assert float(row["rate"].split()[0]) > 0 and float(row["x ref"]) > 0, row
    assert rows[("generate", "eager", "1")]["rate"].endswith("img/s")
    assert float(rows[("understand", "eager", "32")]["TTFT s"]) > 0
    assert float(rows[("transformers image", "eager", "1")]["ms/step"]) > 0
    for c in ("1", "16", "64"):
        assert rows[("generate", "compile", c)]["note"].startswith("skipped: --compile needs CUDA")
    # fp32 on CPU: the batched engine and transformers agree token for token.
    assert rows[("greedy check", "understand", "3")]["note"].startswith("3/3 requests token-equal")
    assert rows[("greedy check", "generate", "2")]["note"].startswith("2/2 requests token-equal")
    assert "transformers 5." in out and "copy bandwidth" in out


def test_cpu_mode_writes_the_table_and_its_json_twin(cpu_run):
    proc, out = cpu_run
    md = (out / "gpu.md").read_text()
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line for line in md.splitlines() if line.startswith("| ")] == table
    data = json.loads((out / "gpu.json").read_text())
    assert data["columns"] == COLUMNS
    assert len(data["rows"]) == len(table) - 1
    by_key = {(r["section"], r["mode"], r["c"]): r for r in data["rows"]}
    und = by_key[("understand", "eager", 32)]
    assert und["unit"] == "tok/s" and und["rate"] > 0 and und["ms_step"] > 0 and und["extra"]["tokens"] > 0
    assert 0 < und["of_roof"] == pytest.approx(und["roof_ms"] / und["ms_step"])
    check = by_key[("greedy check", "generate", 2)]
    assert check["extra"]["equal"] == 2 and check["extra"]["agree"] == check["extra"]["lengths"]
    assert {s["status"] for s in data["sections"]} == {"ok", "skipped"}
    assert data["meta"]["device"].startswith("cpu") and data["meta"]["estimate_s"] > 0


def test_cpu_mode_is_quiet(cpu_run):
    proc, _ = cpu_run
    assert "Warning" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr[-2000:]


def test_the_check_imports_nothing_of_the_server():
    code = ("import sys, bench.gpu.check; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_MODULES!r}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_bad_option_is_a_clear_error():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "bench" / "gpu" / "run.sh"), "--shapes", "3b"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2
    assert "unknown shape '3b'" in proc.stderr
