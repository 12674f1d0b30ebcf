"""`janus-server serve --quantization int8` as a user runs it: DeepSeek's layout serving generation and
understanding over REST, JanusFlow understanding with the setting from the environment, and a quantization the
device cannot run refused at start-up with the reason."""

from __future__ import annotations

import base64
import subprocess
import sys

import httpx

from tests.support.servers import start_server


def test_int8_serves_both_jobs_over_rest(tiny_ds_dir, tmp_path, image_b64):
    proc = start_server(["serve", "--model", str(tiny_ds_dir), "--quantization", "int8"], tmp_path)
    try:
        r = httpx.post(proc.url + "/v1/generate", json={"prompt": "a lighthouse", "n": 2, "seed": 3}, timeout=120)
        assert r.status_code == 200, r.text
        pngs = [base64.b64decode(i["b64_png"]) for i in r.json()["images"]]
        assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
        r = httpx.post(proc.url + "/v1/understand", json={"prompt": "Describe it.", "images": [image_b64],
                                                         "max_new_tokens": 8}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
        assert "with int8 linears" in proc.log()
    finally:
        proc.stop()


def test_janusflow_understands_with_int8_from_the_environment(tiny_flow_dir, tmp_path, image_b64):
    proc = start_server(["serve", "--model", str(tiny_flow_dir)], tmp_path, {"JANUS_QUANTIZATION": "int8"})
    try:
        r = httpx.post(proc.url + "/v1/understand", json={"prompt": "What is this?", "images": [image_b64],
                                                         "max_new_tokens": 6},
                       timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        assert "with int8 linears" in proc.log()
    finally:
        proc.stop()


def test_fp8_on_a_cpu_stops_serve_with_the_reason(tiny_hf_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_hf_dir), "--device", "cpu",
                          "--quantization", "fp8", "--port", "0", "--grpc-port", "0", "--no-log-json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "compute capability 8.9" in out.stderr + out.stdout
    # with several workers serve refuses before starting any of them (no restart loop of failing workers)
    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_hf_dir), "--device", "cpu",
                          "--workers", "2", "--quantization", "fp8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--quantization fp8 needs CUDA GPUs" in out.stderr, out.stderr
