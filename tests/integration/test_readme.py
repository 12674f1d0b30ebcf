"""The README's examples run as written against a real `janus-server serve` (ports substituted).

They run from the checkout, as a newcomer runs them (`.venv/bin/...` is relative to it), with
`/tmp/` pointed at a folder of this test's own so parallel runs do not share files. Afterwards the
checkout has no new untracked or changed files, and the server wrote nothing but log lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import free_port, start_server

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _localise(text: str, server, tmp: Path) -> str:
    text = text.replace("localhost:8000", f"127.0.0.1:{server.port}")
    text = text.replace("localhost:50051", f"127.0.0.1:{server.grpc_port}")
    text = text.replace("/tmp/", f"{tmp}/")
    return text.replace(".venv/bin/python", sys.executable)


def _git_status() -> set[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return set(out.splitlines())


@pytest.fixture(scope="module")
def readme_server(tiny_hf_dir, tmp_path_factory):
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("logs"))
    yield proc
    proc.stop()


@pytest.fixture()
def workdir(tmp_path, readme_server):
    """This test's `/tmp`, with the README's test image made; the checkout's status before and after."""
    before = _git_status()
    make_image = next(b for b in _blocks("bash") if "red.png" in b and "Image.new" in b)
    subprocess.run(["bash", "-ec", _localise(make_image, readme_server, tmp_path)], cwd=REPO, check=True)
    yield tmp_path
    assert _git_status() - before == set(), "the README's examples wrote into the checkout"


def _assert_only_log_lines(server) -> None:
    """stderr and stdout of the server (one file) hold JSON log lines only: no bars, prints or raw warnings."""
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"the server wrote a line that is not a JSON log line: {line[:300]!r}")
        assert {"ts", "level", "logger", "msg"} <= set(entry), line[:300]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples(readme_server, workdir):
    blocks = [b for b in _blocks("bash") if b.lstrip().startswith("curl")]
    assert len(blocks) >= 4
    conversations = 0
    for block in blocks:
        result = subprocess.run(["bash", "-ec", _localise(block, readme_server, workdir)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (block, result.stderr)
        assert not re.search(r'"error":\s*\{', result.stdout), (block, result.stdout[:500])  # job objects say null
        if '"messages"' in block:
            conversations += 1
            assert '"finish_reason"' in result.stdout, result.stdout[:500]
    assert conversations == 1
    assert (workdir / "fox.png").read_bytes().startswith(b"\x89PNG")
    assert (workdir / "fox.jpg").read_bytes().startswith(b"\xff\xd8\xff")  # output_format jpeg
    assert (workdir / "fox-async.png").read_bytes().startswith(b"\x89PNG")  # an async job's image
    _assert_only_log_lines(readme_server)


def test_python_examples(readme_server, workdir):
    blocks = _blocks("python")
    assert any("OpenAI" in b for b in blocks) and any("JanusClient" in b for b in blocks)
    outputs = {}
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", _localise(block, readme_server, workdir)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (block, result.stderr[-2000:])
        outputs[block] = result.stdout
    chat = next(out for block, out in outputs.items() if "stream_options" in block)
    assert "prompt_tokens=" in chat  # the conversation's usage arrived in the last chunk
    grpc = next(out for block, out in outputs.items() if "converse" in block)
    assert grpc.strip(), "the gRPC conversation printed nothing"
    assert (workdir / "fox2.png").read_bytes().startswith(b"\x89PNG")
    assert (workdir / "fox-0.png").read_bytes().startswith(b"\x89PNG")
    assert (workdir / "fox3.png").read_bytes().startswith(b"\x89PNG")  # litellm's image_generation
    _assert_only_log_lines(readme_server)


def test_guidellm_example(readme_server, workdir):
    """The guidellm line as written, from the checkout: every request succeeds with its 32 output tokens."""
    block = next(b for b in _blocks("bash") if "guidellm run" in b)
    script = _localise(block, readme_server, workdir).replace(".venv/bin/guidellm",
                                                             str(Path(sys.executable).with_name("guidellm")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(["bash", "-ec", script], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (bench,) = json.loads((workdir / "guidellm.json").read_text())["benchmarks"]
    assert bench["metrics"]["request_totals"]["errored"] == 0
    assert [r["output_tokens"] for r in bench["requests"]["successful"]] == [32] * 16


def test_grpc_command_line_examples(readme_server, workdir):
    """The shell lines of the gRPC section (the CLI's default target, localhost:50051, pointed at this server)."""
    block = next(b for b in _blocks("bash") if "-m server.rpc.client generate" in b)
    target = f"--target 127.0.0.1:{readme_server.grpc_port}"
    block = block.replace("-m server.rpc.client ", f"-m server.rpc.client {target} ")
    result = subprocess.run(["bash", "-ec", _localise(block, readme_server, workdir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{workdir}/fox-cli-1.png (seed 8)" in result.stdout
    assert (workdir / "fox-cli-1.png").read_bytes().startswith(b"\x89PNG")


def test_janusflow_example(workdir):
    """The JanusFlow block as written (its own server in the background, ports substituted): it waits for
    /ready before asking, and writes a PNG."""
    block = next(b for b in _blocks("bash") if "--family janusflow" in b)
    port, grpc_port = free_port(), free_port()
    script = (block.replace("8001", str(port)).replace("50052", str(grpc_port)).replace("/tmp/", f"{workdir}/")
              .replace(".venv/bin/janus-server", f"{sys.executable} -m server.cli"))
    result = subprocess.run(["bash", "-ec", "trap 'kill %1 2>/dev/null; wait' EXIT\n" + script], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "flow-fox.png").read_bytes().startswith(b"\x89PNG")


def test_readme_points_outside_the_checkout():
    """Every file an example writes or reads by name is under /tmp (the check above cannot see grpcurl's)."""
    text = "\n".join(_blocks("bash") + _blocks("python"))
    names = set(re.findall(r"[\w./-]*\b[\w-]+\.png\b", text))
    assert names and all(n.startswith("/tmp/") for n in names), names
    assert (REPO / "docs" / "playground.png").stat().st_size < 200_000  # the README's screenshot stays small


def test_plan_example(tiny_hf_dir):
    line = next(b for b in _blocks("bash") if "janus-server plan" in b).strip()
    cmd = line.replace(".venv/bin/janus-server", f"{sys.executable} -m server.cli")
    result = subprocess.run(["bash", "-ec", cmd.replace(".cache/tiny-model-384", str(tiny_hf_dir))],
                            capture_output=True, text=True, timeout=120, cwd=README.parent)
    assert result.returncode == 0, result.stderr
    assert "1.0 GiB" in result.stdout and "images" in result.stdout
    assert "KV 512 B per token" in result.stdout  # a tiny model's KV is bytes, not "0 KiB"


def test_batch_example(readme_server, workdir):
    block = next(b for b in _blocks("bash") if "janus-server batch" in b)
    script = _localise(block, readme_server, workdir).replace(".venv/bin/janus-server",
                                                              f"{sys.executable} -m server.cli")
    result = subprocess.run(["bash", "-ec", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (workdir / "batch-out.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["boat", "fox", "hello"]
    assert {line["response"]["status_code"] for line in lines} == {200}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in (workdir / "batch-images").iterdir())
    assert len(list((workdir / "batch-images").iterdir())) == 3
    _assert_only_log_lines(readme_server)
