"""API keys: who a request is, and how much of the server it may take.

A `KeyRing` holds the accepted keys. `--api-key` / `JANUS_API_KEY` gives unnamed ones (named `default`,
`default-2`, ...); `--api-keys-file` a YAML or JSON file of named keys, each stored as the sha256 of the key
so the file holds no secret:

    keys:
      - name: team-a
        sha256: 5e8848...              # printf %s "$KEY" | sha256sum
        max_in_flight: 8               # requests held open at once
        requests_per_minute: 120
        images_per_minute: 60          # generated images
        weight: 2                      # share of the queue's dispatch, against the others' 1

The file is read again when it changes (its modification time, checked at most once a second); a broken
file keeps the keys that were loaded and logs why. Keys are compared in constant time by their hash.

`Quotas` meters each key: requests in flight, and token buckets that refill per minute (in this process;
in Redis mode `RedisQuotas` counts them across every frontend). Over a limit raises `RateLimited` with the
seconds until it would pass. `current_key` is the key of the request being handled (set by the REST
middleware and the gRPC guard), read where jobs are submitted.
This module knows no HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # names appear in logs and metric labels
HEX64 = re.compile(r"^[0-9a-f]{64}$")
RELOAD_CHECK = 1.0  # seconds between checks of the file's modification time


@dataclass(frozen=True)
class Key:
    name: str
    digest: bytes = field(repr=False)  # sha256 of the key
    max_in_flight: int | None = None
    requests_per_minute: int | None = None
    images_per_minute: int | None = None
    weight: float = 1.0

    @property
    def caller(self) -> str:
        """What jobs carry as their owner: the key's name, never the key."""
        return f"key:{self.name}"


current_key: contextvars.ContextVar[Key | None] = contextvars.ContextVar("janus_key", default=None)


class InvalidKeysFile(ValueError):
    pass


class Unauthorized(Exception):
    pass


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float, key: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.key = key


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _limit(entry: dict[str, Any], name: str, where: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidKeysFile(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def parse_keys(data: Any) -> list[Key]:
    """`{"keys": [...]}` or the list itself -> keys; `InvalidKeysFile` names the first problem."""
    entries = data.get("keys") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InvalidKeysFile("expected a list of keys (or {keys: [...]})")
    known = {"name", "sha256", "max_in_flight", "requests_per_minute", "images_per_minute", "weight"}
    keys: list[Key] = []
    for i, entry in enumerate(entries):
        where = f"keys[{i}]"
        if not isinstance(entry, dict):
            raise InvalidKeysFile(f"{where}: expected a mapping")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise InvalidKeysFile(f"{where}: unknown field(s) {', '.join(unknown)} (the key itself is never "
                                  "stored: give its sha256)")
        name, hexed = entry.get("name"), str(entry.get("sha256", "")).lower()
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidKeysFile(f"{where}: name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        if not HEX64.match(hexed):
            raise InvalidKeysFile(f"{where} ({name}): sha256 must be 64 hex digits")
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.01 <= weight <= 100:
            raise InvalidKeysFile(f"{where} ({name}): weight must be a number from 0.01 to 100, got {weight!r}")
        keys.append(Key(name, bytes.fromhex(hexed), _limit(entry, "max_in_flight", where),
                        _limit(entry, "requests_per_minute", where), _limit(entry, "images_per_minute", where),
                        float(weight)))
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise InvalidKeysFile("key names must be unique")
    if len({k.digest for k in keys}) != len(keys):
        raise InvalidKeysFile("two entries have the same sha256")
    return keys


def load_keys_file(path: str) -> list[Key]:
    import yaml  # YAML is a superset of JSON: one parser reads both

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise InvalidKeysFile(f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise InvalidKeysFile(f"{path} is not valid YAML or JSON: {exc}") from exc
    return parse_keys(data)


class KeyRing:
    def __init__(self, plain: list[str] | None = None, path: str | None = None) -> None:
        self._plain = [Key("default" if i == 0 else f"default-{i + 1}", digest(secret))
                       for i, secret in enumerate(plain or [])]
        self._path = path
        self._mtime: float | None = None
        self._checked = -math.inf
        self._from_file: list[Key] = load_keys_file(path) if path else []
        if path:
            self._mtime = _mtime(path)
        self._keys = self._plain + self._from_file
        _check_distinct(self._keys)

    @classmethod
    def from_settings(cls, settings: Any) -> KeyRing:
        return cls(list(settings.api_key), settings.api_keys_file)

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self._path is not None

    @property
    def keys(self) -> list[Key]:
        return list(self._keys)

    def identify(self, authorization: str | None) -> Key | None:
        """The key an `Authorization: Bearer ...` value names; None when no keys are configured;
        `Unauthorized` for a missing or unknown one."""
        self.maybe_reload()
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        given = digest(token)
        found = None
        for key in self._keys:  # every comparison runs, so the time taken says nothing about near misses
            if hmac.compare_digest(given, key.digest):
                found = key
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def maybe_reload(self) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK:
            return
        self._checked = now
        mtime = _mtime(self._path)
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            keys = load_keys_file(self._path)
            _check_distinct(self._plain + keys)
        except InvalidKeysFile as exc:
            log.error("keeping the %d keys loaded before: %s", len(self._from_file), exc)
            return
        self._from_file = keys
        self._keys = self._plain + keys
        log.info("loaded %d API keys from %s", len(keys), self._path)


def _check_distinct(keys: list[Key]) -> None:
    """Two keys of one name would share quotas, turns and idempotency scope: refused, as are two of one hash."""
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise InvalidKeysFile(f"API key names repeat across JANUS_API_KEY and the keys file: {sorted(names)} "
                              "(the plain keys are named default, default-2, ...)")
    if len({k.digest for k in keys}) != len(keys):
        raise InvalidKeysFile("the same key is given twice (in JANUS_API_KEY and the keys file)")


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return None


class _Bucket:
    """Tokens refilled at `per_minute / 60` a second up to `per_minute`; may go below zero for a large
    charge (an n=16 request on a 10-per-minute key passes once the bucket is full, then waits it off)."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.rate = per_minute / 60.0
        self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """0 when taken, else the seconds until it could be."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(amount, self.capacity)
        if self.tokens >= need:
            self.tokens -= amount
            return 0.0
        return (need - self.tokens) / self.rate


@dataclass(frozen=True)
class Lease:
    """One admitted request of `key`, held until `Quotas.leave`."""

    key: Key
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    local: bool = True  # counted in this process (else where `RedisQuotas` keeps it)


class LeaseHolder:
    """The lease of the request being served; an async job `take`s it to hold it until the job ends."""

    def __init__(self, lease: Lease | None) -> None:
        self.lease = lease

    def take(self) -> Lease | None:
        lease, self.lease = self.lease, None
        return lease


current_lease: contextvars.ContextVar[LeaseHolder | None] = contextvars.ContextVar("janus_lease", default=None)


async def admit(quotas: Quotas, key: Key | None) -> Lease | None:
    """`quotas.enter(key)`, safe against the caller being cancelled meanwhile: a slot taken after the caller
    went away is given back, never left held."""
    entering = asyncio.ensure_future(quotas.enter(key))
    try:
        return await asyncio.shield(entering)
    except asyncio.CancelledError:
        def give_back(task: asyncio.Future) -> None:
            if not task.cancelled() and task.exception() is None and task.result() is not None:
                asyncio.ensure_future(quotas.leave(task.result()))

        entering.add_done_callback(give_back)
        raise


class Quotas:
    """Per-key limits, counted in this process. `default_in_flight` applies to keys that state none (so one key
    cannot hold the whole queue); None: unlimited. `server.queue.redis.quotas.RedisQuotas` counts the same limits
    in Redis, across every frontend."""

    def __init__(self, default_in_flight: int | None = None, clock=time.monotonic) -> None:
        self.default_in_flight = default_in_flight
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._requests: dict[str, _Bucket] = {}
        self._images: dict[str, _Bucket] = {}

    def in_flight_limit(self, key: Key) -> int | None:
        return key.max_in_flight or self.default_in_flight

    async def enter(self, key: Key | None) -> Lease | None:
        """Admit one request of `key` (None: no keys, nothing metered); pass the lease to `leave`."""
        if key is None:
            return None
        limit = self.in_flight_limit(key)
        held = self._in_flight.get(key.name, 0)
        if limit is not None and held >= limit:
            raise in_flight_refusal(key, held, limit)
        if key.requests_per_minute:
            self._charge(self._requests, key.name, key.requests_per_minute, 1, "requests")
        self._in_flight[key.name] = held + 1
        return Lease(key)

    async def leave(self, lease: Lease | None) -> None:
        if lease is None:
            return
        left = self._in_flight.get(lease.key.name, 0) - 1
        if left > 0:
            self._in_flight[lease.key.name] = left
        else:
            self._in_flight.pop(lease.key.name, None)

    async def charge_images(self, key: Key | None, count: int) -> None:
        if key is not None and key.images_per_minute:
            self._charge(self._images, key.name, key.images_per_minute, count, "images")

    async def refund_images(self, key: Key | None, count: int) -> None:
        """Give back a charge for images that will not be made (the queue refused the job, or it joined
        an earlier one)."""
        if key is not None and key.images_per_minute and key.name in self._images:
            bucket = self._images[key.name]
            bucket.tokens = min(bucket.capacity, bucket.tokens + count)

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def _charge(self, buckets: dict[str, _Bucket], name: str, per_minute: int, amount: int, what: str) -> None:
        now = self._clock()
        bucket = buckets.get(name)
        if bucket is None or bucket.capacity != per_minute:  # new, or the limit changed in the file
            bucket = buckets[name] = _Bucket(per_minute, now)
        wait = bucket.take(amount, now)
        if wait > 0:
            raise rate_refusal(name, per_minute, what, wait)


def in_flight_refusal(key: Key, held: int, limit: int) -> RateLimited:
    return RateLimited(f"API key {key.name!r} has {held} requests in flight; its limit is {limit}", 1.0, key.name)


def rate_refusal(name: str, per_minute: int, what: str, wait: float) -> RateLimited:
    return RateLimited(f"API key {name!r} is over its limit of {per_minute} {what} per minute; "
                       f"retry in {math.ceil(wait)} s", wait, name)
