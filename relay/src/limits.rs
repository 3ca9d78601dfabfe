//! Per-client rate limits of one relay: requests per rolling minute (at
//! most N in any 60 s, counted in 1 s buckets), concurrent requests, and
//! tokens per rolling minute and day counted from the upstream's reported
//! usage. The Redis backend (`state::redis`) keeps the same counts, in the
//! same buckets, for every relay at once.
//!
//! Tokens are known only once a response ends, so a request is admitted
//! while the client's count is under its limit and may take it over; the
//! next one then waits until enough of the window has rolled off.
//! State is kept per client name and survives a reload.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use http::StatusCode;
use passage_shared::error_body::ApiError;

use crate::policy::Applied;

/// Token counts in time buckets over a rolling window.
#[derive(Debug)]
struct RollingCount {
    /// Width of one bucket, in seconds.
    bucket: u64,
    /// Width of the window, in seconds.
    window: u64,
    /// (bucket start in seconds since the limiter's epoch, tokens), oldest first.
    buckets: VecDeque<(u64, u64)>,
    total: u64,
}

impl RollingCount {
    fn new(bucket: u64, window: u64) -> Self {
        RollingCount {
            bucket,
            window,
            buckets: VecDeque::new(),
            total: 0,
        }
    }

    /// Forgets buckets that ended before the window that ends at `now`.
    fn expire(&mut self, now: u64) {
        while let Some(&(start, tokens)) = self.buckets.front() {
            if start + self.bucket + self.window > now {
                break;
            }
            self.buckets.pop_front();
            self.total = self.total.saturating_sub(tokens);
        }
    }

    fn add(&mut self, now: u64, tokens: u64) {
        self.expire(now);
        // Never behind the newest bucket, so the buckets stay in order
        // even if a caller's clock reading is a little old.
        let start = (now - now % self.bucket).max(self.buckets.back().map_or(0, |b| b.0));
        match self.buckets.back_mut() {
            Some((last, count)) if *last == start => *count = count.saturating_add(tokens),
            _ => self.buckets.push_back((start, tokens)),
        }
        self.total = self.total.saturating_add(tokens);
    }

    /// Seconds until the count is under `limit` again (None: it is now).
    fn wait(&mut self, now: u64, limit: u64) -> Option<u64> {
        self.expire(now);
        let mut total = self.total;
        for &(start, tokens) in &self.buckets {
            if total < limit {
                break;
            }
            total = total.saturating_sub(tokens);
            if total < limit {
                return Some(
                    (start + self.bucket + self.window)
                        .saturating_sub(now)
                        .max(1),
                );
            }
        }
        None
    }
}

/// The rate-limit state of one client.
#[derive(Debug)]
struct ClientState {
    in_flight: AtomicU32,
    requests_minute: Mutex<RollingCount>,
    tokens_minute: Mutex<RollingCount>,
    tokens_day: Mutex<RollingCount>,
}

/// The rate-limit state of every client seen since the relay started.
#[derive(Debug)]
pub struct Limits {
    epoch: Instant,
    clients: Mutex<HashMap<Arc<str>, Arc<ClientState>>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            epoch: Instant::now(),
            clients: Mutex::new(HashMap::new()),
        }
    }
}

/// A request admitted by this relay's own counts: in flight until
/// dropped, and takes the tokens its response reports.
#[derive(Debug)]
pub struct LocalAdmission {
    state: Arc<ClientState>,
    epoch: Instant,
}

impl LocalAdmission {
    /// Counts `tokens` against the client's token limits.
    pub fn record_tokens(&self, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let mut minute = lock(&self.state.tokens_minute);
        minute.add(self.epoch.elapsed().as_secs(), tokens);
        drop(minute);
        let mut day = lock(&self.state.tokens_day);
        day.add(self.epoch.elapsed().as_secs(), tokens);
    }
}

impl Drop for LocalAdmission {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The 429 of a limit, with `retry-after: wait_s`.
pub(crate) fn too_many(
    client: &str,
    applied: &Applied,
    code: &'static str,
    what: &str,
    wait_s: u64,
) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        code,
        format!(
            "client '{client}' is over its limit of {what} (rule {}); retry in {wait_s} s",
            applied.source
        ),
    )
    .with_retry_after(wait_s)
}

impl Limits {
    fn state(&self, client: &Arc<str>) -> Arc<ClientState> {
        lock(&self.clients)
            .entry(client.clone())
            .or_insert_with(|| {
                Arc::new(ClientState {
                    in_flight: AtomicU32::new(0),
                    requests_minute: Mutex::new(RollingCount::new(1, 60)),
                    tokens_minute: Mutex::new(RollingCount::new(1, 60)),
                    tokens_day: Mutex::new(RollingCount::new(60, 24 * 3600)),
                })
            })
            .clone()
    }

    /// Admits a request of `client` under `applied`'s limits, or returns
    /// the 429 (with `retry-after`) of the first limit it is over.
    pub fn admit(&self, client: &Arc<str>, applied: &Applied) -> Result<LocalAdmission, ApiError> {
        let rules = &applied.rules;
        let state = self.state(client);
        let now = self.epoch.elapsed().as_secs();
        let windows = [
            (
                rules.tokens_per_minute,
                &state.tokens_minute,
                "minute",
                "tokens_per_minute_exceeded",
            ),
            (
                rules.tokens_per_day,
                &state.tokens_day,
                "day",
                "tokens_per_day_exceeded",
            ),
        ];
        for (limit, window, per, code) in windows {
            if let Some(limit) = limit
                && let Some(wait) = lock(window).wait(now, limit)
            {
                let what = format!("{limit} tokens per {per}");
                return Err(too_many(client, applied, code, &what, wait));
            }
        }
        let in_flight = state.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        // From here on, dropping the admission undoes the count.
        let admission = LocalAdmission {
            state: state.clone(),
            epoch: self.epoch,
        };
        if let Some(limit) = rules.concurrent_requests
            && in_flight > limit.get()
        {
            let what = format!("{limit} concurrent requests");
            return Err(too_many(
                client,
                applied,
                "concurrent_requests_exceeded",
                &what,
                1,
            ));
        }
        if let Some(limit) = rules.requests_per_minute {
            let mut window = lock(&state.requests_minute);
            if let Some(wait) = window.wait(now, u64::from(limit.get())) {
                let what = format!("{limit} requests per minute");
                return Err(too_many(
                    client,
                    applied,
                    "requests_per_minute_exceeded",
                    &what,
                    wait,
                ));
            }
            window.add(now, 1);
        }
        Ok(admission)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ClientRules, Policy, PolicyTables};
    use std::num::NonZeroU32;

    fn applied(rules: ClientRules) -> Applied {
        let mut tables = PolicyTables::default();
        tables.clients.insert("a".into(), rules);
        Policy::new(tables).expect("valid").rules_for("a")
    }

    #[test]
    fn a_rolling_count_frees_tokens_as_buckets_age() {
        let mut count = RollingCount::new(1, 60);
        count.add(0, 70);
        count.add(30, 50);
        assert_eq!(
            count.wait(31, 100),
            Some(30),
            "the first bucket leaves at 61"
        );
        assert_eq!(count.wait(61, 100), None);
        assert_eq!(count.total, 50);
        assert_eq!(count.wait(89, 50), Some(2));
        assert_eq!(count.wait(91, 50), None);
    }

    #[test]
    fn an_old_clock_reading_keeps_the_buckets_in_order() {
        let mut count = RollingCount::new(60, 24 * 3600);
        count.add(120, 10);
        count.add(60, 10);
        assert_eq!(
            count.buckets.len(),
            1,
            "the late add joins the newest bucket"
        );
        assert_eq!(count.wait(120 + 24 * 3600 + 60, 5), None);
        assert_eq!(count.total, 0);
    }

    #[test]
    fn concurrency_counts_admissions_in_flight() {
        let limits = Limits::default();
        let rules = applied(ClientRules {
            concurrent_requests: NonZeroU32::new(2),
            ..ClientRules::default()
        });
        let client: Arc<str> = "a".into();
        let first = limits.admit(&client, &rules).expect("1");
        let _second = limits.admit(&client, &rules).expect("2");
        let refused = limits.admit(&client, &rules).expect_err("3");
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.retry_after, Some(1));
        drop(first);
        assert!(limits.admit(&client, &rules).is_ok());
    }

    #[test]
    fn requests_per_minute_and_tokens_refuse_with_a_wait() {
        let limits = Limits::default();
        let rules = applied(ClientRules {
            requests_per_minute: NonZeroU32::new(2),
            tokens_per_minute: Some(100),
            ..ClientRules::default()
        });
        let client: Arc<str> = "a".into();
        limits.admit(&client, &rules).expect("1");
        let admission = limits.admit(&client, &rules).expect("2");
        let refused = limits.admit(&client, &rules).expect_err("3");
        assert_eq!(refused.code, "requests_per_minute_exceeded");
        // At most two in any minute: the first leaves the window at 61 s.
        assert!(matches!(refused.retry_after, Some(59..=61)), "{refused:?}");

        let tokens_only = applied(ClientRules {
            tokens_per_minute: Some(100),
            ..ClientRules::default()
        });
        admission.record_tokens(120);
        let refused = limits.admit(&client, &tokens_only).expect_err("tokens");
        assert_eq!(refused.code, "tokens_per_minute_exceeded");
        assert!(matches!(refused.retry_after, Some(59..=61)), "{refused:?}");
        assert!(refused.message.contains("rule clients.a"));
    }
}
