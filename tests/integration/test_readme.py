"""The README's examples run as written against a real `janus-server serve` (ports substituted)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.servers import start_server

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _localise(text: str, server) -> str:
    text = text.replace("localhost:8000", f"127.0.0.1:{server.port}")
    text = text.replace("localhost:50051", f"127.0.0.1:{server.grpc_port}")
    return text.replace(".venv/bin/python", sys.executable)


@pytest.fixture(scope="module")
def readme_server(tiny_hf_dir, tmp_path_factory):
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


@pytest.fixture()
def workdir(tmp_path, readme_server):
    make_image = next(b for b in _blocks("bash") if "red.png" in b and "Image.new" in b)
    subprocess.run(["bash", "-ec", _localise(make_image, readme_server)], cwd=tmp_path, check=True)
    return tmp_path


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples(readme_server, workdir):
    blocks = [b for b in _blocks("bash") if b.lstrip().startswith("curl")]
    assert len(blocks) >= 4
    conversations = 0
    for block in blocks:
        result = subprocess.run(["bash", "-ec", _localise(block, readme_server)], cwd=workdir,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (block, result.stderr)
        assert '"error"' not in result.stdout, (block, result.stdout[:500])
        if '"messages"' in block:
            conversations += 1
            assert '"finish_reason"' in result.stdout, result.stdout[:500]
    assert conversations == 1
    assert (workdir / "fox.png").read_bytes().startswith(b"\x89PNG")


def test_python_examples(readme_server, workdir):
    blocks = _blocks("python")
    assert any("OpenAI" in b for b in blocks) and any("JanusClient" in b for b in blocks)
    outputs = {}
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", _localise(block, readme_server)], cwd=workdir,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (block, result.stderr[-2000:])
        outputs[block] = result.stdout
    chat = next(out for block, out in outputs.items() if "stream_options" in block)
    assert "prompt_tokens=" in chat  # the conversation's usage arrived in the last chunk
    grpc = next(out for block, out in outputs.items() if "converse" in block)
    assert grpc.strip(), "the gRPC conversation printed nothing"
    assert (workdir / "fox2.png").read_bytes().startswith(b"\x89PNG")
    assert (workdir / "fox-0.png").read_bytes().startswith(b"\x89PNG")


def test_plan_example(tiny_hf_dir):
    line = next(b for b in _blocks("bash") if "janus-server plan" in b).strip()
    cmd = line.replace(".venv/bin/janus-server", f"{sys.executable} -m server.cli")
    result = subprocess.run(["bash", "-ec", cmd.replace(".cache/tiny-model", str(tiny_hf_dir))],
                            capture_output=True, text=True, timeout=120, cwd=README.parent)
    assert result.returncode == 0, result.stderr
    assert "1.0 GiB" in result.stdout and "images" in result.stdout
