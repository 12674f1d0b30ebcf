"""The `janus-server` console script as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from janus_core.models.loader import load_model


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("janus-server")
    return [str(script)] if script.exists() else [shutil.which("janus-server") or "janus-server"]


@pytest.mark.parametrize("fmt", ["hf", "deepseek"])
def test_tiny_model_command_writes_a_loadable_checkpoint(tmp_path, tiny_hf, fmt):
    out = tmp_path / fmt
    result = subprocess.run([*_cli(), "tiny-model", str(out), "--format", fmt, "--seed", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{fmt} layout" in result.stdout
    loaded = load_model(str(out), device="cpu")
    ours = tiny_hf.model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in loaded.model.state_dict().items())
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in out.rglob("*") if path.is_file()}
    assert len(set(modes.values())) == 1, modes  # weights as readable as the rest (safetensors wrote 0600)


def test_tiny_model_with_janus_pro_image_shapes(tmp_path):
    """--image-size 384: 576 image tokens and 384x384 images, as the real model; no progress bar printed."""
    out = tmp_path / "tiny-384"
    result = subprocess.run([*_cli(), "tiny-model", str(out), "--format", "deepseek", "--image-size", "384"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "384x384 images" in result.stdout
    loaded = load_model(str(out), device="cpu")
    assert (loaded.image_size, loaded.num_image_tokens) == (384, 576)
    # the offline demo's model: room for a conversation of several turns with an image
    assert loaded.model.config.text_config.max_position_embeddings == 4096
    bad = subprocess.run([*_cli(), "tiny-model", str(tmp_path / "bad"), "--image-size", "100"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "multiple of 16" in bad.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["serve"], "--model is required"),
    (["api"], "needs --queue redis://"),
    (["worker", "--model", "x"], "needs --queue redis://"),
])
def test_misuse_exits_with_a_message(args, message, monkeypatch):
    monkeypatch.delenv("JANUS_MODEL", raising=False)
    monkeypatch.delenv("JANUS_QUEUE", raising=False)
    result = subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_serve_with_a_broken_model_exits_nonzero(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    result = subprocess.run([*_cli(), "serve", "--model", str(tmp_path), "--port", "0", "--grpc-port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "model_type 'bert'" in result.stderr + result.stdout
