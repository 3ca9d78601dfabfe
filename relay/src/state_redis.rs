//! The shared state backend: every relay of a team points `--state` at one
//! Redis, and a client's limits hold across all of them.
//!
//! Each check is one Lua script run atomically on the server (no
//! read-modify-write between relays): requests and tokens per rolling
//! window in the same buckets as [`crate::limits`], kept as a list of
//! `start:count` items plus a running total; concurrency as a sorted set
//! of leases that expire unless renewed, so a relay that dies cannot hold
//! its slots for ever. The usage ledger is a Redis stream, written in
//! batches off the request path.
//!
//! The store is never waited on for more than [`STORE_WAIT`] per request.
//! When it fails or is slow it is marked down: requests then run under
//! this relay's own counts (`--state-fail open`, the default, with a WARN
//! a minute) or get 503 `state_unavailable` (`closed`), without waiting,
//! while a probe tries it twice a second; the connection is made again
//! by itself.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use http::StatusCode;
use passage_shared::error_body::ApiError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::answer_cache::{CacheKey, CachedAnswer};
use crate::ledger::{BATCH_WINDOW, LedgerEntry};
use crate::limits::{Limits, too_many};
use crate::policy::Applied;
use crate::state::{
    Admission, FailMode, STORE_WAIT, StateError, StateStore, StoreCounts, StoreHealth,
};
use crate::usage_report::{Grouping, UsageRow, totals};

/// The stream that holds the usage ledger.
pub const LEDGER_STREAM: &str = "passage:ledger";
/// Ledger entries older than this are trimmed as new ones arrive.
const LEDGER_RETENTION_MS: i64 = 92 * 86_400_000;
/// A concurrency lease lasts this long unless renewed.
const LEASE: Duration = Duration::from_secs(60);
/// How often live leases are renewed.
const LEASE_RENEWAL: Duration = Duration::from_secs(20);
/// How often a store marked down is tried again.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Least time between two WARNs about the store being down.
const WARN_INTERVAL: Duration = Duration::from_secs(60);
/// Most ledger entries held while the store is unreachable.
const PENDING_MAX: usize = 65_536;
/// Most ledger entries sent in one pipeline.
const BATCH_MAX: usize = 1024;

/// The rolling windows' Lua helpers, shared by both scripts. A client's
/// windows (requests per minute, tokens per minute and per day) keep their
/// running total, current bucket and the time their oldest bucket leaves
/// in one hash, read once and written once per call; completed buckets
/// wait in a list per window (`start:count`, oldest first), read only when
/// the oldest is due to leave.
const WINDOW_LUA: &str = r"
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
const ADMIT_LUA: &str = r"
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
const SETTLE_LUA: &str = r"
settle_all(1, 1)
save_all()
return 1
";

/// Renews live leases from the server's clock. KEYS: each lease's set;
/// ARGV: the lease time in ms, then each lease's id (leases already gone
/// stay gone).
const RENEW_LUA: &str = r"
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
const CACHE_PUT_LUA: &str = r"
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
fn cache_keys(key: &CacheKey) -> [String; 4] {
    [
        format!("passage:{{cache}}:{}", key.hex()),
        "passage:{cache}:index".to_owned(),
        "passage:{cache}:sizes".to_owned(),
        "passage:{cache}:total".to_owned(),
    ]
}

/// The keys of one client's counts, all under one hash tag (one slot in
/// a Redis cluster).
fn client_keys(client: &str) -> [String; 5] {
    ["leases", "windows", "rpm", "tpm", "tpd"].map(|what| format!("passage:{{{client}}}:{what}"))
}

/// Whether the store answers, and since when it does not.
#[derive(Debug, Default)]
struct Reachability {
    /// Why it was marked down, while it is.
    down: Option<String>,
    /// When the last WARN about it went out.
    warned: Option<Instant>,
}

/// What the relay's tasks share about the store.
#[derive(Debug)]
struct Shared {
    connection: ConnectionManager,
    admit: redis::Script,
    settle: redis::Script,
    renew: redis::Script,
    cache_put: redis::Script,
    /// Most bytes the cache may hold in Redis.
    cache_bytes: u64,
    fail: FailMode,
    /// Counts used while the store is down (fail-open).
    local: Limits,
    reachability: Mutex<Reachability>,
    /// A fast check of `reachability.down.is_some()`.
    is_down: AtomicBool,
    /// Live concurrency leases: id → client, renewed while they live.
    leases: Mutex<HashMap<u64, Arc<str>>>,
    next_lease: AtomicU64,
    /// This relay's lease ids start with it.
    relay_id: String,
    /// Times the store failed or was too slow.
    failures: AtomicU64,
    /// Settlements not yet sent: the next admission carries them, or a
    /// flush [`SETTLE_DELAY`] after the first.
    pending: Mutex<Vec<Settlement>>,
    /// Whether a flush of `pending` is due.
    flush_due: AtomicBool,
    /// Held while settlements are taken from `pending` and their command
    /// queued, so that commands reach the store in the order they took
    /// them.
    order: tokio::sync::Mutex<()>,
}

/// A finished request's lease to free and tokens to count.
#[derive(Debug)]
struct Settlement {
    client: Arc<str>,
    lease: Option<u64>,
    tokens: u64,
}

/// Longest a settlement waits for an admission to carry it.
const SETTLE_DELAY: Duration = Duration::from_millis(2);

/// Polls `future` once (queueing its command on the store's connection),
/// then drops `order` and waits for the rest.
async fn queued_then<F: std::future::Future>(
    future: F,
    order: tokio::sync::MutexGuard<'_, ()>,
) -> F::Output {
    let mut future = std::pin::pin!(future);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx))).await;
    drop(order);
    match first {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => future.await,
    }
}

/// Adds `settlements` to an invocation: their count, then per settlement
/// its five keys and two arguments.
fn carry(
    invocation: &mut redis::ScriptInvocation<'_>,
    shared: &Shared,
    settlements: &[Settlement],
) {
    invocation.arg(settlements.len());
    for settlement in settlements {
        for key in client_keys(&settlement.client) {
            invocation.key(key);
        }
        invocation
            .arg(
                settlement
                    .lease
                    .map(|id| shared.lease_name(id))
                    .unwrap_or_default(),
            )
            .arg(settlement.tokens);
    }
}

impl Shared {
    /// Counts a failure of a background write (a cache put, a ledger
    /// batch) that was only slow: requests go on using the store.
    fn note_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A background write failed: the store is marked down only when the
    /// connection itself failed, so that one slow or refused write does not
    /// send limited clients to the fallback (or, failing closed, to 503s).
    fn background_failed(self: &Arc<Self>, e: &redis::RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            self.mark_down(e.to_string());
        } else {
            self.note_failure();
        }
    }

    /// Marks the store down (once) and starts the probe that brings it back.
    fn mark_down(self: &Arc<Self>, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut reach = self
            .reachability
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let newly = reach.down.is_none();
        let due = reach.warned.is_none_or(|at| at.elapsed() >= WARN_INTERVAL);
        if due {
            reach.warned = Some(Instant::now());
            let mode = match self.fail {
                FailMode::Open => "serving under this relay's own limits",
                FailMode::Closed => "refusing limited requests with 503",
            };
            warn!(error = %why, "state store unreachable: {mode} until it is back");
        }
        reach.down = Some(why);
        self.is_down.store(true, Ordering::Release);
        drop(reach);
        if newly {
            let shared = self.clone();
            tokio::spawn(async move { shared.probe().await });
        }
    }

    /// Pings the store until it answers, then marks it up.
    async fn probe(self: Arc<Self>) {
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let mut connection = self.connection.clone();
            let command = redis::cmd("PING");
            let ping = command.query_async::<String>(&mut connection);
            if let Ok(Ok(_)) = tokio::time::timeout(STORE_WAIT, ping).await {
                let mut reach = self
                    .reachability
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                reach.down = None;
                self.is_down.store(false, Ordering::Release);
                info!("state store reachable again: shared limits in force");
                return;
            }
        }
    }

    fn refuse_unavailable(&self) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "state_unavailable",
            "the relay's shared state store is unreachable and the relay is set to refuse limited requests until it is back (--state-fail closed)",
        )
        .with_retry_after(1)
    }

    /// Queues a settlement: this relay's next admission carries it, or a
    /// flush sends it within [`SETTLE_DELAY`].
    fn settle_later(self: &Arc<Self>, settlement: Settlement) {
        if let Some(lease) = settlement.lease {
            self.leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&lease);
        }
        if settlement.lease.is_none() && settlement.tokens == 0 {
            return;
        }
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(settlement);
        if !self.flush_due.swap(true, Ordering::AcqRel)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let shared = self.clone();
            runtime.spawn(async move {
                tokio::time::sleep(SETTLE_DELAY).await;
                shared.flush().await;
            });
        }
    }

    /// The settlements queued so far, taken.
    fn take_pending(&self) -> Vec<Settlement> {
        self.flush_due.store(false, Ordering::Release);
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Sends the queued settlements on their own.
    async fn flush(self: &Arc<Self>) {
        if self.is_down.load(Ordering::Acquire) {
            // The leases expire by themselves; the tokens go uncounted.
            drop(self.take_pending());
            return;
        }
        let order = self.order.lock().await;
        let settlements = self.take_pending();
        if settlements.is_empty() {
            return;
        }
        let mut invocation = self.settle.prepare_invoke();
        carry(&mut invocation, self, &settlements);
        let mut connection = self.connection.clone();
        let run = invocation.invoke_async::<i64>(&mut connection);
        match tokio::time::timeout(STORE_WAIT, queued_then(run, order)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.mark_down(e.to_string()),
            Err(_) => self.mark_down(format!("no answer within {} ms", STORE_WAIT.as_millis())),
        }
    }

    fn lease_name(&self, id: u64) -> String {
        format!("{}:{id}", self.relay_id)
    }

    /// Renews every live lease of this relay, for ever.
    async fn renew_leases(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(LEASE_RENEWAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let live: Vec<(u64, Arc<str>)> = self
                .leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(id, client)| (*id, client.clone()))
                .collect();
            if live.is_empty() || self.is_down.load(Ordering::Acquire) {
                continue;
            }
            // On the server's clock, like the admissions that prune them.
            let mut invocation = self.renew.prepare_invoke();
            invocation.arg(LEASE.as_millis() as u64);
            for (id, client) in &live {
                invocation
                    .key(&client_keys(client)[0])
                    .arg(self.lease_name(*id));
            }
            let mut connection = self.connection.clone();
            let run = invocation.invoke_async::<i64>(&mut connection);
            match tokio::time::timeout(STORE_WAIT * 4, run).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self.mark_down(e.to_string()),
                Err(_) => self.mark_down("lease renewal timed out".to_owned()),
            }
        }
    }
}

/// A request admitted in the shared store.
#[derive(Debug)]
pub struct SharedAdmission {
    shared: Arc<Shared>,
    client: Arc<str>,
    /// Its concurrency lease, if the client has a concurrency limit.
    lease: Option<u64>,
    settled: bool,
}

impl SharedAdmission {
    /// Counts `tokens` and frees the lease: queued for this relay's next
    /// call to the store, which applies it first, or sent within
    /// [`SETTLE_DELAY`]. This relay's next admission so always meets it;
    /// another relay's, within a few milliseconds.
    pub fn settle(mut self, tokens: u64) {
        self.settled = true;
        self.shared.settle_later(Settlement {
            client: self.client.clone(),
            lease: self.lease,
            tokens,
        });
    }
}

impl Drop for SharedAdmission {
    fn drop(&mut self) {
        if !self.settled {
            // Dropped unsettled (a refusal after admission): free the slot.
            self.shared.settle_later(Settlement {
                client: self.client.clone(),
                lease: self.lease,
                tokens: 0,
            });
        }
    }
}

/// The Redis backend.
#[derive(Debug)]
pub struct RedisState {
    shared: Arc<Shared>,
    /// The ledger writer's queue, unless the ledger is off.
    ledger: Option<mpsc::Sender<LedgerEntry>>,
    /// Ledger entries dropped (queue full, or the store gone at close).
    ledger_dropped: Arc<AtomicU64>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    closing: tokio_util::sync::CancellationToken,
}

/// Parses `url` into a client, with errors that never echo a password.
/// Commands go out at once (TCP_NODELAY): several requests' commands may
/// be in flight on the one connection.
fn client_for(url: &str) -> Result<redis::Client, StateError> {
    use redis::IntoConnectionInfo;
    let bad = |e: redis::RedisError| {
        StateError::RedisUrl(format!(
            "not a usable Redis URL (redis://[:PASSWORD@]HOST:PORT[/DB] or rediss://...): {:?}",
            e.kind()
        ))
    };
    let info = url
        .into_connection_info()
        .map_err(bad)?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info).map_err(bad)
}

/// One PING to the Redis at `url` on a connection of its own, within
/// `limit`: how long it took, or why it failed (never with the password).
pub async fn ping(url: &str, limit: Duration) -> Result<Duration, String> {
    let client = client_for(url).map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let attempt = async {
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map_err(|e| format!("PING failed: {e}"))
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(why)) => Err(why),
        Err(_) => Err(format!("no answer within {} s", limit.as_secs())),
    }
}

/// A connection that never waits longer than the store may be waited on.
fn connection_for(client: redis::Client) -> Result<ConnectionManager, StateError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(STORE_WAIT))
        .set_response_timeout(Some(STORE_WAIT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
        StateError::RedisUrl(format!("cannot set up the Redis client: {:?}", e.kind()))
    })
}

impl RedisState {
    /// Sets up the store at `url`; it is connected on first use and again
    /// whenever it was lost.
    pub fn open(
        url: &str,
        fail: FailMode,
        cache_bytes: u64,
        ledger: bool,
    ) -> Result<RedisState, StateError> {
        let connection = connection_for(client_for(url)?)?;
        let shared = Arc::new(Shared {
            connection,
            admit: redis::Script::new(&format!("{WINDOW_LUA}{ADMIT_LUA}")),
            settle: redis::Script::new(&format!("{WINDOW_LUA}{SETTLE_LUA}")),
            renew: redis::Script::new(RENEW_LUA),
            cache_put: redis::Script::new(CACHE_PUT_LUA),
            cache_bytes,
            fail,
            local: Limits::default(),
            reachability: Mutex::new(Reachability::default()),
            is_down: AtomicBool::new(false),
            leases: Mutex::new(HashMap::new()),
            next_lease: AtomicU64::new(0),
            relay_id: format!("{:016x}", fastrand::u64(..)),
            failures: AtomicU64::new(0),
            pending: Mutex::new(Vec::new()),
            flush_due: AtomicBool::new(false),
            order: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(shared.clone().renew_leases());
        let ledger_on = ledger;
        let (ledger, queue) = mpsc::channel(PENDING_MAX);
        let ledger_dropped = Arc::new(AtomicU64::new(0));
        let closing = tokio_util::sync::CancellationToken::new();
        let writer = tokio::spawn(write_ledger(
            shared.clone(),
            queue,
            ledger_dropped.clone(),
            closing.clone(),
        ));
        Ok(RedisState {
            shared,
            ledger: ledger_on.then_some(ledger),
            ledger_dropped,
            writer: Mutex::new(Some(writer)),
            closing,
        })
    }

    async fn admit_shared(
        &self,
        client: &Arc<str>,
        applied: &Applied,
    ) -> Result<Admission, ApiError> {
        let shared = &self.shared;
        let rules = &applied.rules;
        let lease = rules
            .concurrent_requests
            .map(|_| shared.next_lease.fetch_add(1, Ordering::Relaxed));
        let keys = client_keys(client);
        let mut invocation = shared.admit.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation
            .arg(rules.concurrent_requests.map_or(0, |n| n.get()))
            .arg(lease.map(|id| shared.lease_name(id)).unwrap_or_default())
            .arg(LEASE.as_millis() as u64)
            .arg(rules.requests_per_minute.map_or(0, |n| n.get()))
            .arg(rules.tokens_per_minute.unwrap_or(0))
            .arg(rules.tokens_per_day.unwrap_or(0));
        let admitted = async {
            let order = shared.order.lock().await;
            // This relay's settlements so far go first, in the same call.
            let settlements = shared.take_pending();
            carry(&mut invocation, shared, &settlements);
            let mut connection = shared.connection.clone();
            let run = invocation.invoke_async::<(String, u64)>(&mut connection);
            queued_then(run, order).await
        };
        let (verdict, wait) = match tokio::time::timeout(STORE_WAIT, admitted).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return self.unreachable(client, applied, e.to_string()),
            Err(_) => {
                let why = format!("no answer within {} ms", STORE_WAIT.as_millis());
                return self.unreachable(client, applied, why);
            }
        };
        let (code, what) = match verdict.as_str() {
            "ok" => {
                if let Some(id) = lease {
                    shared
                        .leases
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(id, client.clone());
                }
                return Ok(Admission::Shared(SharedAdmission {
                    shared: shared.clone(),
                    client: client.clone(),
                    lease,
                    settled: false,
                }));
            }
            "tokens_per_minute" => (
                "tokens_per_minute_exceeded",
                format!("{} tokens per minute", rules.tokens_per_minute.unwrap_or(0)),
            ),
            "tokens_per_day" => (
                "tokens_per_day_exceeded",
                format!("{} tokens per day", rules.tokens_per_day.unwrap_or(0)),
            ),
            "concurrent_requests" => (
                "concurrent_requests_exceeded",
                format!(
                    "{} concurrent requests",
                    rules.concurrent_requests.map_or(0, |n| n.get())
                ),
            ),
            _ => (
                "requests_per_minute_exceeded",
                format!(
                    "{} requests per minute",
                    rules.requests_per_minute.map_or(0, |n| n.get())
                ),
            ),
        };
        Err(too_many(
            client,
            applied,
            code,
            &format!("{what}, across relays"),
            wait,
        ))
    }

    /// The answer while the store cannot be reached.
    fn unreachable(
        &self,
        client: &Arc<str>,
        applied: &Applied,
        why: String,
    ) -> Result<Admission, ApiError> {
        self.shared.mark_down(why);
        self.fallback(client, applied)
    }

    fn fallback(&self, client: &Arc<str>, applied: &Applied) -> Result<Admission, ApiError> {
        match self.shared.fail {
            FailMode::Open => self
                .shared
                .local
                .admit(client, applied)
                .map(Admission::Local),
            FailMode::Closed => Err(self.shared.refuse_unavailable()),
        }
    }
}

impl StateStore for RedisState {
    fn admit<'a>(
        &'a self,
        client: &'a Arc<str>,
        applied: &'a Applied,
    ) -> BoxFuture<'a, Result<Admission, ApiError>> {
        if self.shared.is_down.load(Ordering::Acquire) {
            return Box::pin(std::future::ready(self.fallback(client, applied)));
        }
        Box::pin(self.admit_shared(client, applied))
    }

    fn record(&self, entry: LedgerEntry) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        if ledger.try_send(entry).is_err() {
            self.ledger_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn cache_get<'a>(&'a self, key: &'a CacheKey) -> BoxFuture<'a, Option<Arc<CachedAnswer>>> {
        Box::pin(async move {
            if self.shared.is_down.load(Ordering::Acquire) || self.shared.cache_bytes == 0 {
                return None;
            }
            let mut connection = self.shared.connection.clone();
            let command = redis::cmd("GET").arg(&cache_keys(key)[0]).clone();
            let run = command.query_async::<Option<Vec<u8>>>(&mut connection);
            let value = match tokio::time::timeout(STORE_WAIT, run).await {
                Ok(Ok(value)) => value?,
                Ok(Err(e)) => {
                    self.shared.mark_down(e.to_string());
                    return None;
                }
                Err(_) => {
                    self.shared
                        .mark_down(format!("no answer within {} ms", STORE_WAIT.as_millis()));
                    return None;
                }
            };
            let (answer, _) = bincode::serde::decode_from_slice::<CachedAnswer, _>(
                &value,
                bincode::config::standard(),
            )
            .ok()?;
            Some(Arc::new(answer))
        })
    }

    fn cache_put(&self, key: CacheKey, answer: CachedAnswer) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let shared = &self.shared;
            if shared.is_down.load(Ordering::Acquire) || shared.cache_bytes == 0 {
                return;
            }
            let Ok(value) = bincode::serde::encode_to_vec(&answer, bincode::config::standard())
            else {
                return;
            };
            let ttl_ms = u64::try_from(answer.ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            let mut invocation = shared.cache_put.prepare_invoke();
            for name in cache_keys(&key) {
                invocation.key(name);
            }
            invocation
                .arg(value.as_slice())
                .arg(ttl_ms)
                .arg(value.len())
                .arg(shared.cache_bytes);
            let mut connection = shared.connection.clone();
            let run = invocation.invoke_async::<i64>(&mut connection);
            match tokio::time::timeout(STORE_WAIT, run).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => shared.background_failed(&e),
                Err(_) => shared.note_failure(),
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.closing.cancel();
            let writer = self
                .writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(writer) = writer {
                let _ = writer.await;
            }
            let dropped = self.ledger_dropped.load(Ordering::Relaxed);
            if dropped > 0 {
                warn!(
                    entries = dropped,
                    "usage ledger: entries were lost (the state store was unreachable or too slow)"
                );
            }
        })
    }

    fn health(&self) -> StoreHealth {
        let reach = self
            .shared
            .reachability
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &reach.down {
            Some(why) => StoreHealth::Degraded(format!("state store unreachable: {why}")),
            None => StoreHealth::Ok,
        }
    }

    fn backend(&self) -> &'static str {
        "redis"
    }

    fn counts(&self) -> StoreCounts {
        StoreCounts {
            failures: self.shared.failures.load(Ordering::Relaxed),
            ledger_dropped: self.ledger_dropped.load(Ordering::Relaxed),
        }
    }
}

/// Appends ledger entries to the stream in batches: what arrived in each
/// [`BATCH_WINDOW`] goes in one pipeline. Entries
/// that could not be written wait (up to [`PENDING_MAX`]) and go with the
/// next batch; at close, what is queued gets written, or counted as lost.
async fn write_ledger(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<LedgerEntry>,
    dropped: Arc<AtomicU64>,
    closing: tokio_util::sync::CancellationToken,
) {
    let mut pending: VecDeque<LedgerEntry> = VecDeque::new();
    loop {
        let closed = gather(&mut queue, &mut pending, &closing).await;
        let mut written = write_pending(&shared, &mut pending).await;
        if closed {
            if !written {
                // One more try: the store may have been slow only once.
                written = write_pending(&shared, &mut pending).await;
            }
            if !written {
                dropped.fetch_add(pending.len() as u64, Ordering::Relaxed);
            }
            return;
        }
        while pending.len() > PENDING_MAX {
            pending.pop_front();
            dropped.fetch_add(1, Ordering::Relaxed);
        }
        if !written {
            tokio::select! {
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
                () = closing.cancelled() => {}
            }
        }
    }
}

/// Waits [`BATCH_WINDOW`] (or for the close), then takes what is queued:
/// requests never wake the writer. True once the ledger is closing.
async fn gather(
    queue: &mut mpsc::Receiver<LedgerEntry>,
    pending: &mut VecDeque<LedgerEntry>,
    closing: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(BATCH_WINDOW) => {}
        () = closing.cancelled() => {}
    }
    loop {
        match queue.try_recv() {
            Ok(entry) => pending.push_back(entry),
            Err(mpsc::error::TryRecvError::Empty) => return closing.is_cancelled(),
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
}

/// Writes the pending entries, a pipeline of at most [`BATCH_MAX`] at a
/// time; true when none is left.
async fn write_pending(shared: &Arc<Shared>, pending: &mut VecDeque<LedgerEntry>) -> bool {
    while !pending.is_empty() {
        let count = pending.len().min(BATCH_MAX);
        let oldest = LedgerEntry::now_ms() - LEDGER_RETENTION_MS;
        let mut pipe = redis::pipe();
        for entry in pending.iter().take(count) {
            let Ok(text) = serde_json::to_string(entry) else {
                continue;
            };
            pipe.cmd("XADD")
                .arg(LEDGER_STREAM)
                .arg("MINID")
                .arg("~")
                .arg(oldest)
                .arg("*")
                .arg("e")
                .arg(text)
                .ignore();
        }
        let mut connection = shared.connection.clone();
        let run = pipe.query_async::<()>(&mut connection);
        match tokio::time::timeout(STORE_WAIT * 4, run).await {
            Ok(Ok(())) => {
                pending.drain(..count);
            }
            Ok(Err(e)) => {
                shared.background_failed(&e);
                return false;
            }
            Err(_) => {
                shared.note_failure();
                return false;
            }
        }
    }
    true
}

/// Totals of the ledger stream at `url` since `since_ms`, for
/// `passage-relay usage`.
pub async fn read_totals(
    url: &str,
    since_ms: i64,
    grouping: Grouping,
) -> Result<Vec<UsageRow>, String> {
    let client = client_for(url).map_err(|e| e.to_string())?;
    let connect = client.get_multiplexed_async_connection();
    let mut connection = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => return Err(format!("cannot reach the state store: {e}")),
        Err(_) => return Err("cannot reach the state store: no answer within 5 s".to_owned()),
    };
    let mut entries = Vec::new();
    let mut from = format!("{since_ms}-0");
    loop {
        let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(LEDGER_STREAM)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut connection)
            .await
            .map_err(|e| format!("reading {LEDGER_STREAM}: {e}"))?;
        let Some(last) = page.ids.last().map(|id| id.id.clone()) else {
            break;
        };
        entries.extend(page.ids.iter().filter_map(|id| {
            id.get::<String>("e")
                .and_then(|text| serde_json::from_str::<LedgerEntry>(&text).ok())
        }));
        // The next page starts just after this one's last id.
        from = format!("({last}");
    }
    Ok(totals(&entries, grouping))
}
