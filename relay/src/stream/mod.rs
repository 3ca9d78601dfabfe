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
//!
//! The stages, each in its module, in the order a request meets them:
//! `head` (read and check the head), [`doctor_answer`] (a client's doctor
//! question, answered here), the client's rules (in `serve`), then one
//! path: a [`websocket`] session, `cached` (the answer cache), or `body`
//! (the request body) and `response` (the upstream call and its answer);
//! last `record` (what the request leaves behind: charge, metrics, usage
//! line, ledger).

mod body;
mod cached;
pub mod doctor_answer;
mod head;
mod record;
mod response;
pub mod websocket;

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use passage_shared::error_body::ApiError;
use passage_shared::frame::{
    FrameCodec, Header, RequestHead, frame_reader, frame_writer, reset_code,
};
use passage_shared::transport::{BoxRecv, BoxSend};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::body_prefix::PrefixBudget;
use crate::metrics::RelayMetrics;
use crate::policy::{Applied, Policy};
use crate::state::StateStore;
use crate::upstream::UpstreamClient;

pub use head::check_head;
pub(crate) use record::RequestRecord;

use head::{check_path_form, path_of, read_head};
use record::{Ending, millis};
use response::{proxy, send_api_error};

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

/// Where a request's response frames are written.
pub(crate) type Responder = FramedWrite<BoxSend, FrameCodec>;

/// How a request ended, for the log line.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The response was delivered in full.
    Complete,
    /// The upstream failed after the head was sent; the client got `Failure`.
    UpstreamBrokeOff {
        /// What broke, as the `Failure` frame said it.
        reason: String,
    },
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

/// One request on its way through the stages: who sent it, under which
/// rules, where its answer goes and what its record says.
struct Request<'a> {
    /// What every stream handler shares.
    ctx: &'a StreamContext,
    /// The client's name.
    client: &'a Arc<str>,
    /// The request's path, without the query.
    path: &'a str,
    /// The client's rules.
    applied: Applied,
    /// Where the response frames go.
    responder: &'a mut Responder,
    /// What the usage line will say.
    record: &'a mut RequestRecord,
    /// When the request's stream opened (its head was read).
    started: Instant,
}

impl Request<'_> {
    /// Refuses the request with passage's own `error`, counted as refused.
    fn refuse(&self, error: ApiError) -> Outcome {
        if let Some(metrics) = &self.ctx.metrics {
            metrics.refused(self.client, error.code);
        }
        Outcome::Refused(error)
    }
}

/// Serves one request stream from a client named `client`.
pub async fn handle(send: BoxSend, recv: BoxRecv, ctx: Arc<StreamContext>, client: Arc<str>) {
    let stopped = send.stopped();
    let mut responder = frame_writer(send);
    let mut frames = frame_reader(recv);
    let Some(head) = read_head(&mut frames, &mut responder, &ctx, &client).await else {
        return;
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
    let path = path_of(&head);
    let span =
        info_span!("request", id = %head.id, client = %client, method = %head.method, path = %path);
    async move {
        if let Some(question) = doctor_answer::question(&head) {
            answer_doctor(question, &mut frames, &mut responder, &ctx).await;
            return;
        }
        run(head, path, frames, &mut responder, &ctx, &client, stopped).await;
    }
    .instrument(span)
    .await
}

/// A client's doctor asks the relay itself: no upstream call, no limits,
/// no ledger entry.
async fn answer_doctor(
    question: &[u8],
    frames: &mut FramedRead<BoxRecv, FrameCodec>,
    responder: &mut Responder,
    ctx: &StreamContext,
) {
    let started = Instant::now();
    match doctor_answer::answer(question, frames, responder, ctx).await {
        Ok(status) => {
            responder.get_mut().finish();
            info!(status, ms = millis(started.elapsed()), question = %String::from_utf8_lossy(question), "doctor question answered");
        }
        Err(e) => debug!(error = %e, "could not answer the doctor"),
    }
}

/// Serves a checked request until it ends or the client stops reading,
/// ends its stream, and reports it.
async fn run(
    head: RequestHead,
    path: String,
    frames: FramedRead<BoxRecv, FrameCodec>,
    responder: &mut Responder,
    ctx: &StreamContext,
    client: &Arc<str>,
    stopped: impl Future,
) {
    let started = Instant::now();
    let mut record = RequestRecord::default();
    if let Some(metrics) = &ctx.metrics {
        metrics.active_streams.inc();
    }
    let request = Request {
        ctx,
        client,
        path: &path,
        applied: ctx.policy().rules_for(client),
        responder: &mut *responder,
        record: &mut record,
        started,
    };
    let outcome = tokio::select! {
        outcome = serve(request, head, frames) => outcome,
        _ = stopped => Outcome::ClientGone,
    };
    // Counted and its slot freed before the app can see the end of it
    // (a no-op where the response's last frame already went out).
    record.charge().await;
    let ending = end_stream(&outcome, &record, responder).await;
    // The response is queued on the QUIC stream. Let the connection
    // driver send it before the metrics and the usage line below, which
    // the app need not wait for.
    tokio::task::yield_now().await;
    record.report(ctx, client, path, ending, started.elapsed());
}

/// Ends the request's stream as its outcome says (an error response for a
/// refusal, a reset when the client went away); returns how it ended.
async fn end_stream(
    outcome: &Outcome,
    record: &RequestRecord,
    responder: &mut Responder,
) -> Ending {
    let mut status = record.status;
    let (failed, error) = match outcome {
        Outcome::Complete => {
            responder.get_mut().finish();
            (status >= 400, None)
        }
        Outcome::UpstreamBrokeOff { reason } => {
            responder.get_mut().finish();
            (
                true,
                Some(format!("upstream broke off mid-response: {reason}")),
            )
        }
        Outcome::Refused(error) => {
            status = error.status.as_u16();
            match send_api_error(responder, error.clone()).await {
                Ok(()) => {
                    responder.get_mut().finish();
                }
                Err(e) => debug!(error = %e, "could not deliver the error response"),
            }
            (true, Some(format!("{}: {}", error.code, error.message)))
        }
        Outcome::ClientGone => {
            responder.get_mut().reset(reset_code::CANCELLED);
            (
                false,
                Some("client went away; upstream call dropped".to_owned()),
            )
        }
        Outcome::Closed(reason) => {
            responder.get_mut().finish();
            (true, Some(format!("websocket session closed: {reason}")))
        }
    };
    let ended = match outcome {
        Outcome::Complete if record.cache_hit => "cache_hit",
        _ => outcome.name(),
    };
    Ending {
        ended,
        status,
        failed,
        error,
    }
}

/// Applies the client's rules and limits, then takes the request down its
/// path (a WebSocket session, the cache, or straight upstream); returns
/// how it ended.
async fn serve(
    mut req: Request<'_>,
    mut head: RequestHead,
    frames: FramedRead<BoxRecv, FrameCodec>,
) -> Outcome {
    let (ctx, client) = (req.ctx, req.client);
    if let Err(error) = check_path_form(req.path, req.applied.rules.allow_paths.is_some())
        .and_then(|()| req.applied.check_path(client, req.path))
    {
        return req.refuse(error);
    }
    if req.applied.rules.has_limits() {
        match ctx.state.admit(client, &req.applied).await {
            Ok(admission) => req.record.admission = Some(admission),
            Err(error) => return req.refuse(error),
        }
    }
    let rules = &req.applied.rules;
    if rules.tokens_per_minute.is_some() || rules.tokens_per_day.is_some() {
        // A compressed answer hides its usage; the limits need to read it.
        head.headers
            .retain(|h| !h.name.eq_ignore_ascii_case("accept-encoding"));
        head.headers.push(Header {
            name: "accept-encoding".into(),
            value: Bytes::from_static(b"identity"),
        });
    }
    if websocket::is_session(&head) {
        let session = websocket::Session {
            client,
            applied: &req.applied,
            record: req.record,
            started: req.started,
        };
        // Boxed: the session's state would otherwise sit in every
        // request's future (about 1.5 KiB per held stream).
        return Box::pin(websocket::session(
            head,
            frames,
            req.responder,
            ctx,
            session,
        ))
        .await;
    }
    if let Some(plan) = cached::cache_plan(&mut head, req.path, &req.applied, client, ctx.max_body)
    {
        // Boxed, like sessions: most requests never take this path.
        return Box::pin(cached::serve_cacheable(req, head, plan, frames)).await;
    }
    let body = if head.has_body {
        match body::request_body(&mut req, &head, frames).await {
            Ok(body) => body,
            Err(error) => return req.refuse(error),
        }
    } else {
        // Dropping `frames` here is fine: a bodiless request sends only
        // `End` after its head, and the client does not wait on it.
        Either::Left(Empty::<Bytes>::new())
    };
    proxy(&mut req, head, body).await
}
