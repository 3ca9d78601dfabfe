//! One request on the relay: a QUIC stream in, an upstream call out.
//!
//! The path is straight: read the request head → build the upstream request
//! (its body streams from the stream's remaining frames) → send it → write
//! the response head → forward each upstream body chunk as one frame the
//! moment it arrives → `End` (or `Failure` if the upstream broke off). A
//! small response of known length goes out whole, head and body in one write.
//!
//! Cancellation is structural: the whole exchange runs in a `select!`
//! against the stream's `stopped()` signal, so when the client stops reading
//! (the app went away) the upstream call is dropped at once, which closes
//! the upstream connection and stops token spend.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use http::header::{CONTENT_LENGTH, HeaderValue};
use http_body_util::{BodyExt, Either, Empty};
use passage_shared::body::{
    FrameBody, INLINE_WAIT, Inspector, PrefixHold, encode_whole_body, is_inline, send_data,
};
use passage_shared::error_body::ApiError;
use passage_shared::frame::{
    Frame, FrameCodec, FrameError, Header, RequestHead, ResponseHead, StreamFailure, encode_frame,
    frame_reader, frame_writer, reset_code,
};
use passage_shared::http_map::{MAX_HEADERS, headers_to_wire};
use passage_shared::transport::{BoxRecv, BoxSend, write_last};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::answer_cache::{CACHE_HEADER, CacheFill, CacheKey, CachedAnswer, MAX_CACHED_BODY};
use crate::body_prefix::{PREFIX_BUDGET, PrefixBudget, read_prefix, reservation};
use crate::ledger::LedgerEntry;
use crate::metrics::{RelayMetrics, RequestFigures};
use crate::policy::{Applied, CacheUse, Policy};
use crate::request_model::{BodyKind, MultipartScanner, json_model};
use crate::state::{Admission, StateStore};
use crate::upstream::{UpstreamBody, UpstreamClient};
use crate::usage::{Usage, UsageTap};
use passage_shared::error_chain;

/// What every stream handler needs; shared by all connections.
#[derive(Debug)]
pub struct StreamContext {
    /// The client for the configured upstream.
    pub upstream: UpstreamClient,
    /// Longest wait for the request head after a stream opens.
    pub head_timeout: Duration,
    /// Longest silence from the upstream (before the head or between chunks).
    pub idle_read_timeout: Duration,
    /// Who may do what; replaced whole on reload.
    pub policy: RwLock<Arc<Policy>>,
    /// Where limits are counted and the usage ledger kept.
    pub state: Arc<dyn StateStore>,
    /// Most body bytes read to find the model of a client whose models are restricted.
    pub model_scan_limit: usize,
    /// Largest request body accepted, in bytes.
    pub max_body: u64,
    /// Metrics, when `--metrics` is on.
    pub metrics: Option<Arc<RelayMetrics>>,
    /// Bytes of request bodies that may be held back at once, and by whom.
    pub prefix_budget: PrefixBudget,
    /// Limits of WebSocket sessions.
    pub ws_limits: passage_shared::websocket::SessionLimits,
    /// Cancelled when the drain timeout has run out: sessions still open
    /// close with 1001.
    pub ws_closing: tokio_util::sync::CancellationToken,
}

impl StreamContext {
    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `policy` in force for requests from now on.
    pub fn set_policy(&self, policy: Policy) {
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
    }
}

/// Most body bytes of an unrestricted client's JSON request kept (as it
/// streams past, never held back) to name its model in the usage line.
const ACCOUNTING_SCAN_LIMIT: usize = 64 * 1024;

/// A copy of a JSON body, kept as it streams past while the body is small
/// enough to name its model afterwards.
#[derive(Debug, Default)]
struct JsonCopy {
    bytes: Vec<u8>,
    len: usize,
}

/// What the usage line and the metrics say about one request.
#[derive(Debug, Default)]
pub(crate) struct RequestRecord {
    pub(crate) model: Option<String>,
    /// The status the app gets (0 until a response head is sent).
    pub(crate) status: u16,
    pub(crate) ttfb: Option<Duration>,
    pub(crate) bytes_in: Arc<AtomicU64>,
    pub(crate) bytes_out: u64,
    pub(crate) usage: Option<Usage>,
    /// Watches the response for its usage (taken by `finish`).
    tap: Option<UsageTap>,
    /// The rate-limit admission: in flight until the response ends (taken
    /// in `handle`) or, on an early return, until the record drops.
    admission: Option<Admission>,
    /// Whether the request's tokens were counted against its limits.
    charged: bool,
    /// An unrestricted client's JSON body, for its model.
    json_copy: Option<Arc<std::sync::Mutex<JsonCopy>>>,
    /// Where a cache miss's answer will be kept, until its head arrives.
    cache_plan: Option<CachePending>,
    /// A cache miss's 200 answer, collected as it passes.
    cache_fill: Option<CacheFill>,
    /// Whether the answer came from the cache.
    cache_hit: bool,
    /// The request's place on an upstream connection, until it ends.
    upstream_slot: Option<crate::upstream::LaneSlot>,
    /// Why an inspector aborted the request body, if one did.
    body_refusal: Arc<std::sync::Mutex<Option<ApiError>>>,
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
}

pub(crate) type Responder = FramedWrite<BoxSend, FrameCodec>;

/// How a request ended, for the log line.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The response was delivered in full.
    Complete,
    /// The upstream failed after the head was sent; the client got `Failure`.
    UpstreamBrokeOff { reason: String },
    /// passage answered with its own error.
    Refused(ApiError),
    /// The client went away (app cancelled or tunnel lost).
    ClientGone,
    /// A WebSocket session closed by passage's rules, for this reason.
    Closed(String),
}

impl Outcome {
    /// The outcome's name in the usage line and the ledger.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::UpstreamBrokeOff { .. } => "upstream_broke_off",
            Outcome::Refused(_) => "refused",
            Outcome::ClientGone => "client_gone",
            Outcome::Closed(_) => "closed_by_policy",
        }
    }
}

/// Serves one request stream from a client named `client`.
pub async fn handle(send: BoxSend, recv: BoxRecv, ctx: Arc<StreamContext>, client: Arc<str>) {
    let stopped = send.stopped();
    let mut responder = frame_writer(send);
    let mut frames = frame_reader(recv);

    let head = match tokio::time::timeout(ctx.head_timeout, frames.next()).await {
        Ok(Some(Ok(Frame::RequestHead(head)))) => head,
        other => {
            let why = match other {
                Ok(Some(Ok(frame))) => {
                    format!("expected a request head, got a {} frame", frame.kind())
                }
                Ok(Some(Err(e))) => e.to_string(),
                Ok(None) => "stream closed before the request head".to_owned(),
                Err(_) => "no request head in time".to_owned(),
            };
            warn!(client = %client, reason = %why, "stream refused");
            responder.get_mut().reset(reset_code::PROTOCOL_ERROR);
            frames.get_mut().stop(reset_code::PROTOCOL_ERROR);
            return;
        }
    };

    // The head's fields go into log lines: check them before they do.
    if let Err(error) = check_head(&head) {
        warn!(client = %client, code = error.code, message = %error.message, "request refused");
        if let Some(metrics) = &ctx.metrics {
            metrics.refused(&client, error.code);
        }
        if send_api_error(&mut responder, error).await.is_ok() {
            responder.get_mut().finish();
        }
        return;
    }
    let path = head
        .path_and_query
        .split('?')
        .next()
        .unwrap_or("")
        .to_owned();
    let span =
        info_span!("request", id = %head.id, client = %client, method = %head.method, path = %path);
    async move {
        if let Some(question) = crate::doctor_answer::question(&head) {
            // A client's doctor asks the relay itself: no upstream call,
            // no limits, no ledger entry.
            let started = Instant::now();
            match crate::doctor_answer::answer(question, &mut frames, &mut responder, &ctx).await {
                Ok(status) => {
                    responder.get_mut().finish();
                    info!(status, ms = millis(started.elapsed()), question = %String::from_utf8_lossy(question), "doctor question answered");
                }
                Err(e) => debug!(error = %e, "could not answer the doctor"),
            }
            return;
        }
        let started = Instant::now();
        let mut record = RequestRecord::default();
        if let Some(metrics) = &ctx.metrics {
            metrics.active_streams.inc();
        }
        let outcome = tokio::select! {
            outcome = serve(head, &path, frames, &mut responder, &ctx, &client, &mut record, started) => outcome,
            _ = stopped => Outcome::ClientGone,
        };
        // Counted and its slot freed before the app can see the end of it
        // (a no-op where the response's last frame already went out).
        record.charge().await;
        let mut status = record.status;
        let (failed, error): (bool, Option<String>) = match &outcome {
            Outcome::Complete => {
                responder.get_mut().finish();
                (status >= 400, None)
            }
            Outcome::UpstreamBrokeOff { reason } => {
                responder.get_mut().finish();
                (true, Some(format!("upstream broke off mid-response: {reason}")))
            }
            Outcome::Refused(error) => {
                status = error.status.as_u16();
                match send_api_error(&mut responder, error.clone()).await {
                    Ok(()) => {
                        responder.get_mut().finish();
                    }
                    Err(e) => debug!(error = %e, "could not deliver the error response"),
                }
                (true, Some(format!("{}: {}", error.code, error.message)))
            }
            Outcome::ClientGone => {
                responder.get_mut().reset(reset_code::CANCELLED);
                (false, Some("client went away; upstream call dropped".to_owned()))
            }
            Outcome::Closed(reason) => {
                responder.get_mut().finish();
                (true, Some(format!("websocket session closed: {reason}")))
            }
        };
        // The response is queued on the QUIC stream. Let the connection
        // driver send it before the metrics and the usage line below, which
        // the app need not wait for (about 20 µs at one connection).
        tokio::task::yield_now().await;
        let duration = started.elapsed();
        let bytes_in = record.bytes_in.load(Ordering::Relaxed);
        let model = record.shown_model().map(str::to_owned);
        if let Some(metrics) = &ctx.metrics {
            metrics.active_streams.dec();
            metrics.record(&RequestFigures {
                client: &client,
                model: model.as_deref(),
                status,
                failed,
                ttfb_s: record.ttfb.map(|t| t.as_secs_f64()),
                duration_s: duration.as_secs_f64(),
                bytes_in,
                bytes_out: record.bytes_out,
                usage: record.usage,
            });
        }
        let ended = match outcome {
            Outcome::Complete if record.cache_hit => "cache_hit",
            _ => outcome.name(),
        };
        log_request(ended, status, &record, model.as_deref(), duration, error.as_deref());
        ctx.state.record(LedgerEntry {
            at_ms: LedgerEntry::now_ms(),
            client: client.to_string(),
            model,
            path,
            status,
            outcome: ended.to_owned(),
            input_tokens: record.usage.map_or(0, |u| u.prompt_tokens),
            output_tokens: record.usage.map_or(0, |u| u.completion_tokens),
            bytes_in,
            bytes_out: record.bytes_out,
            duration_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
        });
    }
    .instrument(span)
    .await
}

/// Milliseconds with one decimal, for log lines.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10_000.0).round() / 10.0
}

/// The one usage line of a request: never a key, a header or a body.
fn log_request(
    ended: &str,
    status: u16,
    record: &RequestRecord,
    model: Option<&str>,
    duration: Duration,
    error: Option<&str>,
) {
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

/// Longest request id a client may send (it generates 16 hex digits).
const MAX_ID_LEN: usize = 32;
/// Longest request target accepted; API paths are far shorter.
const MAX_TARGET_LEN: usize = 8 * 1024;

/// Checks the fields of a request head that end up in logs: a short plain
/// id, a valid method token, and a target with no control characters.
pub fn check_head(head: &RequestHead) -> Result<(), ApiError> {
    let refuse = |code, message: &str| Err(ApiError::new(StatusCode::BAD_REQUEST, code, message));
    if head.id.is_empty()
        || head.id.len() > MAX_ID_LEN
        || !head
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return refuse(
            "invalid_request_id",
            "the request id must be 1 to 32 letters, digits or '-'",
        );
    }
    if head.method.len() > 32 || http::Method::from_bytes(head.method.as_bytes()).is_err() {
        return refuse("invalid_method", "invalid HTTP method");
    }
    if head.path_and_query.len() > MAX_TARGET_LEN
        || head
            .path_and_query
            .parse::<http::uri::PathAndQuery>()
            .is_err()
    {
        return refuse(
            "invalid_request_target",
            "the request target is not a valid path",
        );
    }
    let mut lengths = head
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"));
    if let Some(first) = lengths.next() {
        let valid = !first.value.is_empty()
            && first.value.len() <= 19
            && first.value.iter().all(u8::is_ascii_digit);
        if !valid || lengths.next().is_some() {
            // Which of two lengths frames the body is the stuff of
            // request smuggling; the relay sizes its read-ahead by it too.
            return refuse(
                "invalid_content_length",
                "the request needs at most one Content-Length, a plain number",
            );
        }
    }
    Ok(())
}

/// The head's `content-length` ([`check_head`] allows one plain number).
fn declared_length(head: &RequestHead) -> Option<u64> {
    head.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(&h.value).ok())
        .and_then(|v| v.parse().ok())
}

/// The 413 for a body over `max` bytes.
fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!(
            "the request body is larger than this relay accepts ({} MiB)",
            max / (1024 * 1024)
        ),
    )
}

/// The head's `content-type`, if it has one that is text.
fn content_type(head: &RequestHead) -> Option<&str> {
    head.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-type"))
        .and_then(|h| std::str::from_utf8(&h.value).ok())
}

/// Applies the client's rules and limits, then proxies; returns how it ended.
#[allow(clippy::too_many_arguments)]
async fn serve(
    mut head: RequestHead,
    path: &str,
    frames: FramedRead<BoxRecv, FrameCodec>,
    responder: &mut Responder,
    ctx: &StreamContext,
    client: &Arc<str>,
    record: &mut RequestRecord,
    started: Instant,
) -> Outcome {
    let applied: Applied = ctx.policy().rules_for(client);
    let refuse = |error: ApiError| {
        if let Some(metrics) = &ctx.metrics {
            metrics.refused(client, error.code);
        }
        Outcome::Refused(error)
    };
    if let Err(error) = check_path_form(path, applied.rules.allow_paths.is_some())
        .and_then(|()| applied.check_path(client, path))
    {
        return refuse(error);
    }
    if applied.rules.has_limits() {
        match ctx.state.admit(client, &applied).await {
            Ok(admission) => record.admission = Some(admission),
            Err(error) => return refuse(error),
        }
    }
    if applied.rules.tokens_per_minute.is_some() || applied.rules.tokens_per_day.is_some() {
        // A compressed answer hides its usage; the limits need to read it.
        head.headers
            .retain(|h| !h.name.eq_ignore_ascii_case("accept-encoding"));
        head.headers.push(Header {
            name: "accept-encoding".into(),
            value: Bytes::from_static(b"identity"),
        });
    }
    if crate::websocket::is_session(&head) {
        let session = crate::websocket::Session {
            client,
            applied: &applied,
            record,
            started,
        };
        // Boxed: the session's state would otherwise sit in every
        // request's future (about 1.5 KiB per held stream).
        return Box::pin(crate::websocket::session(
            head, frames, responder, ctx, session,
        ))
        .await;
    }
    if let Some(plan) = cache_plan(&mut head, path, &applied, client, ctx.max_body) {
        // Boxed, like sessions: most requests never take this path.
        return Box::pin(serve_cacheable(
            head, plan, frames, responder, ctx, client, &applied, record, started,
        ))
        .await;
    }
    let body = if head.has_body {
        match request_body(&head, frames, ctx, client, &applied, record).await {
            Ok(body) => body,
            Err(error) => return refuse(error),
        }
    } else {
        // Dropping `frames` here is fine: a bodiless request sends only
        // `End` after its head, and the client does not wait on it.
        Either::Left(Empty::<Bytes>::new())
    };
    proxy(head, body, responder, ctx, record, started).await
}

/// Refuses path forms that a prefix rule or the upstream could read as
/// another path: backslashes always, and under path rules also encoded
/// slashes or backslashes and empty segments (`//`). Without path rules an
/// encoded slash is left alone: it can only name another path on the same
/// upstream, and some model ids need one.
fn check_path_form(path: &str, has_path_rules: bool) -> Result<(), ApiError> {
    let encoded_slash = || {
        path.as_bytes()
            .windows(3)
            .any(|w| w.eq_ignore_ascii_case(b"%2f") || w.eq_ignore_ascii_case(b"%5c"))
    };
    let ambiguous =
        path.contains('\\') || (has_path_rules && (path.contains("//") || encoded_slash()));
    if ambiguous {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_target",
            "the request path must not contain backslashes, or (under path rules) encoded slashes or empty segments",
        ));
    }
    Ok(())
}

/// Where and for how long a request's answer is cached.
#[derive(Debug)]
struct CachePlan {
    scope: String,
    ttl: Duration,
    max_entry: usize,
}

/// A cache miss's key and limits, until the answer's head is known.
#[derive(Debug)]
struct CachePending {
    key: CacheKey,
    ttl: Duration,
    max_entry: usize,
}

/// Whether this request uses the cache, by the client's rules and its
/// `x-passage-cache` header (which never goes upstream): a repeatable
/// endpoint, and a JSON body of a declared length under the limit.
fn cache_plan(
    head: &mut RequestHead,
    path: &str,
    applied: &Applied,
    client: &str,
    max_body: u64,
) -> Option<CachePlan> {
    let asked = head
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(CACHE_HEADER))
        .map(|h| h.value.to_ascii_lowercase());
    if asked.is_some() {
        head.headers
            .retain(|h| !h.name.eq_ignore_ascii_case(CACHE_HEADER));
    }
    let rules = &applied.rules;
    let wanted = match rules.cache_use() {
        CacheUse::Off => false,
        CacheUse::Default => asked.as_deref() != Some(b"skip".as_slice()),
        CacheUse::OptIn => asked.as_deref() == Some(b"use".as_slice()),
    };
    if !wanted || !crate::answer_cache::cacheable(&head.method, path) {
        return None;
    }
    if head.has_body {
        // Anything request_body would refuse or stream goes its way.
        let small = declared_length(head)
            .is_some_and(|length| length <= MAX_CACHED_BODY && length <= max_body);
        let content_types = head
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-type"))
            .count();
        if !small || content_types != 1 || BodyKind::of(content_type(head)) != BodyKind::Json {
            return None;
        }
    }
    Some(CachePlan {
        scope: rules
            .cache_scope
            .clone()
            .unwrap_or_else(|| client.to_owned()),
        ttl: rules
            .cache_ttl_seconds
            .map_or(crate::answer_cache::DEFAULT_TTL, |s| {
                Duration::from_secs(u64::from(s.get()))
            }),
        max_entry: rules
            .cache_max_entry_kib
            .map_or(crate::answer_cache::DEFAULT_MAX_ENTRY, |kib| {
                kib.get() as usize * 1024
            }),
    })
}

/// A request that uses the cache: its whole body is read (it is small),
/// then the answer comes from the cache, or from the upstream and is kept.
#[allow(clippy::too_many_arguments)]
async fn serve_cacheable(
    head: RequestHead,
    plan: CachePlan,
    mut frames: FramedRead<BoxRecv, FrameCodec>,
    responder: &mut Responder,
    ctx: &StreamContext,
    client: &Arc<str>,
    applied: &Applied,
    record: &mut RequestRecord,
    started: Instant,
) -> Outcome {
    let refuse = |error: ApiError| {
        if let Some(metrics) = &ctx.metrics {
            metrics.refused(client, error.code);
        }
        Outcome::Refused(error)
    };
    let mut held = None;
    let body = if head.has_body {
        // `cache_plan` saw a declared length of at most 1 MiB.
        let length = declared_length(&head).unwrap_or(0) as usize;
        match ctx
            .prefix_budget
            .reserve(client, length, ctx.head_timeout)
            .await
        {
            Ok(reserved) => held = Some(reserved),
            Err(error) => return refuse(error),
        }
        let prefix = match read_prefix(&mut frames, length, ctx.head_timeout, |_| Ok(false)).await {
            Ok(prefix) => prefix,
            Err(error) => return refuse(error),
        };
        if !prefix.ended || prefix.bytes.len() != length {
            return refuse(ApiError::new(
                StatusCode::BAD_REQUEST,
                "request_body_failed",
                format!("the request body does not match its Content-Length ({length} bytes)"),
            ));
        }
        prefix.bytes.freeze()
    } else {
        Bytes::new()
    };
    record.bytes_in.store(body.len() as u64, Ordering::Relaxed);
    if !body.is_empty() {
        record.model = json_model(&body);
    }
    if applied.restricts_models()
        && let Err(error) = applied.check_model(client, record.model.as_deref())
    {
        return refuse(error);
    }
    let key = crate::answer_cache::key(
        &plan.scope,
        &head.method,
        &head.path_and_query,
        &head.headers,
        !ctx.upstream.replaces_authorization(),
        &body,
    );
    if let Some(answer) = ctx.state.cache_get(&key).await {
        record.cache_hit = true;
        record.status = answer.status;
        record.ttfb = Some(started.elapsed());
        record.bytes_out = answer.pieces.iter().map(|p| p.len() as u64).sum();
        // Its slot is free before the app has the answer, as on every path.
        record.charge().await;
        return replay(responder, &answer).await;
    }
    record.cache_plan = Some(CachePending {
        key,
        ttl: plan.ttl,
        max_entry: plan.max_entry,
    });
    let upstream_body = if head.has_body {
        let mut resumed = FrameBody::resume(frames, vec![body], true);
        if let Some(held) = held {
            resumed = resumed.hold_until_prefix_sent(PrefixHold(Box::new(held)));
        }
        Either::Right(resumed)
    } else {
        Either::Left(Empty::<Bytes>::new())
    };
    proxy(head, upstream_body, responder, ctx, record, started).await
}

/// Sends a cached answer: its head (marked a hit), each piece as a frame
/// (an SSE event each, as they first came), and the end.
async fn replay(responder: &mut Responder, answer: &CachedAnswer) -> Outcome {
    let mut headers = answer.headers.clone();
    let sse = headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-type") && h.value.starts_with(b"text/event-stream")
    });
    if !sse {
        let length: usize = answer.pieces.iter().map(Bytes::len).sum();
        headers.push(Header {
            name: "content-length".into(),
            value: Bytes::from(length.to_string()),
        });
    }
    headers.push(Header {
        name: CACHE_HEADER.into(),
        value: Bytes::from_static(b"hit"),
    });
    let head = Frame::ResponseHead(ResponseHead {
        status: answer.status,
        headers,
    });
    let pieces = answer
        .pieces
        .iter()
        .filter(|piece| !piece.is_empty())
        .map(|piece| Frame::Data(piece.clone()));
    for frame in std::iter::once(head).chain(pieces).chain([Frame::End]) {
        if responder.feed(frame).await.is_err() {
            return Outcome::ClientGone;
        }
    }
    match responder.flush().await {
        Ok(()) => Outcome::Complete,
        Err(_) => Outcome::ClientGone,
    }
}

/// The upstream body of a request that has one, after the body checks:
/// size, and for a model-restricted client the model, read from a prefix
/// held back under [`PREFIX_BUDGET`] until it has gone upstream.
async fn request_body(
    head: &RequestHead,
    mut frames: FramedRead<BoxRecv, FrameCodec>,
    ctx: &StreamContext,
    client: &Arc<str>,
    applied: &Applied,
    record: &mut RequestRecord,
) -> Result<UpstreamBody, ApiError> {
    let declared = declared_length(head);
    if let Some(length) = declared
        && length > ctx.max_body
    {
        return Err(too_large(ctx.max_body));
    }
    let content_types = head
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-type"))
        .count();
    if content_types > 1 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_content_type",
            "the request has more than one Content-Type header",
        ));
    }
    let kind = BodyKind::of(content_type(head));
    if !applied.restricts_models() {
        // Nothing is held back: a JSON body's chunks are kept as they pass,
        // only to name its model in the usage line.
        let mut body = FrameBody::new(frames)
            .counting(record.bytes_in.clone())
            .limited(ctx.max_body);
        if kind == BodyKind::Json {
            let copy = Arc::new(std::sync::Mutex::new(JsonCopy::default()));
            record.json_copy = Some(copy.clone());
            body = body.inspect(Inspector(Box::new(move |chunk: &Bytes| {
                let mut copy = copy
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                copy.len += chunk.len();
                if copy.len <= ACCOUNTING_SCAN_LIMIT {
                    copy.bytes.extend_from_slice(chunk);
                } else {
                    copy.bytes = Vec::new();
                }
                Ok(())
            })));
        }
        return Ok(Either::Right(body));
    }
    let unreadable = |why: &str| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!(
                "client '{client}' may only use the models of rule {}.allow_models, and {why}",
                applied.source
            ),
        )
    };
    let mut scanner = match &kind {
        BodyKind::Json => None,
        BodyKind::Multipart(boundary) => Some(MultipartScanner::new(boundary)),
        BodyKind::BadMultipart => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_content_type",
                "a multipart body needs exactly one boundary and the form-data type",
            ));
        }
        BodyKind::Other => {
            return Err(unreadable(
                "a body that is neither JSON nor a multipart form names no model",
            ));
        }
    };
    let scan_limit = ctx.model_scan_limit.min(PREFIX_BUDGET / 4);
    let json_too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "model_check_body_too_large",
            format!(
                "client '{client}' is under a model rule, and this JSON body is larger than the {} KiB the relay reads to find its model (--model-scan-limit-kib)",
                scan_limit / 1024
            ),
        )
    };
    // Reserve what the body says it needs, not the whole scan limit, so
    // small requests do not crowd each other out.
    let Some(limit) = reservation(declared, kind == BodyKind::Json, scan_limit) else {
        return Err(json_too_large());
    };
    let held = ctx
        .prefix_budget
        .reserve(client, limit, ctx.head_timeout)
        .await?;
    let multipart_refusal = |e: crate::request_model::MultipartError| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!("client '{client}': {e}"),
        )
    };
    let prefix = read_prefix(
        &mut frames,
        limit,
        ctx.head_timeout,
        |chunk| match &mut scanner {
            Some(scanner) => {
                scanner.feed(chunk).map_err(multipart_refusal)?;
                Ok(scanner.model().is_some())
            }
            None => Ok(false),
        },
    )
    .await?;
    let read = prefix.bytes.len() as u64;
    if read > ctx.max_body {
        return Err(too_large(ctx.max_body));
    }
    if let Some(length) = declared
        && (read > length || (prefix.ended && read < length))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "request_body_failed",
            format!("the request body has {read} bytes, its Content-Length says {length}"),
        ));
    }
    record.model = match &scanner {
        Some(scanner) => scanner.model().map(str::to_owned),
        None if prefix.ended => json_model(&prefix.bytes),
        None => return Err(json_too_large()),
    };
    applied.check_model(client, record.model.as_deref())?;
    let ended = prefix.ended;
    let mut body = FrameBody::resume(frames, prefix.into_chunks(), ended)
        .hold_until_prefix_sent(PrefixHold(Box::new(held)))
        .counting(record.bytes_in.clone())
        .limited(ctx.max_body);
    if let Some(mut scanner) = scanner {
        // The rest of the form streams on, watched for a second `model`.
        let refusal = record.body_refusal.clone();
        let client = client.to_owned();
        body = body.inspect(Inspector(Box::new(move |chunk: &Bytes| {
            scanner.feed(chunk).map_err(|e| {
                let error = ApiError::new(
                    StatusCode::FORBIDDEN,
                    "model_not_allowed",
                    format!("client '{client}': {e}"),
                );
                *refusal
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
                e.to_string()
            })
        })));
    }
    Ok(Either::Right(body))
}

/// The request's straight path; returns how it ended.
async fn proxy(
    head: RequestHead,
    body: UpstreamBody,
    responder: &mut Responder,
    ctx: &StreamContext,
    record: &mut RequestRecord,
    started: Instant,
) -> Outcome {
    let (request, key) = match ctx.upstream.request(head, body) {
        Ok(request) => request,
        Err(error) => return Outcome::Refused(error),
    };
    let response =
        match tokio::time::timeout(ctx.idle_read_timeout, ctx.upstream.send(request)).await {
            Ok(Ok((response, slot))) => {
                record.upstream_slot = Some(slot);
                response
            }
            Ok(Err(_)) if record.bytes_in.load(Ordering::Relaxed) > ctx.max_body => {
                // The body crossed the limit and aborted the request.
                return Outcome::Refused(too_large(ctx.max_body));
            }
            Ok(Err(error)) => {
                // An inspector may have aborted the body on purpose.
                let refusal = record
                    .body_refusal
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                return Outcome::Refused(refusal.unwrap_or(error));
            }
            Err(_) => {
                return Outcome::Refused(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "the upstream sent no response within {} s",
                        ctx.idle_read_timeout.as_secs()
                    ),
                ));
            }
        };

    let (parts, mut body) = response.into_parts();
    ctx.upstream.report(key, parts.status, &parts.headers);
    if parts.headers.len() > MAX_HEADERS {
        // HTTP/1.1 heads stop at hyper's limit (fewer lines); HTTP/2
        // heads are bounded by size only.
        return Outcome::Refused(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "invalid_upstream_response",
            format!(
                "the upstream's response head is larger than passage forwards (at most {MAX_HEADERS} header lines)"
            ),
        ));
    }
    let status = parts.status.as_u16();
    let tap = record.tap.insert(UsageTap::for_response(
        parts.status,
        parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    ));
    let mut headers = headers_to_wire(&parts.headers);
    if let Some(pending) = record.cache_plan.take() {
        headers.push(Header {
            name: CACHE_HEADER.into(),
            value: Bytes::from_static(b"miss"),
        });
        if status == 200 {
            record.cache_fill = Some(CacheFill::new(
                pending.key,
                pending.ttl,
                pending.max_entry,
                &headers,
            ));
        }
    }
    let head = Frame::ResponseHead(ResponseHead { status, headers });
    let mut batch = BytesMut::new();
    if let Err(e) = encode_frame(&head, &mut batch) {
        return Outcome::Refused(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "invalid_upstream_response",
            format!("the upstream response head cannot be forwarded: {e}"),
        ));
    }
    record.status = status;
    if is_inline(&body) {
        // A small sized answer (a whole chat completion) that is already
        // arriving goes out whole with its head, in one write (one datagram
        // when it fits). One that takes longer is not held back: what came
        // so far leaves now and the rest streams below.
        let mut bytes = 0u64;
        let fill = &mut record.cache_fill;
        let whole = encode_whole_body(&mut body, &mut batch, |data| {
            bytes += data.len() as u64;
            tap.observe(data);
            if let Some(fill) = fill {
                fill.observe(data);
            }
        });
        match tokio::time::timeout(INLINE_WAIT, whole).await {
            Ok(Ok(())) => {
                record.ttfb = Some(started.elapsed());
                record.bytes_out = bytes;
                // Counted (and kept, if cached) before the app has its
                // answer, so its next request already meets both.
                record.charge().await;
                keep_answer(record, ctx).await;
                // The whole answer, and the end of the stream with it (over
                // HTTP/2 in one frame).
                return match write_last(&mut **responder.get_mut(), &batch).await {
                    Ok(()) => Outcome::Complete,
                    Err(_) => Outcome::ClientGone,
                };
            }
            Ok(Err(e)) => {
                // As on the streaming path: the upstream's head and what
                // arrived, then a response cut short.
                record.ttfb = Some(started.elapsed());
                if responder.get_mut().write_all(&batch).await.is_err() {
                    return Outcome::ClientGone;
                }
                record.bytes_out = bytes;
                return fail(responder, record, "upstream_body_failed", error_chain(&e)).await;
            }
            Err(_) => {
                // What arrived so far is in `batch` and goes out below.
                record.bytes_out = bytes;
            }
        }
    }
    record.ttfb = Some(started.elapsed());
    if responder.get_mut().write_all(&batch).await.is_err() {
        return Outcome::ClientGone;
    }

    loop {
        let next = match tokio::time::timeout(ctx.idle_read_timeout, body.frame()).await {
            Ok(next) => next,
            Err(_) => {
                let reason = format!("upstream silent for {} s", ctx.idle_read_timeout.as_secs());
                return fail(responder, record, "upstream_timeout", reason).await;
            }
        };
        match next {
            Some(Ok(frame)) => {
                // Trailers have no place in the OpenAI API; they are dropped.
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                record.bytes_out += data.len() as u64;
                if let Some(tap) = &mut record.tap {
                    tap.observe(&data);
                }
                if let Some(fill) = &mut record.cache_fill {
                    fill.observe(&data);
                }
                if send_data(responder, data).await.is_err() {
                    return Outcome::ClientGone;
                }
            }
            Some(Err(e)) => {
                let reason = error_chain(&e);
                return fail(responder, record, "upstream_body_failed", reason).await;
            }
            None => {
                record.charge().await;
                keep_answer(record, ctx).await;
                if responder.send(Frame::End).await.is_err() {
                    return Outcome::ClientGone;
                }
                return Outcome::Complete;
            }
        }
    }
}

/// Keeps a cache miss's whole answer, now that it has arrived, before its
/// end goes to the app: the app's next identical request is a hit.
async fn keep_answer(record: &mut RequestRecord, ctx: &StreamContext) {
    if let Some(fill) = record.cache_fill.take() {
        let key = fill.key;
        if let Some(answer) = fill.finish() {
            ctx.state.cache_put(key, answer).await;
        }
    }
}

/// Tells the client the response is incomplete, so it never mistakes a
/// truncated body for a whole one.
async fn fail(
    responder: &mut Responder,
    record: &mut RequestRecord,
    code: &str,
    reason: String,
) -> Outcome {
    record.charge().await;
    let failure = Frame::Failure(StreamFailure {
        code: code.to_owned(),
        message: reason.clone(),
    });
    if responder.send(failure).await.is_err() {
        return Outcome::ClientGone;
    }
    Outcome::UpstreamBrokeOff { reason }
}

/// Sends a passage error as a complete response on the stream.
async fn send_api_error(responder: &mut Responder, error: ApiError) -> Result<(), FrameError> {
    let response: http::Response<Bytes> = error.into_response();
    let (mut parts, body) = response.into_parts();
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    responder
        .send(Frame::ResponseHead(ResponseHead {
            status: parts.status.as_u16(),
            headers: headers_to_wire(&parts.headers),
        }))
        .await?;
    responder.send(Frame::Data(body)).await?;
    responder.send(Frame::End).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(lengths: &[&str]) -> RequestHead {
        RequestHead {
            id: "r1".into(),
            method: "POST".into(),
            path_and_query: "/v1/chat/completions".into(),
            headers: lengths
                .iter()
                .map(|value| Header {
                    name: "content-length".into(),
                    value: Bytes::copy_from_slice(value.as_bytes()),
                })
                .collect(),
            has_body: true,
        }
    }

    #[test]
    fn a_head_has_at_most_one_plain_content_length() {
        assert!(check_head(&head_with(&[])).is_ok());
        assert!(check_head(&head_with(&["0"])).is_ok());
        assert_eq!(declared_length(&head_with(&["1234"])), Some(1234));
        for bad in [
            &["12", "12"][..],
            &["12", "13"],
            &["+12"],
            &[" 12"],
            &["12,12"],
            &[""],
            &["99999999999999999999"],
        ] {
            let refused = check_head(&head_with(bad)).expect_err("refused");
            assert_eq!(refused.code, "invalid_content_length", "{bad:?}");
        }
    }
}
