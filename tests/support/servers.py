"""Starting real `janus-server` processes (serve, api, worker) on free loopback ports for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

_handed_out: set[int] = set()  # ports this test process gave out: a port free now may be a server's in a moment


def free_port() -> int:
    """A free loopback port, never one this process gave out before (the second port of a pair included)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def pid_alive(pid: int) -> bool:
    """A process of that pid exists (a reaped child does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port_pair() -> int:
    """A free port p with p + 1 free too (`serve --workers 2` gives its workers metrics_port + i); neither is
    given out again by `free_port` (a server started next once took p + 1 for its gRPC port)."""
    while True:
        port = free_port()
        if port + 1 in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        _handed_out.add(port + 1)
        return port


@dataclass
class ManagedProcess:
    """A subprocess the tests started, with its log file; `stop` escalates to SIGKILL."""

    proc: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@dataclass
class ServerProcess(ManagedProcess):
    port: int = 0
    grpc_port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(args: list[str], log_dir: Path, env: dict[str, str] | None = None, *, ready_timeout: float = 120.0,
                 wait_ready: bool = True) -> ServerProcess:
    """Run `janus-server <args>` with --port/--grpc-port chosen here; wait until /ready answers 200."""
    port, grpc_port = free_port(), free_port()
    full_env = {**os.environ, "JANUS_HEARTBEAT_INTERVAL": "0.2", "JANUS_LOG_LEVEL": "info",
                "HF_HUB_OFFLINE": "1", **(env or {})}
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "server.cli", *args, "--host", "127.0.0.1", "--port", str(port),
           "--grpc-port", str(grpc_port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, log_path, port=port, grpc_port=grpc_port, env=full_env)
    if wait_ready:
        wait_until_ready(server, ready_timeout)
    return server


@dataclass
class WorkerProcess(ManagedProcess):
    metrics_port: int = 0

    @property
    def worker_id(self) -> str:
        return f"{socket.gethostname()}-{self.proc.pid}"  # server.worker.default_worker_id

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"


def spawn_worker(queue_url: str, model_dir: Path, log_dir: Path, env: dict[str, str] | None = None) -> WorkerProcess:
    """`janus-server worker` on `queue_url`, its metrics port chosen here; returns at once (see
    `wait_http_ok` on its /ready and `wait_for_heartbeat`)."""
    port = free_port()
    log_path = log_dir / f"worker-{port}.log"
    cmd = [sys.executable, "-m", "server.cli", "worker", "--queue", queue_url, "--model", str(model_dir),
           "--metrics-port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return WorkerProcess(proc, log_path, metrics_port=port)


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 90.0) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s:\n{log_path.read_text()[-4000:]}")


def wait_for_heartbeat(queue_url: str, worker_id: str, timeout: float = 30.0) -> None:
    client = redis.Redis.from_url(queue_url, decode_responses=True)
    try:
        give_up = time.monotonic() + timeout
        while client.zscore("janus:workers", worker_id) is None:
            if time.monotonic() > give_up:
                raise RuntimeError(f"worker {worker_id} sent no heartbeat within {timeout}s")
            time.sleep(0.1)
    finally:
        client.close()


def wait_until_ready(server: ServerProcess, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.url + "/ready", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()[-4000:]}")


def metric(url: str, name: str, **labels: str) -> float:
    """One sample from `url`/metrics. A sample that is not exported fails the test: reading it as 0
    would let a test that waits for "0 running" pass without anything having run or stopped."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} is not exported by {url}")


def _oldest_heartbeat(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    beats = [s.value for family in text_string_to_metric_families(text) for s in family.samples
             if s.name == "janus_worker_heartbeat_timestamp_seconds"]
    return min(beats, default=0.0)


def wait_for_fresh_metrics(url: str, timeout: float = 30.0) -> None:
    """Waits until every worker behind `url` has folded into its metrics engine statistics taken after this
    call: workers fold them in at each heartbeat, just before stamping its time, so two stamps after now."""
    since, deadline = time.time(), time.time() + timeout
    for _ in range(2):
        while (beat := _oldest_heartbeat(url)) <= since:
            assert time.time() < deadline, f"no worker heartbeat in {timeout}s"
            time.sleep(0.05)
        since = beat


def tokens_after_stop(url: str, tokens_before: float, kind: str = "understand", timeout: float = 30.0) -> float:
    """Waits until no `kind` job runs and its statistics reached the metrics; the tokens produced since."""
    deadline = time.time() + timeout
    while metric(url, "janus_running_requests", kind=kind) > 0:
        assert time.time() < deadline, f"a {kind} job still runs after {timeout}s"
        time.sleep(0.1)
    wait_for_fresh_metrics(url, timeout)
    return metric(url, "janus_generated_tokens_total") - tokens_before
