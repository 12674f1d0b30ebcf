"""`janus-server plan` as a user runs it: the JSON and the table for a real checkpoint's config.json, and the error
for a model that is nowhere."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.real_configs import write_config

GiB = 2**30


def test_plan_cli_prints_json_and_names_a_missing_config(tmp_path):
    model = write_config(tmp_path / "7b", "7b")
    out = subprocess.run([sys.executable, "-m", "server.cli", "plan", "--model", str(model), "--json",
                          "--gpu-memory", "24GiB", "--gpu-memory", "80GiB"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert set(result) >= {"weights_bytes", "kv_bytes_per_token", "plans"}
    assert [set(p) for p in result["plans"]] == [{"memory_bytes", "kv_cache_bytes", "kv_tokens", "concurrent_images",
                                                  "concurrent_sequences"}] * 2
    assert [p["memory_bytes"] for p in result["plans"]] == [24 * GiB, 80 * GiB]
    table = subprocess.run([sys.executable, "-m", "server.cli", "plan", "--model", str(model)], capture_output=True,
                           text=True, check=True).stdout
    assert "80.0 GiB" in table and "images" in table
    int8 = subprocess.run([sys.executable, "-m", "server.cli", "plan", "--model", str(model), "--quantization", "int8",
                           "--gpu-memory", "16GiB"], capture_output=True, text=True, check=True).stdout
    assert "with int8 linears" in int8
    row = next(line.split() for line in int8.splitlines() if line.strip().startswith("16.0 GiB"))
    assert int(row[-2]) >= 6  # images in flight on a 16 GiB card
    missing = subprocess.run([sys.executable, "-m", "server.cli", "plan", "--model", str(tmp_path / "nowhere")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "neither a local directory nor a hub id" in missing.stderr
