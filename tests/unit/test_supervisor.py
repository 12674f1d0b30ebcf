"""WorkerSupervisor with stand-in child processes (no model): reaping, restart backoff, metrics,
and the circuit breaker's state machine on a fake clock."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from server import supervisor as sup
from server.metrics import Metrics
from server.queue.breaker import CircuitBreaker
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


def test_exit_descriptions() -> None:
    assert sup.describe_exit(3) == "exited with status 3"
    assert sup.describe_exit(-signal.SIGTERM) == "killed by SIGTERM"


def test_breaker_opens_after_sustained_failure_probes_and_closes() -> None:
    now = [100.0]
    breaker = CircuitBreaker(probe_interval=0.5, open_after=0.5, clock=lambda: now[0])
    assert breaker.allow() and not breaker.is_open
    breaker.failure()
    now[0] += 0.2
    assert not breaker.is_open and breaker.allow()  # one failure is not an outage yet
    breaker.success()  # ... and a success in between starts the count again
    breaker.failure()
    now[0] += 0.6
    assert breaker.is_open
    assert breaker.allow()  # one probe ...
    assert not breaker.allow()  # ... and only one per interval
    breaker.failure()
    assert breaker.down_for() == pytest.approx(0.6)
    now[0] += 0.5
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and breaker.allow() and breaker.down_for() == 0.0
