"""The distributed mode against a Redis that requires a password, and one that speaks only TLS.

With the right credentials (password in the URL or in JANUS_QUEUE_PASSWORD; a rediss:// URL with
JANUS_QUEUE_TLS_CA naming the CA that signed the server's certificate, made here by openssl) a
request is answered end to end through `serve --workers 1`. With wrong ones nothing starts: the
process exits 2 with an error that names the problem, and never prints the password.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.redis_fixture import RedisServer, free_port, make_certificates
from tests.support.servers import start_server

pytestmark = pytest.mark.timeout(180)

PASSWORD = "s3cret-for-tests-only"
ENV = {"JANUS_HOST": "127.0.0.1", "OMP_NUM_THREADS": "1", "JANUS_HEARTBEAT_INTERVAL": "0.2"}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory: pytest.TempPathFactory,
                  tls_files: tuple[Path, Path, Path]) -> Iterator[tuple[RedisServer, RedisServer]]:
    """(password-protected Redis, TLS-only Redis that also requires the password)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with_password = RedisServer(free_port(), tmp_path_factory.mktemp("redis-auth"), password=PASSWORD)
    with_tls = RedisServer(free_port(), tmp_path_factory.mktemp("redis-tls"), password=PASSWORD, tls=tls_files)
    with_password.start()
    with_tls.start()
    try:
        yield with_password, with_tls
    finally:
        with_password.kill()
        with_tls.kill()


def refused(args: list[str], env: dict[str, str]) -> str:
    """Runs `janus-server ARGS`, which must refuse to start (exit 2); returns what it printed."""
    network = [] if args[0] == "worker" else ["--port", str(free_port()), "--grpc-port", "0"]
    done = subprocess.run([sys.executable, "-m", "server.cli", *args, *network], env={**os.environ, **ENV, **env},
                          capture_output=True, text=True, timeout=60, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert PASSWORD not in output and "wrong-one" not in output
    return output


def answered(serve_url: str) -> None:
    r = httpx.post(serve_url + "/v1/generate", json={"prompt": "a red boat", "seed": 1}, timeout=60)
    assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text


def test_password_protected_redis(secured_redis, tiny_hf_dir: Path, tmp_path: Path) -> None:
    server, _ = secured_redis
    url = server.url
    serve = start_server(["serve", "--queue", url, "--model", str(tiny_hf_dir), "--workers", "1",
                          "--metrics-port", str(free_port())], tmp_path, {**ENV, "JANUS_QUEUE_PASSWORD": PASSWORD},
                         ready_timeout=90)
    try:
        answered(serve.url)
    finally:
        serve.stop()
    assert PASSWORD not in serve.log()

    assert "refused the credentials" in refused(["api", "--queue", url], {"JANUS_QUEUE_PASSWORD": "wrong-one"})
    # No password at all, and a wrong one in the URL: a worker does not start either.
    assert "refused the credentials" in refused(["worker", "--queue", url, "--model", str(tiny_hf_dir)], {})
    wrong_url = url.replace("redis://", "redis://:wrong-one@")
    assert "refused the credentials" in refused(["api", "--queue", wrong_url], {})


def test_tls_redis(secured_redis, tls_files, tiny_hf_dir: Path, tmp_path: Path) -> None:
    _, server = secured_redis
    assert server.url.startswith("rediss://")
    env = {**ENV, "JANUS_QUEUE_TLS_CA": str(tls_files[2])}
    with_password = server.url.replace("rediss://", f"rediss://:{PASSWORD}@")  # the password in the URL this time
    serve = start_server(["serve", "--queue", with_password, "--model", str(tiny_hf_dir), "--workers", "1",
                          "--metrics-port", str(free_port())], tmp_path, env, ready_timeout=90)
    try:
        answered(serve.url)
    finally:
        serve.stop()
    assert PASSWORD not in serve.log()

    # A CA that did not sign the server's certificate, and no CA at all (the system store).
    other = make_certificates(tmp_path)
    output = refused(["api", "--queue", with_password], {**env, "JANUS_QUEUE_TLS_CA": str(other[2])})
    assert "TLS" in output and "certificate verify failed" in output
