"""How the Redis queue modules tell "Redis is down" from "Redis refused us", and small helpers.

`DOWN` are the errors worth retrying (the server is unreachable or restarting); authentication
and TLS failures are configuration errors that no retry fixes, and `config_problem` names them.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as redis_errors

# Errors that mean "Redis is not reachable right now" (BusyLoadingError is a ConnectionError).
# AuthenticationError is a ConnectionError too in redis-py; `config_problem` singles it out.
DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, asyncio.TimeoutError)


def pool_exhausted(exc: BaseException) -> bool:
    """Our own connection pool had no free connection in time: this process is busy, Redis is not down."""
    return isinstance(exc, redis_errors.ConnectionError) and any(
        marker in str(exc) for marker in ("No connection available", "Too many connections"))


def ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # asyncio's TimeoutError has no message


def config_problem(exc: BaseException) -> str | None:
    """A sentence naming what is misconfigured, if `exc` is an auth or TLS failure; else None."""
    text = describe(exc)
    if isinstance(exc, redis_errors.AuthenticationError) or any(
            marker in text for marker in ("WRONGPASS", "NOAUTH", "invalid password", "invalid username")):
        return ("Redis refused the credentials (set the password in the queue URL or JANUS_QUEUE_PASSWORD, "
                f"and the ACL user if any): {text}")
    if isinstance(exc, redis_errors.ResponseError) and "NOPERM" in text:
        return f"the Redis ACL user lacks a permission the queue needs: {text}"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"the TLS connection to Redis failed (check JANUS_QUEUE_TLS_CA and the rediss:// URL): {text}"
        cause = cause.__cause__ or cause.__context__
    if "SSL" in text or "certificate" in text.lower():
        return f"the TLS connection to Redis failed (check JANUS_QUEUE_TLS_CA and the rediss:// URL): {text}"
    return None


def redact(url: str) -> str:
    """The queue URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))
