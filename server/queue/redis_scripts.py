"""The Lua scripts `RedisQueue` runs: each is one atomic step on the queue's keys.

Every step that reads a key and then writes another runs as a script, so two processes can never
interleave inside it (a submit racing a finish, two workers reclaiming the same dead worker's jobs).
The key layout is described in `server.queue.redis`; this module knows only the scripts' text and
their KEYS / ARGV contracts, which are written above each one.
"""

from __future__ import annotations

# KEYS: stream, entry hash, result key, idempotency key.
# ARGV: job id, job JSON, max depth, max wait ms (0 = off), idempotency TTL ms (0 = no key), group,
#       request fingerprint. The idempotency key holds "<fingerprint> <job id>".
# -> {'ok', id} | {'dup', first id} | {'conflict', first id} | {'full', depth} | {'lagging', waited ms}
SUBMIT = """
local stream, entries, result, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, max_wait = ARGV[1], tonumber(ARGV[4])
if redis.call('HEXISTS', entries, job_id) == 1 or redis.call('EXISTS', result) == 1 then
  return {'ok', job_id}  -- a retried submit that went through the first time
end
if ARGV[5] ~= '0' then
  local first = redis.call('GET', idem)
  if first then
    local fingerprint, first_id = string.match(first, '^(%S*) (%S+)$')
    if fingerprint ~= ARGV[7] then return {'conflict', first_id or first} end
    return {'dup', first_id}
  end
end
local depth = redis.call('XLEN', stream)
if depth >= tonumber(ARGV[3]) then return {'full', tostring(depth)} end
if max_wait > 0 and depth > 0 then
  local after = '-'
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) == 'table' and not groups.err then
    for _, g in ipairs(groups) do
      local name, last
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
      end
      if name == ARGV[6] then after = '(' .. last end
    end
  end
  local oldest = redis.call('XRANGE', stream, after, '+', 'COUNT', 1)
  if #oldest > 0 then
    local t = redis.call('TIME')
    local waited = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      - tonumber(string.match(oldest[1][1], '^(%d+)'))
    if waited > max_wait then return {'lagging', tostring(waited)} end
  end
end
local entry = redis.call('XADD', stream, '*', 'id', job_id, 'job', ARGV[2])
redis.call('HSET', entries, job_id, entry)
if ARGV[5] ~= '0' then redis.call('SET', idem, ARGV[7] .. ' ' .. job_id, 'PX', ARGV[5]) end
return {'ok', job_id}
"""

# Stores the terminal event once (SET NX: a job run twice answers once) and acknowledges the entry.
# A job that failed releases its idempotency key (when the key still names it): a retry runs again.
# KEYS: stream, entry hash, result key, events stream, dead-letter stream, idempotency key.
# ARGV: group, job id, terminal event JSON, TTL ms, entry id hint, dead reason ('' = not dead),
#       job JSON for the dead letter, dead-letter stream max length, '1' to release the idempotency key.
# -> 1 stored, 0 already answered
FINISH = """
local stored = redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4])
if stored then
  redis.call('XADD', KEYS[4], '*', 't', '1')
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
  if ARGV[9] == '1' then
    local held = redis.call('GET', KEYS[6])
    if held and string.sub(held, -(#ARGV[2] + 1)) == ' ' .. ARGV[2] then redis.call('DEL', KEYS[6]) end
  end
end
local current = redis.call('HGET', KEYS[2], ARGV[2])
local entry = ARGV[5]  -- the entry this process was handed, else whatever submit recorded
if entry == '' then entry = current end
if entry then
  if ARGV[6] ~= '' then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'id', ARGV[2], 'entry', entry,
               'reason', ARGV[6], 'job', ARGV[7])
  end
  redis.call('XACK', KEYS[1], ARGV[1], entry)
  redis.call('XDEL', KEYS[1], entry)
  -- After a Redis restart the job may have been submitted again under a new entry: that one stays
  -- mapped (and is answered, as already finished, by whichever worker takes it).
  if current == entry then redis.call('HDEL', KEYS[2], ARGV[2]) end
end
if stored then return 1 end
return 0
"""

# Resets the idle time of entries this consumer still owns (XCLAIM JUSTID leaves the delivery count
# alone), so a live worker's long-running jobs are not taken over. KEYS: stream. ARGV: group,
# consumer, entry ids...
TOUCH = """
local touched = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    touched = touched + 1
  end
end
return touched
"""

# Heartbeats use the Redis clock so frontends and workers on different machines agree on ages.
# KEYS: workers zset, worker info key. ARGV: worker id, info JSON, info TTL ms, forget after s.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return tostring(now)
"""

# KEYS: workers zset. ARGV: max age s. -> ids of the workers seen within max age.
LIVE_WORKERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""

# Takes over the jobs of consumers whose heartbeat stopped more than `dead after` ago (and that
# have not touched the stream for as long), then removes such consumers from the group once they
# hold nothing. The generic idle-time reclaim (XAUTOCLAIM) stays as the backstop for consumers
# that never heartbeat.
# KEYS: stream, workers zset. ARGV: group, claiming consumer, dead after ms, max entries.
# -> {{entry id, {field, value, ...}, times delivered}, ...}
RECLAIM_DEAD = """
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local dead_ms, want = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local taken = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  local name = info['name']
  local beat = redis.call('ZSCORE', KEYS[2], name)
  local silent = (not beat) or (now_ms - tonumber(beat) * 1000 > dead_ms)
  if name ~= me and silent and tonumber(info['idle']) > dead_ms then
    if tonumber(info['pending']) > 0 and #taken < want then
      local held = redis.call('XPENDING', stream, group, 'IDLE', dead_ms, '-', '+', want - #taken, name)
      local ids = {}
      for _, p in ipairs(held) do ids[#ids + 1] = p[1] end
      if #ids > 0 then
        for _, e in ipairs(redis.call('XCLAIM', stream, group, me, dead_ms, unpack(ids))) do
          local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
          taken[#taken + 1] = {e[1], e[2], p[1][4]}
        end
      end
    end
    if #redis.call('XPENDING', stream, group, '-', '+', 1, name) == 0 then
      redis.call('XGROUP', 'DELCONSUMER', stream, group, name)
    end
  end
end
return taken
"""
