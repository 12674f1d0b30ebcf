"""Idempotency keys: who a request belongs to, what it asked for, and the key the queues store.

A client that retries a request (its connection dropped, its frontend died) sends the same
`Idempotency-Key` (gRPC metadata `idempotency-key`) and gets the same job: a running one is joined, a
finished one answered from its stored result, never a second run. Keys are scoped to the caller (a
hash of the bearer token it sent; "anonymous" without one), so another client cannot reach your job
by guessing your key, and bound to a fingerprint of the request (route and parameters, images by
their hash), so the same key with another body is refused instead of answered with the wrong job.

The queues see only `Job.idempotency_key` (a hash of caller and key: the raw key and the token never
leave the frontend) and `Job.fingerprint`. This module knows requests, not queues or HTTP.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

MAX_KEY_CHARS = 255
ANONYMOUS = "anonymous"


class InvalidIdempotencyKey(ValueError):
    pass


def check_key(key: str | None) -> str | None:
    """The key as sent, or None for none; `InvalidIdempotencyKey` for one that is empty, too long or not
    printable ASCII (it travels in headers and logs)."""
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise InvalidIdempotencyKey(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters")
    return key


def caller_of(authorization: str | None) -> str:
    """Whose request this is: a short hash of the bearer token it carries (never the token), else anonymous."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return ANONYMOUS
    return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def scoped_key(caller: str, key: str) -> str:
    """What the queues store the key under: the same key of two callers never meets."""
    return hashlib.sha256(f"{caller}\n{key}".encode()).hexdigest()


def fingerprint(route: str, params: Any, stream: bool) -> str:
    """A hash of what the request asks for: the route, every parameter, images by content."""
    fields = asdict(params)
    if "images" in fields:
        fields["images"] = [hashlib.sha256(image).hexdigest() for image in fields["images"]]
    text = json.dumps({"route": route, "stream": stream, "params": fields}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
