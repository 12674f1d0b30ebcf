"""The local worker pool of `serve --queue redis://... --workers N`: N worker processes, kept running.

A worker that exits (crash, OOM kill, `kill -9`) is reaped at once, logged with its exit status,
counted in `janus_worker_restarts_total` and started again after a backoff that doubles while
restarts keep failing quickly (1 s up to 30 s) and resets once a worker has stayed up for a minute.
Its jobs are not this module's business: the queue hands them to another worker once the dead
one's heartbeat stops. `worker_ids` names the live children, so /ready can count live capacity.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # seconds up after which a worker's next crash restarts it without delay
POLL = 0.2


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def worker_command(settings: Settings) -> list[str]:
    # The queue URL travels in the environment (JANUS_QUEUE), not in argv where `ps` shows a password.
    return [sys.executable, "-m", "server.cli", "worker", "--model", str(settings.model),
            "--device", settings.device, "--dtype", settings.dtype]


def worker_env(settings: Settings, index: int) -> dict[str, str]:
    return dict(os.environ, JANUS_QUEUE=settings.queue, JANUS_METRICS_PORT=str(settings.metrics_port + index))


class WorkerSupervisor:
    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 spawn: Callable[[int], subprocess.Popen] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._spawn = spawn or (lambda i: subprocess.Popen(worker_command(settings), env=worker_env(settings, i)))
        self._slots = [_Slot(i) for i in range(settings.workers)]
        self._stopping = False
        self._hostname = socket.gethostname()

    @property
    def expected(self) -> int:
        return len(self._slots)

    def worker_ids(self) -> set[str]:
        """Queue ids of the running children (`server.worker.default_worker_id` of each)."""
        return {f"{self._hostname}-{s.proc.pid}" for s in self._slots if s.proc is not None and s.proc.poll() is None}

    def start(self) -> None:
        for slot in self._slots:
            self._start(slot)

    async def run(self) -> None:
        """Watch the children until `stop`; call `start` first."""
        while not self._stopping:
            self.check()
            await asyncio.sleep(POLL)

    def check(self) -> None:
        """Reap exited children and start the ones whose backoff has passed (one pass)."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.proc is not None and (code := slot.proc.poll()) is not None:  # poll() reaps
                self._on_exit(slot, code, now)
            if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at and not self._stopping:
                self._start(slot)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM every child (they drain their running jobs), then wait; SIGKILL past `timeout`."""
        self._stopping = True
        procs = [s.proc for s in self._slots if s.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(give_up - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _start(self, slot: _Slot) -> None:
        slot.proc = self._spawn(slot.index)
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _on_exit(self, slot: _Slot, code: int, now: float) -> None:
        assert slot.proc is not None
        pid, slot.proc = slot.proc.pid, None
        if self._stopping:
            return
        if now - slot.started >= STABLE_AFTER:
            slot.backoff = FIRST_BACKOFF
        delay = slot.backoff
        slot.backoff = min(slot.backoff * 2, MAX_BACKOFF)
        slot.restart_at = now + delay
        if self.metrics is not None:
            self.metrics.worker_restarts.inc()
        log.error("worker %d (pid %d) %s; restarting it in %.0f s", slot.index, pid, describe_exit(code), delay)
