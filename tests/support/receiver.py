"""Real HTTP receivers for tests: `LoopbackServer`, an HTTP server on a free loopback port, in a thread of its own
while in a `with` block (tests.support.otlp's receiver is one too); and `WebhookReceiver`, which records every POST.

Each try is kept with its status, headers and body, by the job id in the body. `fail_next(k)` makes the next k
tries answer 500; `wait_delivered(job_id)` waits (on an event, not a sleep loop) for a try answered 200.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


@dataclass
class Try:
    status: int
    headers: dict[str, str]
    body: bytes


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no line on stderr per request
        pass


class LoopbackServer:
    """`handler` served on 127.0.0.1 at a free port, on a thread started by `with` and stopped at its end."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class WebhookReceiver(LoopbackServer):
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._tries: dict[str, list[Try]] = {}
        self._failures = 0
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    status = 500 if receiver._failures > 0 else 200
                    receiver._failures = max(receiver._failures - 1, 0)
                    try:
                        job_id = str(json.loads(body).get("id"))
                    except ValueError:
                        job_id = "?"
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver._tries.setdefault(job_id, []).append(Try(status, headers, body))
                    receiver._lock.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        super().__init__(Handler)

    def fail_next(self, count: int) -> None:
        with self._lock:
            self._failures = count

    def tries(self, job_id: str) -> list[Try]:
        with self._lock:
            return list(self._tries.get(job_id, []))

    def wait_delivered(self, job_id: str, timeout: float = 60.0) -> Try:
        with self._lock:
            def ok() -> Try | None:
                return next((t for t in self._tries.get(job_id, []) if t.status == 200), None)

            if not self._lock.wait_for(lambda: ok() is not None, timeout):
                raise AssertionError(f"no successful delivery for job {job_id} within {timeout}s: "
                                     f"{[t.status for t in self._tries.get(job_id, [])]}")
            found = ok()
            assert found is not None
            return found
