"""`janus-server api` without the model runtime: the premise of the Dockerfile's `api` image
(requirements/api.txt has no torch, transformers, tokenizers, safetensors, huggingface_hub or diffusers),
checked without Docker.

The api runs as a real process whose `sitecustomize` (first on PYTHONPATH) makes importing any of those packages
fail, as it fails in that image, and records every attempt. A control shows that the same blocker does stop the
model runtime. The api then validates and refuses requests on its own, and answers real ones through a worker
(a normal process, with torch) on the same Redis.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.support import redis_fixture
from tests.support.images import b64, png_bytes
from tests.support.servers import ServerProcess, spawn_worker, start_server, wait_http_ok, wait_until_ready

pytestmark = pytest.mark.timeout(180)

redis_server = redis_fixture.redis_server

# pyproject.toml's dependencies that requirements/api.in leaves out (tests/unit/test_lock.py)
MODEL_RUNTIME = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "diffusers")

SITECUSTOMIZE = f'''\
"""Test blocker: the model runtime is not installed (tests/integration/test_api_without_torch.py)."""
import importlib.abc
import os
import sys

BLOCKED = {set(MODEL_RUNTIME)!r}
LOG = os.environ["JANUS_TEST_BLOCKED_IMPORTS"]


def _record(what):
    with open(LOG, "a", encoding="utf-8") as log:
        log.write(f"{{os.getpid()}} {{what}}\\n")


class ModelRuntimeBlocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in BLOCKED:
            return None
        _record(name)
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test's sitecustomize)", name=name)


sys.meta_path.insert(0, ModelRuntimeBlocker())
_record("-")  # this process runs with the blocker
'''


@dataclass
class Blocker:
    env: dict[str, str]
    log: Path

    def attempts(self, pid: int) -> list[str] | None:
        """The blocked imports process `pid` tried, or None when it did not run with the blocker."""
        lines = [line.split(" ", 1) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        mine = [name for owner, name in lines if owner == str(pid)]
        return [name for name in mine if name != "-"] if "-" in mine else None


@pytest.fixture(scope="module")
def blocker(tmp_path_factory: pytest.TempPathFactory) -> Blocker:
    site = tmp_path_factory.mktemp("no-model-runtime")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = site / "blocked-imports.log"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return Blocker({"PYTHONPATH": path, "JANUS_TEST_BLOCKED_IMPORTS": str(log)}, log)


@pytest.fixture(scope="module")
def api(redis_server: redis_fixture.RedisServer, blocker: Blocker,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("api-without-torch")
    proc = start_server(["api", "--queue", redis_server.url], logs, blocker.env, wait_ready=False)
    try:
        wait_http_ok(proc.url + "/health", proc.proc, proc.log_path)  # /ready waits for a worker
        yield proc
    finally:
        proc.stop()


def _run_blocked(blocker: Blocker, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **blocker.env}, capture_output=True,
                          text=True, timeout=120, check=False)


def _error(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    return r.json()["error"]["message"]


def test_the_blocker_stops_the_model_runtime(blocker: Blocker) -> None:
    """Control: the plain-Python surface of janus_core imports, its model runtime does not (and does without
    the blocker), so the api passing below is not the blocker failing to block."""
    code = "import janus_core; print('surface', flush=True); janus_core.Engine"
    blocked = _run_blocked(blocker, code)
    assert blocked.returncode != 0 and blocked.stdout == "surface\n", blocked.stdout + blocked.stderr
    assert "ModuleNotFoundError" in blocked.stderr and "blocked by the test's sitecustomize" in blocked.stderr
    assert "torch" in blocked.stderr.splitlines()[-1], blocked.stderr
    unblocked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert unblocked.returncode == 0, unblocked.stderr


def test_api_serves_and_validates_without_the_model_runtime(api: ServerProcess, blocker: Blocker) -> None:
    assert httpx.get(api.url + "/health", timeout=10).status_code == 200
    models = httpx.get(api.url + "/v1/models", timeout=10)
    assert models.status_code == 200 and models.json()["data"] and models.json()["data"][0]["id"]
    assert httpx.get(api.url + "/ready", timeout=10).status_code == 503  # no worker yet: it reads Redis for one
    with grpc.insecure_channel(f"127.0.0.1:{api.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    # refused by the api itself, each naming what is wrong
    assert "n" in _error(httpx.post(api.url + "/v1/generate", json={"prompt": "a", "n": 0}, timeout=10))
    assert "cfg_weight" in _error(httpx.post(api.url + "/v1/generate", json={"prompt": "a", "cfg_weight": 500},
                                             timeout=10))
    not_an_image = {"prompt": "q", "images": [b64(b"hello, I am a text file")]}  # decoded here, with Pillow
    assert "not a decodable image" in _error(httpx.post(api.url + "/v1/understand", json=not_an_image, timeout=10))
    attempts = blocker.attempts(api.proc.pid)
    assert attempts is not None, "the api did not run with the blocker"
    assert attempts == []  # not even tried: nothing in the api process reaches for the model runtime


def test_batch_url_runs_without_the_model_runtime(api: ServerProcess, blocker: Blocker, tmp_path: Path) -> None:
    """`janus-server batch --url` in the api-only install: each line is sent and its answer written (here the api's
    own refusal, as no worker runs yet), and nothing reaches for the model runtime."""
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    line = {"custom_id": "a", "method": "POST", "url": "/v1/generate", "body": {"prompt": "a", "n": 0}}
    source.write_text(json.dumps(line) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "batch", str(source), "--output", str(output),
                             "--url", api.url], env={**os.environ, **blocker.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    (answer,) = [json.loads(text) for text in output.read_text().splitlines()]
    assert answer["custom_id"] == "a" and answer["response"]["status_code"] == 422
    assert blocker.attempts(proc.pid) == []


def test_api_without_the_model_runtime_answers_through_a_worker(
        api: ServerProcess, blocker: Blocker, redis_server: redis_fixture.RedisServer, tiny_hf_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    worker = spawn_worker(redis_server.url, tiny_hf_dir, tmp_path_factory.mktemp("worker"))
    try:
        wait_http_ok(worker.url + "/ready", worker.proc, worker.log_path)
        wait_until_ready(api, 60)
        body = {"prompt": "What is in the image?", "images": [b64(png_bytes())], "max_new_tokens": 4}
        understood = httpx.post(api.url + "/v1/understand", json=body, timeout=60)
        assert understood.status_code == 200, understood.text
        assert 1 <= understood.json()["usage"]["completion_tokens"] <= 4
        generated = httpx.post(api.url + "/v1/generate", json={"prompt": "a red boat", "seed": 3}, timeout=60)
        assert generated.status_code == 200, generated.text
        (image,) = generated.json()["images"]
        assert Image.open(io.BytesIO(base64.b64decode(image["b64_png"]))).size == (64, 64)
    finally:
        worker.stop()
    attempts = blocker.attempts(api.proc.pid)
    assert attempts == []
    assert "ModuleNotFoundError" not in api.log() and "Traceback" not in api.log(), api.log()[-4000:]
