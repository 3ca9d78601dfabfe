//! Holding back the start of a request body to find its model: how much a
//! request may reserve, the relay-wide budget with a share per client, and
//! reading the prefix into one buffer.
//!
//! Memory is what is bounded, so the prefix is copied into one buffer as it
//! arrives (a body sent in one-byte frames costs what its bytes cost, not a
//! buffer per frame), a reservation is taken before the first byte is read,
//! and a client may hold at most a quarter of the budget, so one client
//! cannot starve the others. The whole prefix must arrive within
//! [`PREFIX_DEADLINE`], so a trickling sender cannot keep its share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::StatusCode;
use passage_shared::error_body::ApiError;
use passage_shared::frame::{Frame, FrameCodec};
use passage_shared::transport::BoxRecv;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;

/// Bytes of request bodies all model-restricted requests together may hold
/// back while the relay looks for their model.
pub const PREFIX_BUDGET: usize = 64 * 1024 * 1024;

/// Longest time a held-back prefix may take to arrive in full.
pub const PREFIX_DEADLINE: Duration = Duration::from_secs(60);

/// What a JSON body under a model rule reserves, or `None` when its
/// declared length is already past the scan limit (it cannot be checked).
/// A declared length is reserved as given, up to the limit; an unknown
/// one reserves the whole limit.
pub fn reservation(declared: Option<u64>, json: bool, scan_limit: usize) -> Option<usize> {
    match declared {
        Some(length) if json && length > scan_limit as u64 => None,
        Some(length) => Some(usize::try_from(length).map_or(scan_limit, |n| n.min(scan_limit))),
        None => Some(scan_limit),
    }
}

/// The relay-wide budget for held-back bodies, with a cap per client.
#[derive(Debug)]
pub struct PrefixBudget {
    total: Arc<Semaphore>,
    /// Bytes each client holds reserved now.
    shares: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    per_client: usize,
}

/// Bytes reserved for one request's prefix; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
    _share: ShareGuard,
}

/// One client's part of a reservation; given back when dropped.
#[derive(Debug)]
struct ShareGuard {
    shares: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    client: Arc<str>,
    bytes: usize,
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        let mut shares = self.shares.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = shares.get_mut(&self.client) {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                shares.remove(&self.client);
            }
        }
    }
}

/// The 503 for a request that cannot reserve its prefix.
fn busy(message: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "relay_busy", message)
}

impl PrefixBudget {
    /// A budget of `total` bytes, of which one client may hold a quarter.
    pub fn new(total: usize) -> Self {
        PrefixBudget {
            total: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            shares: Arc::default(),
            per_client: total / 4,
        }
    }

    /// Reserves `bytes` for a request of `client`: at once refused (503)
    /// past the client's share; otherwise waits up to `wait` for the budget.
    pub async fn reserve(
        &self,
        client: &Arc<str>,
        bytes: usize,
        wait: Duration,
    ) -> Result<Reservation, ApiError> {
        let share = {
            let mut shares = self.shares.lock().unwrap_or_else(PoisonError::into_inner);
            let held = shares.entry(client.clone()).or_default();
            if *held + bytes > self.per_client {
                let held = *held;
                if held == 0 {
                    shares.remove(client);
                }
                return Err(busy(format!(
                    "client '{client}' is already holding back {} KiB of request bodies for model checks, its share of the relay's budget; retry shortly",
                    held / 1024
                )));
            }
            *held += bytes;
            ShareGuard {
                shares: self.shares.clone(),
                client: client.clone(),
                bytes,
            }
        };
        let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
        match tokio::time::timeout(wait, self.total.clone().acquire_many_owned(permits)).await {
            Ok(Ok(permit)) => Ok(Reservation {
                _permit: permit,
                _share: share,
            }),
            _ => Err(busy(
                "the relay is checking too many request bodies at once; retry shortly".to_owned(),
            )),
        }
    }
}

/// The first bytes of a request body, read ahead of sending it.
#[derive(Debug, Default)]
pub struct BodyPrefix {
    /// The bytes read, in one buffer.
    pub bytes: BytesMut,
    /// Whether the body's `End` was read too (the prefix is the whole body).
    pub ended: bool,
}

impl BodyPrefix {
    /// The prefix as the first chunk of the body that resumes after it.
    pub fn into_chunks(self) -> Vec<Bytes> {
        if self.bytes.is_empty() {
            Vec::new()
        } else {
            vec![self.bytes.freeze()]
        }
    }
}

/// Reads body frames into one buffer until it holds more than `limit`
/// bytes (so a body of exactly `limit` bytes is read with its end), the
/// body's end, or `enough` says so after a chunk (an `Err` from it refuses
/// the request). Each frame must come within `wait`, and all of them
/// within [`PREFIX_DEADLINE`].
pub async fn read_prefix(
    frames: &mut FramedRead<BoxRecv, FrameCodec>,
    limit: usize,
    wait: Duration,
    mut enough: impl FnMut(&Bytes) -> Result<bool, ApiError>,
) -> Result<BodyPrefix, ApiError> {
    let refuse =
        |message: String| ApiError::new(StatusCode::BAD_REQUEST, "request_body_failed", message);
    let deadline = tokio::time::Instant::now() + PREFIX_DEADLINE;
    let mut prefix = BodyPrefix {
        // Grown as bytes come, so a short body costs what it is.
        bytes: BytesMut::with_capacity(limit.min(16 * 1024)),
        ended: false,
    };
    while prefix.bytes.len() <= limit {
        let next = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + wait),
            frames.next(),
        );
        match next.await {
            Ok(Some(Ok(Frame::Data(data)))) => {
                let done = enough(&data)?;
                prefix.bytes.extend_from_slice(&data);
                if done {
                    break;
                }
            }
            Ok(Some(Ok(Frame::End))) => {
                prefix.ended = true;
                break;
            }
            Ok(Some(Ok(Frame::Failure(failure)))) => {
                return Err(refuse(format!(
                    "the request body failed: {}",
                    failure.message
                )));
            }
            Ok(Some(Ok(frame))) => {
                return Err(refuse(format!(
                    "unexpected {} frame inside the request body",
                    frame.kind()
                )));
            }
            Ok(Some(Err(e))) => return Err(refuse(format!("reading the request body: {e}"))),
            Ok(None) => {
                return Err(refuse(
                    "the stream ended inside the request body".to_owned(),
                ));
            }
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_body_timeout",
                    format!(
                        "the part of the request body the relay reads to find its model did not arrive within {} s",
                        PREFIX_DEADLINE.as_secs()
                    ),
                ));
            }
            Err(_) => {
                return Err(refuse(format!(
                    "no request body data within {} s",
                    wait.as_secs()
                )));
            }
        }
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reserves_what_its_body_declares() {
        let limit = 1024 * 1024;
        assert_eq!(reservation(Some(900), true, limit), Some(900));
        assert_eq!(reservation(Some(0), true, limit), Some(0));
        assert_eq!(reservation(Some(limit as u64), true, limit), Some(limit));
        assert_eq!(reservation(Some(limit as u64 + 1), true, limit), None);
        assert_eq!(
            reservation(Some(50 * 1024 * 1024), false, limit),
            Some(limit),
            "a big upload holds back at most the scan limit"
        );
        assert_eq!(reservation(None, true, limit), Some(limit));
        assert_eq!(reservation(Some(u64::MAX), false, limit), Some(limit));
    }

    #[tokio::test]
    async fn one_client_holds_at_most_a_quarter_and_gives_it_back() {
        let budget = PrefixBudget::new(4096);
        let alice: Arc<str> = "alice".into();
        let bob: Arc<str> = "bob".into();
        let wait = Duration::from_millis(50);
        let first = budget.reserve(&alice, 1000, wait).await.expect("fits");
        let refused = budget.reserve(&alice, 100, wait).await.expect_err("over");
        assert_eq!(refused.code, "relay_busy");
        assert!(refused.message.contains("alice"), "{}", refused.message);
        let _bob = budget
            .reserve(&bob, 1024, wait)
            .await
            .expect("bob's own share");
        drop(first);
        let _again = budget
            .reserve(&alice, 1024, wait)
            .await
            .expect("given back");
        assert!(budget.reserve(&alice, 1, wait).await.is_err());
    }

    #[tokio::test]
    async fn a_full_budget_makes_requests_wait_then_refuses() {
        let budget = PrefixBudget::new(4096);
        let names: Vec<Arc<str>> = ["a", "b", "c", "d", "e"].map(Arc::from).into();
        let mut held = Vec::new();
        for name in &names[..4] {
            held.push(
                budget
                    .reserve(name, 1024, Duration::ZERO)
                    .await
                    .expect("fits"),
            );
        }
        let waited = budget
            .reserve(&names[4], 1, Duration::from_millis(50))
            .await
            .expect_err("the budget is full");
        assert!(waited.message.contains("too many"), "{}", waited.message);
        assert!(
            budget.shares.lock().expect("lock").get("e").is_none(),
            "a refused wait gives its share back"
        );
        held.pop();
        assert!(budget.reserve(&names[4], 1, Duration::ZERO).await.is_ok());
    }
}
