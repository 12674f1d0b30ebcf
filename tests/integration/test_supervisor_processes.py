"""WorkerSupervisor with stand-in child processes (no model): a killed child is reaped, counted and restarted
with backoff; each child runs with its own GPU pinned in its environment, as serve's plan says."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from server import gpus
from server import supervisor as sup
from server.metrics import Metrics
from server.settings import Settings


def sleeper(_command: list[str], _env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def wait_for(condition, timeout: float = 20.0) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, "timed out"
        time.sleep(0.02)


def test_a_killed_worker_is_reaped_counted_and_restarted(caplog) -> None:
    metrics = Metrics()
    pool = sup.WorkerSupervisor(Settings(workers=2, model="m"), metrics, spawn=sleeper)
    pool.start()
    try:
        first = pool.worker_ids()
        assert len(first) == 2
        victim = pool._slots[0].proc
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        pool.check()
        assert len(pool.worker_ids()) == 1  # reaped at once: no <defunct> child, counted as gone
        assert victim.returncode == -signal.SIGKILL
        assert "killed by SIGKILL" in caplog.text and "restarting it in" in caplog.text
        wait_for(lambda: (pool.check(), len(pool.worker_ids()) == 2)[1])
        assert pool.worker_ids() != first
        assert metrics.registry.get_sample_value("janus_worker_restarts_total") == 1
        assert pool._slots[0].backoff == 2 * sup.FIRST_BACKOFF  # a second quick crash would wait longer
    finally:
        pool.stop(timeout=10)
    assert all(s.proc is None or s.proc.poll() is not None for s in pool._slots)


def test_each_worker_process_starts_pinned_to_its_gpu(tmp_path: Path, caplog, monkeypatch) -> None:
    """Real children that write the environment they were started with (the command is the worker's own
    `server.cli worker ...`, run here as a script that only reports)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,MIG-bbb,GPU-ccc")
    caplog.set_level(logging.INFO, logger="server.supervisor")
    report = ("import json, os, sys, time; out = sys.argv[1]; seen = {'argv': sys.argv[2:], **{k: v for k, v in "
              "os.environ.items() if k == 'CUDA_VISIBLE_DEVICES' or k.startswith('JANUS_')}}; "
              "open(out + '.part', 'w').write(json.dumps(seen)); os.replace(out + '.part', out); time.sleep(60)")

    def reporter(command: list[str], env: dict[str, str]) -> subprocess.Popen:
        out = tmp_path / f"worker-{env['JANUS_METRICS_PORT']}.json"
        return subprocess.Popen([sys.executable, "-c", report, str(out), *command[3:]], env=env)

    settings = Settings(model="/m", device="cuda", workers=4, gpus=["2", "1"], metrics_port=9300,
                        kv_cache_memory="64MiB", max_batch_size=3)
    assignments = gpus.plan_workers(settings.device, settings.workers, settings.gpus)
    pool = sup.WorkerSupervisor(settings, spawn=reporter, assignments=assignments)
    pool.start()
    try:
        files = [tmp_path / f"worker-{9300 + i}.json" for i in range(4)]
        wait_for(lambda: all(f.exists() for f in files))
        seen = [json.loads(f.read_text()) for f in files]
    finally:
        pool.stop(timeout=10)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in seen] == ["GPU-ccc", "MIG-bbb", "GPU-ccc", "MIG-bbb"]
    assert {(s["JANUS_DEVICE"], s["JANUS_KV_CACHE_MEMORY"], s["JANUS_MAX_BATCH_SIZE"]) for s in seen} == {
        ("cuda", "64MiB", "3")}
    assert all(s["argv"] == ["worker", "--model", "/m", "--device", "cuda"] for s in seen)
    assert "worker 0 started" in caplog.text and "on GPU GPU-ccc" in caplog.text and "on GPU MIG-bbb" in caplog.text


def test_a_worker_that_cannot_load_stops_serve_instead_of_restarting(caplog) -> None:
    """Exit status 3 (`janus-server worker` when its model cannot load: a bad path, fp8 on a GPU without it)
    is final: restarting cannot fix it, so the supervisor reports it instead of looping."""
    def cannot_load(_command: list[str], _env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({sup.CANNOT_LOAD})"])

    metrics = Metrics()
    pool = sup.WorkerSupervisor(Settings(workers=2, model="m"), metrics, spawn=cannot_load)
    pool.start()
    try:
        wait_for(lambda: (pool.check(), pool.fatal is not None)[1])
        assert "cannot load the model" in pool.fatal and "not restarting" in caplog.text
        assert metrics.registry.get_sample_value("janus_worker_restarts_total") == 0
        assert all(s.restart_at is None for s in pool._slots)
    finally:
        pool.stop(timeout=10)


def test_no_restarts_once_serve_is_stopping() -> None:
    """Ctrl-C reaches the whole process group: workers drain and exit 0 while the API is still draining."""
    pool = sup.WorkerSupervisor(Settings(workers=1, model="m"), spawn=sleeper)
    pool.start()
    try:
        pool.stopping()
        child = pool._slots[0].proc
        child.send_signal(signal.SIGTERM)
        child.wait()
        pool.check()
        assert pool._slots[0].proc is None and pool._slots[0].restart_at is None
    finally:
        pool.stop(timeout=10)
