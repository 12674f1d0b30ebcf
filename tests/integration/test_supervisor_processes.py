"""WorkerSupervisor with stand-in child processes (no model): a killed child is reaped, counted and restarted
with backoff."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from server import supervisor as sup
from server.metrics import Metrics
from server.settings import Settings


def sleeper(_: int) -> subprocess.Popen:
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
