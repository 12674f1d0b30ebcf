"""The local worker pool of `serve` over Redis (`--queue`, or a private redis-server): worker processes,
one per assignment (`server.gpus`: on CUDA each pinned to its GPU with CUDA_VISIBLE_DEVICES), kept running.
Every setting serve was given reaches them through `JANUS_*` variables (`worker_env`).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from server import gpus
from server.gpus import Assignment
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # seconds up after which a worker's next crash restarts it without delay
POLL = 0.2


@dataclass
class _Slot:
    assignment: Assignment
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


# Not passed to workers: the frontend's keys, and the topology that only serve itself reads.
FRONTEND_ONLY = frozenset({"api_key", "api_keys_file", "workers", "gpus", "redis_server", "redis_maxmemory"})


def env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def settings_env(settings: Settings) -> dict[str, str | None]:
    """Every setting a worker reads, as the `JANUS_*` variable it reads it from (None: unset it), so flags
    given to serve reach its workers; secrets travel here, never in argv where `ps` shows them."""
    return {f"JANUS_{name.upper()}": None if value is None else env_value(value)
            for name in Settings.model_fields if name not in FRONTEND_ONLY
            for value in [getattr(settings, name)]}


PARENT_ENV = "JANUS_SUPERVISOR_PID"
CANNOT_LOAD = 3  # a worker's exit status when its model cannot load here: restarting cannot help


def parent_death_signal(parent: int) -> Callable[[], bool] | None:
    """Linux: a function that has the calling process get SIGTERM when the thread of `parent` that started it
    ends (a `kill -9` included) and says whether `parent` is still its parent (it may have died just before).
    Looked up here, so a child between fork and exec only makes the call. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> bool:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        return os.getppid() == parent

    return arm


def follow_parent() -> None:
    """In a worker that serve started: SIGTERM when serve dies, even by `kill -9`, so no worker is left holding
    a GPU; if serve is already gone, exit at once."""
    parent = os.environ.get(PARENT_ENV)
    arm = parent_death_signal(int(parent)) if parent else None
    if arm is not None and not arm():
        raise SystemExit("janus-server worker: the serve process that started this worker is gone")


def worker_command(settings: Settings, assignment: Assignment) -> list[str]:
    # Everything else travels in the environment (worker_env); these two make `ps` readable.
    return [sys.executable, "-m", "server.cli", "worker", "--model", str(settings.model),
            "--device", assignment.device]


def worker_env(settings: Settings, assignment: Assignment, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for name in FRONTEND_ONLY:  # nor inherited from serve's own environment
        env.pop(f"JANUS_{name.upper()}", None)
    env[PARENT_ENV] = str(os.getpid())  # the worker exits with serve (server.supervisor.follow_parent)
    for name, value in settings_env(settings).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env["JANUS_DEVICE"] = assignment.device
    env["JANUS_METRICS_PORT"] = str(settings.metrics_port + assignment.index)
    if assignment.visible is not None:
        env[gpus.ENV] = assignment.visible  # the worker sees its GPU alone, as cuda:0
    return env


def unpinned(settings: Settings) -> list[Assignment]:
    return [Assignment(i, settings.device, settings.device) for i in range(settings.workers or 1)]


Spawn = Callable[[list[str], dict[str, str]], subprocess.Popen]


def popen(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=env)


class WorkerSupervisor:
    """`assignments`: one per worker (`server.gpus.plan_workers`); default `settings.workers` unpinned ones.
    `spawn(command, env)` starts one (tests pass their own)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, spawn: Spawn | None = None,
                 assignments: list[Assignment] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._spawn = spawn or popen
        self._slots = [_Slot(a) for a in (assignments or unpinned(settings))]
        self._stopping = False
        self.fatal: str | None = None  # why serve must stop: a worker that cannot load its model
        self._hostname = socket.gethostname()

    @property
    def expected(self) -> int:
        return len(self._slots)

    def expected_by_gpu(self) -> dict[str, int]:
        return gpus.expected_by_gpu([s.assignment for s in self._slots])

    def worker_ids(self) -> set[str]:
        """Queue ids of the running children (`server.worker.default_worker_id` of each)."""
        return {f"{self._hostname}-{s.proc.pid}" for s in self._slots if s.proc is not None and s.proc.poll() is None}

    def start(self) -> None:
        for slot in self._slots:
            self._start(slot)

    async def run(self) -> None:
        """Watch the children until `stop` (or until a worker cannot load its model: `fatal`); call `start`
        first."""
        while not self._stopping and self.fatal is None:
            self.check()
            await asyncio.sleep(POLL)

    def stopping(self) -> None:
        """No restarts from here on (serve got SIGTERM or Ctrl-C; the children get it too, or from `stop`)."""
        self._stopping = True

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
        a = slot.assignment
        slot.proc = self._spawn(worker_command(self.settings, a), worker_env(self.settings, a))
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("worker %d started (pid %d) on %s", a.index, slot.proc.pid, _where(a))

    def _on_exit(self, slot: _Slot, code: int, now: float) -> None:
        assert slot.proc is not None
        pid, slot.proc = slot.proc.pid, None
        if self._stopping:
            return
        if code == CANNOT_LOAD:
            self.fatal = (f"worker {slot.assignment.index} on {_where(slot.assignment)} cannot load the model "
                          "(its log says why); not restarting it")
            log.error("%s", self.fatal)
            return
        if now - slot.started >= STABLE_AFTER:
            slot.backoff = FIRST_BACKOFF
        delay = slot.backoff
        slot.backoff = min(slot.backoff * 2, MAX_BACKOFF)
        slot.restart_at = now + delay
        if self.metrics is not None:
            self.metrics.worker_restarts.inc()
        log.error("worker %d (pid %d) on %s %s; restarting it in %.0f s", slot.assignment.index, pid,
                  _where(slot.assignment), describe_exit(code), delay)


def _where(a: Assignment) -> str:
    return f"GPU {a.label}" if a.visible is not None else a.label
