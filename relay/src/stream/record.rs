//! What one request leaves behind: its record (status, timings, bytes,
//! usage), the charge against its limits, and at its end the metrics, the
//! usage line and the ledger entry.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::info;

use crate::answer_cache::CacheFill;
use crate::ledger::LedgerEntry;
use crate::metrics::RequestFigures;
use crate::request_body::RefusalSlot;
use crate::request_model::json_model;
use crate::state::Admission;
use crate::usage::{Usage, UsageTap};

use super::StreamContext;
use super::body::JsonCopy;
use super::cached::CachePending;

/// What the usage line and the metrics say about one request.
#[derive(Debug, Default)]
pub(crate) struct RequestRecord {
    /// The model the request named, once known.
    pub(crate) model: Option<String>,
    /// The status the app gets (0 until a response head is sent).
    pub(crate) status: u16,
    /// Time from the stream's head to the answer's first bytes going out.
    pub(crate) ttfb: Option<Duration>,
    /// Request body bytes read from the app (counted by the body itself).
    pub(crate) bytes_in: Arc<AtomicU64>,
    /// Response body bytes sent to the app.
    pub(crate) bytes_out: u64,
    /// The tokens the upstream reported, or the session added up.
    pub(crate) usage: Option<Usage>,
    /// Watches the response for its usage (taken by `finish`).
    pub(super) tap: Option<UsageTap>,
    /// The rate-limit admission: in flight until the response ends (taken
    /// by `charge`) or, on an early return, until the record drops.
    pub(super) admission: Option<Admission>,
    /// Whether the request's tokens were counted against its limits.
    charged: bool,
    /// An unrestricted client's JSON body, for its model.
    pub(super) json_copy: Option<Arc<std::sync::Mutex<JsonCopy>>>,
    /// Where a cache miss's answer will be kept, until its head arrives.
    pub(super) cache_plan: Option<CachePending>,
    /// A cache miss's 200 answer, collected as it passes.
    pub(super) cache_fill: Option<CacheFill>,
    /// Whether the answer came from the cache.
    pub(super) cache_hit: bool,
    /// The request's place on an upstream connection, until it ends.
    pub(super) upstream_slot: Option<crate::upstream::LaneSlot>,
    /// Where the request body leaves its refusal, if it refuses itself.
    pub(super) body_refusal: RefusalSlot,
}

/// How a request ended, as its usage line and ledger entry say it.
#[derive(Debug)]
pub(super) struct Ending {
    /// The outcome's name (`complete`, `cache_hit`, `refused`, ...).
    pub(super) ended: &'static str,
    /// The status the app got.
    pub(super) status: u16,
    /// Whether the metrics count it as failed.
    pub(super) failed: bool,
    /// What went wrong, if anything did.
    pub(super) error: Option<String>,
}

impl RequestRecord {
    /// Ends the response's usage tap, counts the request's tokens against
    /// its limits (once): the usage the upstream reported, or, without
    /// one, an estimate from the bytes; and frees its concurrency slot.
    /// Called before the last frame goes out, so the app's next request,
    /// sent the moment it has this answer, meets the new counts.
    pub(crate) async fn charge(&mut self) {
        if self.charged {
            return;
        }
        self.charged = true;
        let estimate = self
            .tap
            .as_ref()
            .map(|tap| tap.estimate(self.bytes_in.load(Ordering::Relaxed), self.bytes_out));
        if self.usage.is_none() {
            self.usage = self.tap.take().and_then(UsageTap::finish);
        }
        let Some(admission) = self.admission.take() else {
            return;
        };
        let tokens = match (self.usage, estimate) {
            (Some(usage), _) => usage.total(),
            (None, Some(estimate)) if (200..300).contains(&self.status) => estimate,
            _ => 0,
        };
        admission.settle(tokens).await;
    }

    /// The model the body named, if it can be shown: known from the body
    /// (or its copy) and a plain name of at most 64 characters.
    fn shown_model(&mut self) -> Option<&str> {
        if self.model.is_none()
            && let Some(copy) = self.json_copy.take()
        {
            let copy = copy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if copy.len as u64 == self.bytes_in.load(Ordering::Relaxed) {
                self.model = json_model(&copy.bytes);
            }
        }
        self.model.as_deref().filter(|model| {
            model.len() <= 64
                && model.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/')
                })
        })
    }

    /// Counts the ended request in the metrics, writes its usage line and
    /// keeps its ledger entry.
    pub(super) fn report(
        &mut self,
        ctx: &StreamContext,
        client: &str,
        path: String,
        ending: Ending,
        duration: Duration,
    ) {
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let model = self.shown_model().map(str::to_owned);
        if let Some(metrics) = &ctx.metrics {
            metrics.active_streams.dec();
            metrics.record(&RequestFigures {
                client,
                model: model.as_deref(),
                status: ending.status,
                failed: ending.failed,
                ttfb_s: self.ttfb.map(|t| t.as_secs_f64()),
                duration_s: duration.as_secs_f64(),
                bytes_in,
                bytes_out: self.bytes_out,
                usage: self.usage,
            });
        }
        log_request(&ending, self, model.as_deref(), duration);
        ctx.state.record(LedgerEntry {
            at_ms: LedgerEntry::now_ms(),
            client: client.to_owned(),
            model,
            path,
            status: ending.status,
            outcome: ending.ended.to_owned(),
            input_tokens: self.usage.map_or(0, |u| u.prompt_tokens),
            output_tokens: self.usage.map_or(0, |u| u.completion_tokens),
            bytes_in,
            bytes_out: self.bytes_out,
            duration_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
        });
    }
}

/// Milliseconds with one decimal, for log lines.
pub(super) fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10_000.0).round() / 10.0
}

/// The one usage line of a request: never a key, a header or a body.
fn log_request(ending: &Ending, record: &RequestRecord, model: Option<&str>, duration: Duration) {
    let status = ending.status;
    let ended = ending.ended;
    let error = ending.error.as_deref();
    let model = model.unwrap_or("-");
    let bytes_in = record.bytes_in.load(Ordering::Relaxed);
    let ttfb_ms = record.ttfb.map(millis);
    let duration_ms = millis(duration);
    let prompt_tokens = record.usage.map(|u| u.prompt_tokens);
    let completion_tokens = record.usage.map(|u| u.completion_tokens);
    let bytes_out = record.bytes_out;
    // Info for every outcome: this is the accounting record; `ended` and
    // `error` tell the failures apart.
    info!(
        status,
        model,
        ttfb_ms,
        duration_ms,
        prompt_tokens,
        completion_tokens,
        bytes_in,
        bytes_out,
        ended,
        error,
        "request"
    );
}
