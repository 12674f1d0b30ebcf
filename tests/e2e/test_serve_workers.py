"""`janus-server serve --workers 2` with no --queue: serve starts a private redis-server on a unix socket for
its two worker processes, both serve concurrent requests, /ready counts them per device, the flags given to
serve reach the workers, and SIGTERM leaves no process and no socket directory behind."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import signal
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from janus_core import memory
from janus_core.models.loader import LoadedModel
from tests.support.images import b64, png_bytes
from tests.support.servers import free_port_pair, pid_alive, start_server

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]

IMAGE_PNG = png_bytes()
KV_CACHE = "8MiB"  # given to serve only: the workers' pools show whether it reached them
ENV = {"JANUS_HOST": "127.0.0.1", "OMP_NUM_THREADS": "1", "JANUS_QUEUE": "memory", "CUDA_VISIBLE_DEVICES": ""}


def children(pid: int) -> dict[int, tuple[str, list[str]]]:
    """The processes whose parent is `pid`: their name (comm) and command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
            if int(stat_line.rsplit(")", 1)[1].split()[1]) == pid:
                name = stat_line.split("(", 1)[1].rsplit(")", 1)[0]
                found[int(entry)] = (name, Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0"))
        except (OSError, IndexError, ValueError):
            continue
    return found


def unix_socket_paths(pid: int) -> list[str]:
    """Paths of the unix sockets process `pid` holds open (redis-server rewrites its command line)."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[len("socket:["):-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    rows = (row.split() for row in Path("/proc/net/unix").read_text().splitlines()[1:])
    return [cols[7] for cols in rows if len(cols) > 7 and cols[6] in inodes]


async def eventually(check, timeout: float, what) -> None:
    """`what`: a text, or a function that says what was awaited and what was seen last."""
    give_up = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > give_up:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.05)


def sample(text: str, name: str) -> float:
    values = [s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
    assert values, f"{name} is not exported"
    return sum(values)


def expected_text(lm: LoadedModel, prompt: str, max_new_tokens: int) -> str:
    import torch

    from janus_core.simple.understand import understand

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return understand(lm, [Image.open(io.BytesIO(IMAGE_PNG)).convert("RGB")], prompt,
                          max_new_tokens=max_new_tokens).text
    finally:
        torch.set_num_threads(before)


async def test_serve_runs_two_workers_over_a_private_redis_and_leaves_nothing_behind(
        tiny_hf_dir: Path, tiny_hf: LoadedModel, tmp_path: Path) -> None:
    base = free_port_pair()
    args = ["serve", "--model", str(tiny_hf_dir), "--device", "cpu", "--workers", "2", "--metrics-port", str(base),
            "--kv-cache-memory", KV_CACHE, "--max-batch-size", "2"]
    serve = await asyncio.to_thread(start_server, args, tmp_path, {**ENV, "JANUS_REDIS_MAXMEMORY": "256MiB"},
                                    ready_timeout=90)
    pids: set[int] = set()
    directory: Path | None = None
    try:
        kids = children(serve.proc.pid)
        [redis_pid] = [pid for pid, (name, _) in kids.items() if name == "redis-server"]
        workers = {pid for pid, (_, cmd) in kids.items() if "worker" in cmd}
        pids = {redis_pid, *workers}
        assert len(workers) == 2, kids
        [socket_path] = set(unix_socket_paths(redis_pid))  # the listener, and the connections it accepted
        directory = Path(socket_path).parent
        assert directory.name.startswith("janus-redis-") and socket_path.endswith("/redis.sock")
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_ISSOCK((directory / "redis.sock").stat().st_mode)
        assert "port 0\n" in (directory / "redis.conf").read_text()
        assert f"maxmemory {256 << 20}\n" in (directory / "redis.conf").read_text()

        async with httpx.AsyncClient(timeout=60) as http:
            seen: list[Any] = []

            async def both_live() -> bool:
                r = await http.get(serve.url + "/ready")
                seen[:] = [r.status_code, r.json()]
                return seen == [200, {"status": "ready", "workers": {"live": 2, "expected": 2, "by_gpu": {"cpu": 2}}}]

            await eventually(both_live, 60, lambda: f"/ready to count both workers (last: {seen}); serve's log:\n"
                                                    f"{serve.log()[-4000:]}")
            prompts = [("What is in the image?", 24), ("Describe", 20), ("Name the colours", 16)] * 2
            understand = [http.post(serve.url + "/v1/understand", json={
                "prompt": p, "images": [b64(IMAGE_PNG)], "max_new_tokens": n}) for p, n in prompts]
            generate = [http.post(serve.url + "/v1/generate", json={"prompt": f"a red boat {i}", "seed": i})
                        for i in range(6)]
            replies = await asyncio.gather(*understand, *generate)
            for reply in replies:
                assert reply.status_code == 200, reply.text
            for (prompt, n), reply in zip(prompts, replies[:len(prompts)], strict=True):
                assert reply.json()["text"] == expected_text(tiny_hf, prompt, n)
            for i, reply in enumerate(replies[len(prompts):]):
                body = reply.json()
                assert body["seed"] == i
                [image] = body["images"]
                png = Image.open(io.BytesIO(base64.b64decode(image["b64_png"])))
                assert png.size == (tiny_hf.image_size, tiny_hf.image_size)
            metrics = [(await http.get(f"http://127.0.0.1:{base + i}/metrics")).text for i in range(2)]
        # each worker started jobs (12 requests, at most 2 running per worker)...
        taken = [sample(text, "janus_queue_wait_seconds_count") for text in metrics]
        assert sum(taken) == len(replies) and min(taken) > 0, taken
        # ... with the KV pool serve's --kv-cache-memory asked for
        per_token = memory.plan(str(tiny_hf_dir), [1 << 30], "float32")["kv_bytes_per_token"]
        block = memory.BLOCK_SIZE
        expected_tokens = memory.parse_size(KV_CACHE) // (per_token * block) * block
        assert [sample(text, "janus_kv_cache_capacity_tokens") for text in metrics] == [expected_tokens] * 2

        serve.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(serve.proc.wait, 60) == 0, serve.log()[-3000:]
        assert not [pid for pid in pids if pid_alive(pid)], "serve left a worker or its redis-server running"
        assert not directory.exists(), "serve left the private redis directory behind"
    except BaseException:
        print(f"serve's log (the end):\n{serve.log()[-6000:]}")  # shown with the failure
        raise
    finally:
        serve.stop(signal.SIGKILL)
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if directory is not None:  # what a killed serve leaves
            shutil.rmtree(directory, ignore_errors=True)


async def test_a_killed_serve_takes_its_workers_and_redis_with_it(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """`kill -9` of serve: its workers (and the private redis-server) get SIGTERM from the kernel and exit, so no
    orphan keeps a GPU, its memory or its metrics port."""
    base = free_port_pair()
    args = ["serve", "--model", str(tiny_hf_dir), "--device", "cpu", "--workers", "2", "--metrics-port", str(base),
            "--kv-cache-memory", KV_CACHE]
    serve = await asyncio.to_thread(start_server, args, tmp_path, ENV, ready_timeout=90)
    kids = children(serve.proc.pid)
    try:
        assert len(kids) == 3, kids  # two workers and redis-server
        serve.proc.send_signal(signal.SIGKILL)
        serve.proc.wait()

        async def all_gone() -> bool:
            return not [pid for pid in kids if pid_alive(pid)]

        await eventually(all_gone, 60, lambda: f"serve's children to exit; alive: "
                                               f"{[kids[p] for p in kids if pid_alive(p)]}")
    finally:
        for pid in kids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_that_cannot_load_its_model_stops_serve(tmp_path: Path) -> None:
    """No restart loop: both workers exit with `cannot load`, serve says so and exits 1."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tmp_path / "missing"),
                          "--device", "cpu", "--workers", "2", "--host", "127.0.0.1", "--port", "0",
                          "--grpc-port", "0", "--no-log-json"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **ENV})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "cannot load the model" in out.stderr and "not restarting" in out.stderr
    assert "restarting it in" not in out.stderr
