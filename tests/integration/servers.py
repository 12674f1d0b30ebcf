"""Starting real `janus-server` processes on free loopback ports for integration tests."""

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def tokens_after_stop(url: str, tokens_before: float, kind: str = "understand", timeout: float = 30.0) -> float:
    """Waits until no `kind` job runs and the token counter has settled; the tokens produced since."""
    deadline = time.time() + timeout
    while metric(url, "janus_running_requests", kind=kind) > 0:
        assert time.time() < deadline, f"a {kind} job still runs after {timeout}s"
        time.sleep(0.1)
    last = metric(url, "janus_generated_tokens_total")
    while True:  # counters are folded in at each worker heartbeat
        time.sleep(0.5)
        now = metric(url, "janus_generated_tokens_total")
        if now == last or time.time() > deadline:
            return now - tokens_before
        last = now
