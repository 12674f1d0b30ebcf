"""The private redis-server of `serve` with several workers and no --queue: a unix socket in a directory of
its own, no TCP listener, no persistence, a maxmemory with noeviction; the Redis queue works over it; after
`stop` the process is reaped and the directory gone. Without redis-server, serve refuses to start (exit 2)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from server.jobs import Job, UnderstandParams, understand_result
from server.private_redis import PrivateRedis, PrivateRedisError
from server.queue import create_queue

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def listening(table: str) -> dict[str, str]:
    """inode -> local address of the sockets in LISTEN state in /proc/net/tcp or tcp6."""
    rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
    return {cols[9]: cols[1] for cols in (row.split() for row in rows) if cols[3] == "0A"}


@needs_redis
async def test_private_redis_listens_on_a_private_unix_socket_only_and_is_gone_after_stop() -> None:
    private = PrivateRedis(REDIS, maxmemory=64 << 20)
    url = private.start()
    process, directory = private.process, private.directory
    assert process is not None and directory is not None
    try:
        assert url == f"unix://{directory}/redis.sock?db=0"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_ISSOCK(private.socket_path.stat().st_mode)
        tcp = {**listening("tcp"), **listening("tcp6")}
        assert not [tcp[i] for i in socket_inodes(process.pid) if i in tcp]  # no TCP port at all
        queue = create_queue(url, max_depth=8)
        try:
            await queue.verify()
            config = await queue.redis.config_get("*")
            assert (config["port"], config["save"], config["appendonly"], config["maxmemory"],
                    config["maxmemory-policy"]) == ("0", "", "no", str(64 << 20), "noeviction")
            # the queue's whole round trip over the socket: submit, claim, finish, the result event
            job_id = await queue.submit(Job("understand", UnderstandParams("hi", max_new_tokens=1)))
            [claimed] = await queue.claim("w", 1, timeout=5.0)
            assert claimed.id == job_id
            await queue.finish(job_id, understand_result("ok", "stop", 1, 1))
            events = [e async for e in queue.events(job_id)]
            assert events[-1]["text"] == "ok"
        finally:
            await queue.close()
    finally:
        private.stop()
    assert process.returncode is not None  # reaped
    assert not directory.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(process.pid, 0)


def test_a_redis_server_that_fails_is_reported_with_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: nope' >&2\nexit 1\n")
    fake.chmod(0o755)
    private = PrivateRedis(str(fake))
    with pytest.raises(PrivateRedisError, match="exited with status 1: FATAL CONFIG FILE ERROR: nope"):
        private.start()
    assert private.directory is not None and not private.directory.exists()


@pytest.mark.parametrize("args", [
    ["--device", "cpu", "--workers", "2"],
    ["--workers", "3"],
])
def test_serve_with_several_workers_and_no_redis_server_exits_2(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "JANUS_REDIS_SERVER": str(tmp_path / "no-such-redis-server"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("JANUS_QUEUE", None)
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tmp_path), *args],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert "workers share a Redis queue" in result.stderr
    assert "pass --queue redis://" in result.stderr and "install redis-server" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "0,2"], "--gpus: 2 is out of range; 2 visible (0: GPU-aaa, 1: GPU-bbb)"),  # a bad pick
    (["--workers", "3"], "2 workers share GPU GPU-aaa: give each its KV pool with --kv-cache-memory SIZE"),
])
def test_serve_refuses_a_gpu_plan_it_cannot_run_before_loading_anything(args: list[str], message: str,
                                                                         tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb"}
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tmp_path), "--device",
                             "cuda", *args], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert message in result.stderr
