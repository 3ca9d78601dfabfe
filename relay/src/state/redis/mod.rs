//! The shared state backend: every relay of a team points `--state` at one
//! Redis, and a client's limits hold across all of them.
//!
//! Each check is one Lua script run atomically on the server (no
//! read-modify-write between relays): requests and tokens per rolling
//! window in the same buckets as `crate::limits`, kept as a list of
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

mod ledger_stream;
mod scripts;
mod store_link;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use passage_shared::error_body::ApiError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tracing::warn;

use crate::answer_cache::{CacheKey, CachedAnswer};
use crate::ledger::LedgerEntry;
use crate::limits::{Limits, too_many};
use crate::policy::{Applied, ClientRules};
use crate::state::{
    Admission, FailMode, STORE_WAIT, StateError, StateStore, StoreCounts, StoreHealth,
};

pub use ledger_stream::read_totals;
use ledger_stream::write_ledger;
use scripts::{
    ADMIT_LUA, CACHE_PUT_LUA, RENEW_LUA, SETTLE_LUA, WINDOW_LUA, cache_keys, client_keys,
};
pub use store_link::SharedAdmission;
use store_link::{Reachability, Shared, carry, queued_then};

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
        if verdict != "ok" {
            let (code, what) = exceeded(&verdict, &applied.rules);
            return Err(too_many(
                client,
                applied,
                code,
                &format!("{what}, across relays"),
                wait,
            ));
        }
        if let Some(id) = lease {
            shared
                .leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, client.clone());
        }
        Ok(Admission::Shared(SharedAdmission {
            shared: shared.clone(),
            client: client.clone(),
            lease,
            settled: false,
        }))
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

/// The refusal code for the admit script's `verdict` (the limit it hit),
/// and the limit in words.
fn exceeded(verdict: &str, rules: &ClientRules) -> (&'static str, String) {
    match verdict {
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
