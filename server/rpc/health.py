"""grpc.health.v1 over the service's readiness, cached and polled once for any number of watchers."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from server.rpc.gate import SERVICE_NAME
from server.service import Service

log = logging.getLogger(__name__)

# --- readiness, shared by the servicer (refuse early) and the health service --------------------


class Readiness:
    """`Service.readiness()` cached for `ttl` seconds, so probes and requests don't hammer the queue."""

    def __init__(self, service: Service, ttl: float = 1.0) -> None:
        self._service = service
        self._ttl = ttl
        self._lock = asyncio.Lock()
        self._checked_at = -math.inf
        self._value: tuple[bool, str] = (False, "not checked yet")

    async def check(self) -> tuple[bool, str]:
        async with self._lock:
            if time.monotonic() - self._checked_at >= self._ttl:
                self._value = await self._service.readiness()
                self._checked_at = time.monotonic()
            return self._value


MAX_HEALTH_WATCHES = 256  # health needs no key: this bounds what anonymous watchers can hold


class HealthServicer(health_aio.HealthServicer):
    """grpc.health.v1: SERVING (for "" and janus.v1.Janus) only while `Service.readiness()` holds.

    Check refreshes the status. While any Watch is open, one poller task refreshes it every `poll` seconds
    (started by the first Watch, stopped when the last ends), so many watchers cost what one does. Watch
    streams beyond `max_watches` are refused with RESOURCE_EXHAUSTED: each holds one of the server's call
    slots, and probes need no key."""

    def __init__(self, readiness: Readiness, poll: float = 1.0, max_watches: int = MAX_HEALTH_WATCHES) -> None:
        super().__init__()
        self._readiness = readiness
        self._poll = poll
        self._max_watches = max_watches
        self._watches = 0
        self._poller: asyncio.Task[None] | None = None
        self._serving: int | None = None  # the status last set; unchanged ones wake no watcher
        # one refresh at a time, so an older reading never lands after a newer one
        self._refreshing = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._refreshing:
            ready, _ = await self._readiness.check()
            serving = health_pb2.HealthCheckResponse
            status = serving.SERVING if ready else serving.NOT_SERVING
            if status == self._serving:
                return
            self._serving = status
            for name in ("", SERVICE_NAME):
                await self.set(name, status)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if self._watches >= self._max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self._watches} health Watch streams are open, the most this server keeps; "
                                "retry later or poll Check")
        self._watches += 1
        if self._poller is None:
            self._poller = asyncio.create_task(self._refresh_forever())
        try:
            await self.refresh()
            await super().Watch(request, context)
        finally:
            self._watches -= 1
            if self._watches == 0 and self._poller is not None:
                self._poller.cancel()
                self._poller = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                await self.refresh()
            except Exception:  # a failed probe must not end the Watch streams
                log.exception("health refresh failed")
