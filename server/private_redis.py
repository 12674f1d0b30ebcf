"""A private `redis-server` for `serve`'s own workers: a unix socket in a directory only this user can open,
no TCP port, no persistence, a `maxmemory` with `noeviction` (the queue refuses new jobs at 80% of it, so
admitted jobs' results still fit; Redis never drops a queued job or a result to make room).

It runs in a session of its own, so a terminal's Ctrl-C reaches serve and the workers (which drain) but not
the queue they drain into; serve stops it after its workers. On Linux it also gets SIGTERM if serve dies.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from server.supervisor import parent_death_signal

log = logging.getLogger(__name__)

MAX_MEMORY = 1 << 30  # 1 GiB, or a quarter of the machine's memory where that is less
SOCKET = "redis.sock"


class PrivateRedisError(RuntimeError):
    """redis-server could not be started (not installed, or it exited or did not answer)."""


def default_maxmemory() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return MAX_MEMORY
    return max(min(MAX_MEMORY, physical // 4), 64 << 20)


def _config(directory: Path, maxmemory: int) -> str:
    return "\n".join([
        "port 0",  # no TCP listener at all
        f'unixsocket "{directory / SOCKET}"',
        "unixsocketperm 700",
        f'dir "{directory}"',
        'save ""',
        "appendonly no",
        f"maxmemory {maxmemory}",
        "maxmemory-policy noeviction",
        "daemonize no",
        "loglevel warning",
        "",
    ])


def _die_with_parent():
    """The child's pre-exec hook: SIGTERM when serve dies (a `kill -9` included), and no start at all if serve
    died before the call (server.supervisor.parent_death_signal; None off Linux)."""
    arm = parent_death_signal(os.getpid())
    if arm is None:
        return None

    def hook() -> None:
        if not arm():
            os._exit(1)

    return hook


class PrivateRedis:
    """`start()` returns once redis-server answers PING on its socket; `stop()` ends it and removes its
    directory. `url` is the `unix://` URL the queue connects to."""

    def __init__(self, executable: str, *, maxmemory: int | None = None) -> None:
        self.executable = executable
        self.maxmemory = maxmemory or default_maxmemory()
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / SOCKET

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def start(self, timeout: float = 10.0) -> str:
        # AF_UNIX paths are short (108 bytes): a long TMPDIR would not fit one
        base = None if len(tempfile.gettempdir()) < 64 else "/tmp"
        self.directory = Path(tempfile.mkdtemp(prefix="janus-redis-", dir=base))  # mode 0700
        (self.directory / "redis.conf").write_text(_config(self.directory, self.maxmemory))
        with open(self.directory / "redis.log", "wb") as out:
            self.process = subprocess.Popen([self.executable, str(self.directory / "redis.conf")], stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=_die_with_parent())
        give_up = time.monotonic() + timeout
        while not self.responds():
            if self.process.poll() is not None or time.monotonic() > give_up:
                what = (f"exited with status {self.process.returncode}" if self.process.poll() is not None
                        else f"did not answer PING within {timeout:.0f} s")
                output = (self.directory / "redis.log").read_text(errors="replace").strip()[-2000:]
                self.stop()
                raise PrivateRedisError(f"{self.executable} {what}" + (f": {output}" if output else ""))
            time.sleep(0.02)
        log.info("private redis-server (pid %d) on %s, maxmemory %d MiB", self.process.pid, self.url,
                 self.maxmemory >> 20)
        return self.url

    def responds(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis saves nothing here and exits), SIGKILL past `timeout`; then the directory goes."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            log.info("private redis-server (pid %d) stopped", self.process.pid)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
