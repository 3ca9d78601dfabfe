//! The Lua scripts the Redis backend runs (each check one atomic call:
//! no read-modify-write between relays) and the keys they touch.

use crate::answer_cache::CacheKey;

/// The rolling windows' Lua helpers, shared by both scripts. A client's
/// windows (requests per minute, tokens per minute and per day) keep their
/// running total, current bucket and the time their oldest bucket leaves
/// in one hash, read once and written once per call; completed buckets
/// wait in a list per window (`start:count`, oldest first), read only when
/// the oldest is due to leave.
pub(super) const WINDOW_LUA: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1])
local now_ms = now * 1000 + math.floor(tonumber(time[2]) / 1000)
local NAMES = {'rpm', 'tpm', 'tpd'}
local function parse(item)
  local sep = string.find(item, ':', 1, true)
  return tonumber(string.sub(item, 1, sep - 1)), tonumber(string.sub(item, sep + 1))
end
local states = {}
-- A client's windows: total t, current bucket start s (-1: none) and
-- count c, and x, when the oldest counted bucket leaves (0: none).
local function state(hash)
  local st = states[hash]
  if st then return st end
  local v = redis.call('HMGET', hash, 'rpm.t', 'rpm.s', 'rpm.c', 'rpm.x',
    'tpm.t', 'tpm.s', 'tpm.c', 'tpm.x', 'tpd.t', 'tpd.s', 'tpd.c', 'tpd.x')
  st = {}
  for i, name in ipairs(NAMES) do
    st[name] = {t = tonumber(v[i * 4 - 3]) or 0, s = tonumber(v[i * 4 - 2]) or -1,
      c = tonumber(v[i * 4 - 1]) or 0, x = tonumber(v[i * 4]) or 0}
  end
  states[hash] = st
  return st
end
local function save_all()
  for hash, st in pairs(states) do
    local fields = {}
    for _, name in ipairs(NAMES) do
      local w = st[name]
      for _, f in ipairs({'t', 's', 'c', 'x'}) do
        fields[#fields + 1] = name .. '.' .. f
        fields[#fields + 1] = w[f]
      end
    end
    redis.call('HSET', hash, unpack(fields))
    redis.call('EXPIRE', hash, 86400 + 120)
  end
end
-- Drops what has left the window; the total after.
local function expire(w, list, bucket, window)
  if w.x == 0 or w.x > now then return w.t end
  while true do
    local head = redis.call('LINDEX', list, 0)
    if not head then break end
    local start, count = parse(head)
    if start + bucket + window > now then
      w.x = start + bucket + window
      return w.t
    end
    redis.call('LPOP', list)
    w.t = w.t - count
  end
  -- No completed bucket left: the current one is all there is.
  if w.s >= 0 and w.s + bucket + window > now then
    w.t, w.x = w.c, w.s + bucket + window
  else
    w.t, w.s, w.c, w.x = 0, -1, 0, 0
  end
  return w.t
end
local function add(w, list, bucket, window, n)
  local start = now - now % bucket
  if w.s < start then
    if w.s >= 0 and w.c > 0 then
      redis.call('RPUSH', list, w.s .. ':' .. w.c)
      redis.call('EXPIRE', list, window + bucket)
    end
    w.s, w.c = start, 0
    if w.x == 0 then w.x = start + bucket + window end
  end
  w.c, w.t = w.c + n, w.t + n
end
-- Seconds until the total is under limit.
local function wait(w, list, bucket, window, limit)
  local total = w.t
  for _, item in ipairs(redis.call('LRANGE', list, 0, -1)) do
    local start, count = parse(item)
    total = total - count
    if total < limit then return math.max(1, start + bucket + window - now) end
  end
  return math.max(1, w.s + bucket + window - now)
end
-- Applies the settlements carried from ARGV[a] on (a count, then a lease
-- id or '' and the tokens of each), with a client's five keys each from
-- KEYS[k] on.
local function settle_all(k, a)
  for i = 0, tonumber(ARGV[a]) - 1 do
    local kk, aa = k + i * 5, a + 1 + i * 2
    if ARGV[aa] ~= '' then redis.call('ZREM', KEYS[kk], ARGV[aa]) end
    local tokens = tonumber(ARGV[aa + 1])
    if tokens > 0 then
      local st = state(KEYS[kk + 1])
      expire(st.tpm, KEYS[kk + 3], 1, 60)
      add(st.tpm, KEYS[kk + 3], 1, 60, tokens)
      expire(st.tpd, KEYS[kk + 4], 60, 86400)
      add(st.tpd, KEYS[kk + 4], 60, 86400, tokens)
    end
  end
end
";

/// Applies the settlements this relay has carried since its last call,
/// then admits a request. KEYS: the client's leases, windows hash, and
/// lists of requests, tokens per minute and per day; then five per
/// settlement. ARGV: concurrency limit, lease id, lease ms, requests per
/// minute, tokens per minute, tokens per day (0: no such limit), then the
/// settlements. Returns {verdict, wait seconds}.
pub(super) const ADMIT_LUA: &str = r"
settle_all(6, 7)
local concurrency, lease, lease_ms = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local rpm, tpm, tpd = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local st = state(KEYS[2])
local function refuse(what, seconds)
  save_all()
  return {what, seconds}
end
if tpm > 0 and expire(st.tpm, KEYS[4], 1, 60) >= tpm then
  return refuse('tokens_per_minute', wait(st.tpm, KEYS[4], 1, 60, tpm))
end
if tpd > 0 and expire(st.tpd, KEYS[5], 60, 86400) >= tpd then
  return refuse('tokens_per_day', wait(st.tpd, KEYS[5], 60, 86400, tpd))
end
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[1]) >= concurrency then return refuse('concurrent_requests', 1) end
end
if rpm > 0 then
  if expire(st.rpm, KEYS[3], 1, 60) >= rpm then
    return refuse('requests_per_minute', wait(st.rpm, KEYS[3], 1, 60, rpm))
  end
  add(st.rpm, KEYS[3], 1, 60, 1)
end
if concurrency > 0 then
  redis.call('ZADD', KEYS[1], now_ms + lease_ms, lease)
  redis.call('PEXPIRE', KEYS[1], lease_ms * 2)
end
save_all()
return {'ok', 0}
";

/// Applies carried settlements alone (when no admission came to carry
/// them): the layout of [`ADMIT_LUA`]'s settlements from the first key and
/// argument.
pub(super) const SETTLE_LUA: &str = r"
settle_all(1, 1)
save_all()
return 1
";

/// Renews live leases from the server's clock. KEYS: each lease's set;
/// ARGV: the lease time in ms, then each lease's id (leases already gone
/// stay gone).
pub(super) const RENEW_LUA: &str = r"
local time = redis.call('TIME')
local until_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', until_ms, ARGV[i + 1]) > 0 then
    -- The set must outlive the lease it holds.
    redis.call('PEXPIRE', key, tonumber(ARGV[1]) * 2)
  end
end
return #KEYS
";

/// Keeps a cache entry under a size cap. KEYS: the entry, the index of
/// entries by expiry (ms), their sizes, the total. ARGV: the value, its
/// time to live in ms, its size, the cap in bytes. Expired entries leave
/// the count first; then, while over the cap, the entries due to expire
/// soonest go.
pub(super) const CACHE_PUT_LUA: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local function forget(member)
  local size = tonumber(redis.call('HGET', KEYS[3], member) or '0')
  redis.call('HDEL', KEYS[3], member)
  redis.call('ZREM', KEYS[2], member)
  redis.call('DECRBY', KEYS[4], size)
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  forget(member)
end
if redis.call('ZSCORE', KEYS[2], KEYS[1]) then forget(KEYS[1]) end
local ttl, size, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if size > cap then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
local total = redis.call('INCRBY', KEYS[4], size)
while total > cap do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not oldest then break end
  redis.call('DEL', oldest)
  forget(oldest)
  total = tonumber(redis.call('GET', KEYS[4]) or '0')
end
return 1
";

/// The cache's keys, all under one hash tag.
pub(super) fn cache_keys(key: &CacheKey) -> [String; 4] {
    [
        format!("passage:{{cache}}:{}", key.hex()),
        "passage:{cache}:index".to_owned(),
        "passage:{cache}:sizes".to_owned(),
        "passage:{cache}:total".to_owned(),
    ]
}

/// The keys of one client's counts, all under one hash tag (one slot in
/// a Redis cluster).
pub(super) fn client_keys(client: &str) -> [String; 5] {
    ["leases", "windows", "rpm", "tpm", "tpd"].map(|what| format!("passage:{{{client}}}:{what}"))
}
