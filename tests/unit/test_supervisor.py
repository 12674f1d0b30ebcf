"""WorkerSupervisor's exit descriptions and the circuit breaker's state machine on a fake clock, with no child
processes (tests/integration/test_supervisor_processes.py reaps and restarts real ones)."""

from __future__ import annotations

import signal

import pytest

from server import supervisor as sup
from server.queue.breaker import CircuitBreaker


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
