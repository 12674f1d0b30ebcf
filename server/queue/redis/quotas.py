"""API key quotas counted in Redis, so they hold across every frontend (several api pods share one limit).

Per key name, under the queue's prefix:

- ``quota:{name}:flight``: a sorted set of the key's requests in flight, each scored with the time (Redis'
  clock, ms) after which it no longer counts: a frontend that dies mid-request frees its slots when they
  lapse (the request deadline plus a margin), not never.
- ``quota:{name}:requests``, ``quota:{name}:images``: token buckets (hash: tokens, stamp) that refill at
  the per-minute limit, as `server.keys.Quotas` keeps them in memory.

Both are checked and taken in one script each, so two frontends admitting the same key at once cannot both
take the last slot. While Redis cannot be reached, this process counts on its own (the submit that follows
fails anyway) and says so once in the log.
"""

from __future__ import annotations

import logging

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from server.keys import Key, Lease, Quotas, in_flight_refusal, rate_refusal
from server.queue.redis.errors import DOWN

log = logging.getLogger(__name__)

_TAKE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- 0 when `amount` tokens were taken from bucket `key` (per_minute capacity), else the ms until they could be
local function take(key, per_minute, amount, now)
  local rate = per_minute / 60000
  local state = redis.call('HMGET', key, 'tokens', 'stamp')
  local tokens, stamp = tonumber(state[1]), tonumber(state[2])
  if tokens == nil then tokens, stamp = per_minute, now end
  tokens = math.min(per_minute, tokens + (now - stamp) * rate)
  local need = math.min(amount, per_minute)
  local wait = 0
  if tokens < need then wait = math.ceil((need - tokens) / rate) else tokens = tokens - amount end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'stamp', now)
  -- kept until it would be full again (a missing bucket reads as full), never less
  redis.call('PEXPIRE', key, math.ceil((per_minute - tokens) / rate) + 1000)
  return wait
end
"""

# KEYS: in-flight set, requests bucket. ARGV: lease token, lease lifetime ms, in-flight limit (0: none),
# requests per minute (0: none). -> {'ok'} | {'in_flight', held} | {'rate', wait ms}
ENTER = _TAKE + """
local now = now_ms()
local limit, per_minute = tonumber(ARGV[3]), tonumber(ARGV[4])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local held = redis.call('ZCARD', KEYS[1])
  if held >= limit then return {'in_flight', tostring(held)} end
end
if per_minute > 0 then
  local wait = take(KEYS[2], per_minute, 1, now)
  if wait > 0 then return {'rate', tostring(wait)} end
end
if limit > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return {'ok', ''}
"""

# KEYS: images bucket. ARGV: images per minute, images asked for. -> wait ms (0: taken)
IMAGES = _TAKE + """
return tostring(take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now_ms()))
"""

# KEYS: images bucket. ARGV: images per minute, images to give back.
REFUND = """
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
if tokens then
  redis.call('HSET', KEYS[1], 'tokens', tostring(math.min(tonumber(ARGV[1]), tokens + tonumber(ARGV[2]))))
end
return 0
"""


class RedisQuotas(Quotas):
    def __init__(self, redis: Redis, prefix: str, lease_seconds: float, default_in_flight: int | None = None) -> None:
        super().__init__(default_in_flight)
        self._redis = redis
        self._prefix = prefix
        self._lease_ms = max(int(lease_seconds * 1000), 1000)
        self._enter = redis.register_script(ENTER)
        self._images = redis.register_script(IMAGES)
        self._refund = redis.register_script(REFUND)
        self._warned = False

    def _key(self, name: str, what: str) -> str:
        return f"{self._prefix}quota:{name}:{what}"

    async def enter(self, key: Key | None) -> Lease | None:
        if key is None:
            return None
        limit = self.in_flight_limit(key) or 0
        lease = Lease(key, local=False)
        try:
            status, value = await self._enter(keys=[self._key(key.name, "flight"), self._key(key.name, "requests")],
                                              args=[lease.token, self._lease_ms, limit, key.requests_per_minute or 0])
        except (*DOWN, redis_errors.RedisError) as exc:
            self._fall_back(exc)
            return await super().enter(key)
        if status == "in_flight":
            raise in_flight_refusal(key, int(value), limit)
        if status == "rate":
            raise rate_refusal(key.name, key.requests_per_minute or 0, "requests", int(value) / 1000)
        return lease

    async def leave(self, lease: Lease | None) -> None:
        if lease is None:
            return
        if lease.local:  # admitted by this process's own count, while Redis was away
            return await super().leave(lease)
        try:
            await self._redis.zrem(self._key(lease.key.name, "flight"), lease.token)
        except (*DOWN, redis_errors.RedisError) as exc:  # the slot lapses on its own
            self._fall_back(exc)

    async def charge_images(self, key: Key | None, count: int) -> None:
        if key is None or not key.images_per_minute:
            return
        try:
            wait = int(await self._images(keys=[self._key(key.name, "images")], args=[key.images_per_minute, count]))
        except (*DOWN, redis_errors.RedisError) as exc:
            self._fall_back(exc)
            return await super().charge_images(key, count)
        if wait > 0:
            raise rate_refusal(key.name, key.images_per_minute, "images", wait / 1000)

    async def refund_images(self, key: Key | None, count: int) -> None:
        if key is None or not key.images_per_minute:
            return
        try:
            await self._refund(keys=[self._key(key.name, "images")], args=[key.images_per_minute, count])
        except (*DOWN, redis_errors.RedisError) as exc:
            self._fall_back(exc)
            await super().refund_images(key, count)

    def _fall_back(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("API key quotas: Redis unreachable (%s); counting in this process until it is back", exc)
