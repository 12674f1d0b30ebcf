"""The Lua scripts `RedisQueue` runs: each is one atomic step on the queue's keys.

Every step that reads a key and then writes another runs as a script, so two processes can never
interleave inside it (a submit racing a finish, two workers reclaiming the same dead worker's jobs).
The key layout is described in `server.queue.redis.queue`; this module knows only the scripts' text and
their KEYS / ARGV contracts, which are written above each one.
"""

from __future__ import annotations

# Waiting jobs are delivered at once to the holding consumer QUEUED, and their entry ids queued per owner
# (a list per API key name): workers take them from there in weighted round-robin (TAKE_FAIR), so one
# owner's flood does not stand in front of everyone else. QUEUED is no worker: the takeovers skip it.
QUEUED = "~queued"

# An async job also gets its record (a hash: `meta` JSON, `ttl` ms its result is kept, `webhook`, `idem`; later
# `started`, `finished`, `status`) and a place in its owner's index (a sorted set by creation time, newest kept).
# KEYS: stream, entry hash, result key, idempotency key, owners ring (list), active owners (set),
#       owner weights (hash), wake-up list, job record, owner's job index.
# ARGV: job id, job JSON, max depth, max wait ms (0 = off), idempotency TTL ms (0 = no key), group,
#       request fingerprint, owner, owner's weight, prefix of the per-owner lists,
#       record meta JSON ('' = not async), record TTL ms, result TTL ms, webhook URL, created (epoch s),
#       the most jobs an owner's index keeps.
#       The idempotency key holds "<fingerprint> <job id>".
# -> {'ok', id} | {'dup', first id} | {'conflict', first id} | {'full', depth} | {'lagging', waited ms}
SUBMIT = """
local stream, entries, result, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ring, active, weights, wake = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local job_id, max_wait, group = ARGV[1], tonumber(ARGV[4]), ARGV[6]
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
  local oldest = redis.pcall('XPENDING', stream, group, '-', '+', 1, '""" + QUEUED + """')
  if type(oldest) == 'table' and not oldest.err and #oldest > 0 then
    local t = redis.call('TIME')
    local waited = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      - tonumber(string.match(oldest[1][1], '^(%d+)'))
    if waited > max_wait then return {'lagging', tostring(waited)} end
  end
end
local entry = redis.call('XADD', stream, '*', 'id', job_id, 'job', ARGV[2])
redis.call('HSET', entries, job_id, entry)
if ARGV[5] ~= '0' then redis.call('SET', idem, ARGV[7] .. ' ' .. job_id, 'PX', ARGV[5]) end
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[9], 'meta', ARGV[11], 'ttl', ARGV[13])
  if ARGV[14] ~= '' then redis.call('HSET', KEYS[9], 'webhook', ARGV[14]) end
  if ARGV[5] ~= '0' then redis.call('HSET', KEYS[9], 'idem', KEYS[4]) end
  redis.call('PEXPIRE', KEYS[9], ARGV[12])
  redis.call('ZADD', KEYS[10], ARGV[15], job_id)
  redis.call('ZREMRANGEBYRANK', KEYS[10], 0, -tonumber(ARGV[16]) - 1)
  redis.call('PEXPIRE', KEYS[10], ARGV[12])
end
-- Deliver it (and anything a frontend without fair dispatch added) to QUEUED, and queue it under its owner.
local function queue_under(owner, id)
  redis.call('RPUSH', ARGV[10] .. owner, id)
  if redis.call('SADD', active, owner) == 1 then redis.call('RPUSH', ring, owner) end
end
if redis.call('EXISTS', stream) == 1 then
  local ok = redis.pcall('XGROUP', 'CREATE', stream, group, '0')  -- BUSYGROUP when it exists: fine
end
local found = false
while not found do
  local read = redis.call('XREADGROUP', 'GROUP', group, '""" + QUEUED + """', 'COUNT', 100, 'STREAMS', stream, '>')
  if not read or #read == 0 or #read[1][2] == 0 then break end
  for _, e in ipairs(read[1][2]) do
    if e[1] == entry then found = true else queue_under('', e[1]) end
  end
end
queue_under(ARGV[8], entry)
redis.call('HSET', weights, ARGV[8], ARGV[9])
redis.call('LPUSH', wake, '1')
redis.call('LTRIM', wake, 0, 1023)
return {'ok', job_id}
"""

# Takes up to `want` waiting jobs for consumer `me`, in weighted round-robin over the owners: the owner at the
# head of the ring gets its weight in credit when its turn starts, spends one per job, and goes to the back
# when its credit is spent (an owner with nothing left leaves the ring). Only entries QUEUED still holds are
# taken (a stale id is skipped). With nothing left waiting, the wake-up list is emptied in the same step: its
# tokens stand for jobs now gone, and would wake idle workers for nothing.
# KEYS: stream, owners ring, active owners, weights, credits, wake-up list.
# ARGV: group, consumer, want, prefix of the per-owner lists. -> {{entry id, {field, value, ...}, delivered}, ...}
TAKE_FAIR = """
local stream, ring, active, weights, credits, wake = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local group, me, want, lists = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local taken = {}
local function leave(owner)
  redis.call('LPOP', ring)
  redis.call('SREM', active, owner)
  redis.call('HDEL', credits, owner)
  redis.call('HDEL', weights, owner)
end
local turns = 0
while #taken < want and turns < 100000 and redis.call('LLEN', ring) > 0 do
  turns = turns + 1
  local owner = redis.call('LINDEX', ring, 0)
  local credit = tonumber(redis.call('HGET', credits, owner) or '0')
  if credit < 1 then credit = credit + tonumber(redis.call('HGET', weights, owner) or '1') end
  if credit < 1 then  -- a weight below 1 saves up over several turns
    redis.call('HSET', credits, owner, tostring(credit))
    redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
  else
    local id = redis.call('LPOP', lists .. owner)
    if not id then
      leave(owner)
    else
      credit = credit - 1
      local p = redis.call('XPENDING', stream, group, id, id, 1)
      if #p > 0 and p[1][2] == '""" + QUEUED + """' then
        redis.call('XCLAIM', stream, group, me, 0, id, 'JUSTID')  -- JUSTID: the delivery count stays
        local e = redis.call('XRANGE', stream, id, id)
        if #e > 0 then taken[#taken + 1] = {id, e[1][2], p[1][4]} end
      end
      if redis.call('LLEN', lists .. owner) == 0 then
        leave(owner)
      else
        redis.call('HSET', credits, owner, tostring(credit))
        if credit < 1 then redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT') end
      end
    end
  end
end
if redis.call('LLEN', ring) == 0 then redis.call('DEL', wake) end
return taken
"""

# The idle-time backstop (XAUTOCLAIM, without QUEUED's waiting entries): entries another consumer has held for
# `min idle` ms, scanned from `start`. KEYS: stream. ARGV: group, consumer, min idle ms, start id, want.
# -> {next start ('0-0' when the scan is done), {{entry id, {field, value, ...}, delivered}, ...}}
RECLAIM_IDLE = """
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local idle, want = tonumber(ARGV[3]), tonumber(ARGV[5])
local scan = 1000
local pending = redis.call('XPENDING', stream, group, 'IDLE', idle, ARGV[4], '+', scan)
local taken, ids = {}, {}
local next_start = '0-0'
for i, p in ipairs(pending) do
  if p[2] ~= '""" + QUEUED + """' then ids[#ids + 1] = p[1] end
  if #ids >= want then
    if i < #pending then next_start = pending[i + 1][1] end
    break
  end
end
if #ids < want and #pending == scan then next_start = '(' .. pending[#pending][1] end
if #ids > 0 then
  for _, e in ipairs(redis.call('XCLAIM', stream, group, me, idle, unpack(ids))) do
    local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
    if e[2] and #p > 0 then taken[#taken + 1] = {e[1], e[2], p[1][4]} end
  end
end
return {next_start, taken}
"""

# Stores the terminal event once (SET NX: a job run twice answers once) and acknowledges the entry.
# A job that failed releases its idempotency key (when the key still names it): a retry runs again.
# An async job's record gets its end (kept for the record's own TTL, as are its result, its events and its
# idempotency key), and its webhook delivery is queued, due now. The job's preview events are deleted.
# KEYS: stream, entry hash, result key, events stream, dead-letter stream, idempotency key, job record,
#       webhook deliveries (sorted set by due time, ms), preview ids (list: PUBLISH_PREVIEW).
# ARGV: group, job id, terminal event JSON, TTL ms, entry id hint, dead reason ('' = not dead),
#       job JSON for the dead letter, dead-letter stream max length, '1' to release the idempotency key,
#       the job's final status.
# -> 1 stored, 0 already answered
FINISH = """
local ttl = ARGV[4]
local async = redis.call('EXISTS', KEYS[7]) == 1
if async then ttl = redis.call('HGET', KEYS[7], 'ttl') or ttl end
local stored = redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ttl)
if stored then
  -- previews are for watching the job run: every run's go now (PUBLISH_PREVIEW listed them)
  local previews = redis.call('LRANGE', KEYS[9], 0, -1)
  for i = 1, #previews, 500 do
    redis.call('XDEL', KEYS[4], unpack(previews, i, math.min(i + 499, #previews)))
  end
  redis.call('DEL', KEYS[9])
  redis.call('XADD', KEYS[4], '*', 't', '1')
  redis.call('PEXPIRE', KEYS[4], ttl)
  if async then
    local t = redis.call('TIME')
    redis.call('HSET', KEYS[7], 'finished', t[1] .. '.' .. string.format('%06d', tonumber(t[2])), 'status', ARGV[10])
    redis.call('PEXPIRE', KEYS[7], ttl)
    -- a retry with its Idempotency-Key joins it only while its record is kept
    local idem = redis.call('HGET', KEYS[7], 'idem')
    local held = idem and redis.call('GET', idem)
    if held and string.sub(held, -(#ARGV[2] + 1)) == ' ' .. ARGV[2] then redis.call('PEXPIRE', idem, ttl) end
    if redis.call('HEXISTS', KEYS[7], 'webhook') == 1 then
      redis.call('ZADD', KEYS[8], 'NX', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[2])
    end
  end
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

# A preview event: added to the job's events and its id listed, so FINISH deletes it whichever run sent it
# (a run handed back, crashed or cancelled mid-publish included); none once the job has ended.
# KEYS: events stream, previews list, result. ARGV: event JSON, run, seq, ttl ms.
PUBLISH_PREVIEW = """
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 'r', ARGV[2], 's', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('RPUSH', KEYS[2], id)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return id
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
  if name ~= me and name ~= '""" + QUEUED + """' and silent and tonumber(info['idle']) > dead_ms then
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

# Marks claimed async jobs as running (only records that exist: an expired one is not made again).
# KEYS: job records. ARGV: the time (epoch s).
STARTED = """
for _, record in ipairs(KEYS) do
  if redis.call('EXISTS', record) == 1 then redis.call('HSET', record, 'started', ARGV[1]) end
end
return 0
"""

# Takes up to `want` webhook deliveries that are due, leasing each for `lease` ms (it is due again then, unless
# the taker reports it done or sets its retry), and counts the try in the job's record.
# KEYS: deliveries (sorted set). ARGV: want, lease ms, prefix of job records.
# -> {{job id, webhook URL ('' when the record is gone), tries}, ...}
TAKE_DELIVERIES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local taken = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
  local record = ARGV[3] .. id
  local url, tries = '', 0
  if redis.call('EXISTS', record) == 1 then
    url = redis.call('HGET', record, 'webhook') or ''
    tries = redis.call('HINCRBY', record, 'hook_tries', 1)
  end
  taken[#taken + 1] = {id, url, tries}
end
return taken
"""

# Sets when a taken delivery is due again (unless it was reported done meanwhile), by the Redis clock.
# KEYS: deliveries (sorted set). ARGV: job id, delay ms.
RETRY_DELIVERY = """
local t = redis.call('TIME')
local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
return redis.call('ZADD', KEYS[1], 'XX', due, ARGV[1])
"""
