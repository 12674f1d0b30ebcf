"""The REST edge: the API key and its quotas, checked before a request body is read.

`KeyGuard` is a pure ASGI middleware. With keys configured, every path needs one except the probes
(/health, /ready), the playground's own files, and what the operator opened (`--open-docs`,
`--open-metrics`); a refused request never has its body read, so a client without a key costs a header
parse. Each POST to /v1/ is a request in flight of its key until its response (streamed or not) ends, or,
for an async job, until the job ends; over the key's quota it gets 429 with `Retry-After`. The key's name
rides in the ASGI scope (`state.key_name`, for the access log) and in `server.keys.current_key` (for the job's
owner and the image quota).
"""

from __future__ import annotations

import asyncio
import math

from server.http.common import error_response
from server.keys import KeyRing, LeaseHolder, Quotas, RateLimited, Unauthorized, admit, current_key, current_lease
from server.metrics import Metrics
from server.settings import Settings

ALWAYS_OPEN = frozenset({"/health", "/ready", "/favicon.ico"})
PLAYGROUND = frozenset({"/", "/playground"})
DOCS = frozenset({"/openapi.json"})


def open_paths(settings: Settings) -> frozenset[str]:
    paths = set(ALWAYS_OPEN)
    if settings.playground:
        paths |= PLAYGROUND
    if settings.open_docs:
        paths |= DOCS
    if settings.open_metrics:
        paths.add("/metrics")
    return frozenset(paths)


def rate_limited_response(exc: RateLimited):
    return error_response(429, str(exc), "rate_limited", {"Retry-After": str(max(math.ceil(exc.retry_after), 1))})


class KeyGuard:
    def __init__(self, app, settings: Settings, keys: KeyRing, quotas: Quotas, metrics: Metrics) -> None:
        self.app = app
        self.keys = keys
        self.quotas = quotas
        self.metrics = metrics
        self.open = open_paths(settings)
        self.playground = settings.playground

    def _is_open(self, path: str) -> bool:
        return path in self.open or (self.playground and path.startswith("/playground/"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not self.keys.enabled:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self._is_open(path):
            return await self.app(scope, receive, send)
        authorization = None
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            key = self.keys.identify(authorization)
        except Unauthorized as exc:
            response = error_response(401, str(exc), headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        assert key is not None
        scope.setdefault("state", {})["key_name"] = key.name
        lease = None
        if scope.get("method") == "POST" and path.startswith("/v1/"):
            try:
                lease = await admit(self.quotas, key)
            except RateLimited as exc:
                self.metrics.rate_limited.labels(exc.key).inc()
                return await rate_limited_response(exc)(scope, receive, send)
        token = current_key.set(key)
        holder = LeaseHolder(lease)  # an async job takes the lease with it (server.service)
        lease_token = current_lease.set(holder)
        try:
            await self.app(scope, receive, send)
        finally:
            current_key.reset(token)
            current_lease.reset(lease_token)
            await asyncio.shield(self.quotas.leave(holder.lease))  # a hang-up must not keep the slot
