//! What the relay's tasks share about the store: its connection and
//! scripts, whether it answers, the settlements waiting to be sent and
//! the concurrency leases kept alive; and one admitted request's hold on
//! its lease.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::StatusCode;
use passage_shared::error_body::ApiError;
use redis::aio::ConnectionManager;
use tracing::{info, warn};

use super::scripts::client_keys;
use super::{LEASE, LEASE_RENEWAL, PROBE_INTERVAL, WARN_INTERVAL};
use crate::limits::Limits;
use crate::state::{FailMode, STORE_WAIT};

/// Whether the store answers, and since when it does not.
#[derive(Debug, Default)]
pub(super) struct Reachability {
    /// Why it was marked down, while it is.
    pub(super) down: Option<String>,
    /// When the last WARN about it went out.
    pub(super) warned: Option<Instant>,
}

/// What the relay's tasks share about the store.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) connection: ConnectionManager,
    pub(super) admit: redis::Script,
    pub(super) settle: redis::Script,
    pub(super) renew: redis::Script,
    pub(super) cache_put: redis::Script,
    /// Most bytes the cache may hold in Redis.
    pub(super) cache_bytes: u64,
    pub(super) fail: FailMode,
    /// Counts used while the store is down (fail-open).
    pub(super) local: Limits,
    pub(super) reachability: Mutex<Reachability>,
    /// A fast check of `reachability.down.is_some()`.
    pub(super) is_down: AtomicBool,
    /// Live concurrency leases: id → client, renewed while they live.
    pub(super) leases: Mutex<HashMap<u64, Arc<str>>>,
    pub(super) next_lease: AtomicU64,
    /// This relay's lease ids start with it.
    pub(super) relay_id: String,
    /// Times the store failed or was too slow.
    pub(super) failures: AtomicU64,
    /// Settlements not yet sent: the next admission carries them, or a
    /// flush [`SETTLE_DELAY`] after the first.
    pub(super) pending: Mutex<Vec<Settlement>>,
    /// Whether a flush of `pending` is due.
    pub(super) flush_due: AtomicBool,
    /// Held while settlements are taken from `pending` and their command
    /// queued, so that commands reach the store in the order they took
    /// them.
    pub(super) order: tokio::sync::Mutex<()>,
}

/// A finished request's lease to free and tokens to count.
#[derive(Debug)]
pub(super) struct Settlement {
    pub(super) client: Arc<str>,
    pub(super) lease: Option<u64>,
    pub(super) tokens: u64,
}

/// Longest a settlement waits for an admission to carry it.
pub(super) const SETTLE_DELAY: Duration = Duration::from_millis(2);

/// Polls `future` once (queueing its command on the store's connection),
/// then drops `order` and waits for the rest.
pub(super) async fn queued_then<F: std::future::Future>(
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
pub(super) fn carry(
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
    pub(super) fn note_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A background write failed: the store is marked down only when the
    /// connection itself failed, so that one slow or refused write does not
    /// send limited clients to the fallback (or, failing closed, to 503s).
    pub(super) fn background_failed(self: &Arc<Self>, e: &redis::RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            self.mark_down(e.to_string());
        } else {
            self.note_failure();
        }
    }

    /// Marks the store down (once) and starts the probe that brings it back.
    pub(super) fn mark_down(self: &Arc<Self>, why: String) {
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
    pub(super) async fn probe(self: Arc<Self>) {
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

    pub(super) fn refuse_unavailable(&self) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "state_unavailable",
            "the relay's shared state store is unreachable and the relay is set to refuse limited requests until it is back (--state-fail closed)",
        )
        .with_retry_after(1)
    }

    /// Queues a settlement: this relay's next admission carries it, or a
    /// flush sends it within [`SETTLE_DELAY`].
    pub(super) fn settle_later(self: &Arc<Self>, settlement: Settlement) {
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
    pub(super) fn take_pending(&self) -> Vec<Settlement> {
        self.flush_due.store(false, Ordering::Release);
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Sends the queued settlements on their own.
    pub(super) async fn flush(self: &Arc<Self>) {
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

    pub(super) fn lease_name(&self, id: u64) -> String {
        format!("{}:{id}", self.relay_id)
    }

    /// Renews every live lease of this relay, for ever.
    pub(super) async fn renew_leases(self: Arc<Self>) {
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
    pub(super) shared: Arc<Shared>,
    pub(super) client: Arc<str>,
    /// Its concurrency lease, if the client has a concurrency limit.
    pub(super) lease: Option<u64>,
    pub(super) settled: bool,
}

impl SharedAdmission {
    /// Counts `tokens` and frees the lease: queued for this relay's next
    /// call to the store, which applies it first, or sent within
    /// `SETTLE_DELAY`. This relay's next admission so always meets it;
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
