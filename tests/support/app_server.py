"""The app in a real uvicorn server on a free loopback port, in a thread of the test process, without a model
(on the in-process queue, with no worker): for routes that never touch one, such as the playground's."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from server.http.app import create_app
from server.metrics import Metrics
from server.queue import create_queue
from server.service import Service
from server.settings import Settings
from tests.support.servers import free_port


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    app = create_app(settings, Service(settings, create_queue("memory")), Metrics())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
