//! The local HTTP/1.1 server apps talk to: answers `GET /healthz` itself
//! and forwards every other request through the tunnel.
//!
//! Each request gets a span carrying its id and the client's name. On
//! shutdown the listener closes and open connections finish their current
//! response, bounded by the drain timeout.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use passage_shared::cert_expiry::CertificateExpiry;
use passage_shared::error_body::ApiError;
use passage_shared::websocket;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::forward::{ResponseBody, forward};
use crate::local_access::{Verdict, finish_headers};
use crate::metrics::Observed;
use crate::tunnel::{LinkState, RelayLink, Tunnel, last_errors};

pub use crate::server_context::ServerContext;

/// Most header lines a request may have. Below the 100 that hyper's parser
/// takes by default, so a head a little over the limit gets passage's
/// OpenAI-shaped 431; one over 100 lines gets hyper's bare 431. (Raising
/// hyper's limit costs a heap buffer per parsed head, which fragments into
/// about 6 KiB of resident memory per open app connection.)
pub const MAX_REQUEST_HEADERS: usize = 80;
/// Most bytes of header names and values a request may have (hyper's own
/// read buffer stops heads at about 400 KiB).
pub const MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;

/// 431 if the request's head is over [`MAX_REQUEST_HEADERS`] or
/// [`MAX_REQUEST_HEADER_BYTES`].
fn check_head_size(headers: &http::HeaderMap) -> Result<(), ApiError> {
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers.len() > MAX_REQUEST_HEADERS || bytes > MAX_REQUEST_HEADER_BYTES {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request_header_fields_too_large",
            format!(
                "the request has {} header lines and {bytes} bytes of headers; passage accepts at most {MAX_REQUEST_HEADERS} lines and {MAX_REQUEST_HEADER_BYTES} bytes",
                headers.len()
            ),
        ));
    }
    Ok(())
}

/// How long sessions get to send their 1001 close once the drain timeout
/// has run out.
const SESSION_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Accepts app connections until `shutdown` fires, then drains them.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ServerContext>,
    drain_timeout: Duration,
    shutdown: CancellationToken,
) {
    // Each connection drains on its own once this is cancelled (hyper's
    // graceful shutdown: the response in flight finishes, then it closes).
    let draining = CancellationToken::new();
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // SSE events must leave as soon as they are written.
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let service = service_fn(move |request| handle(request, ctx.clone()));
        // hyper's default limits sit above passage's (checked in `handle`,
        // with an OpenAI-shaped 431); past them hyper answers a bare 431.
        // With upgrades: a WebSocket session takes the connection over.
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let draining = draining.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = draining.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                debug!(%peer, error = %e, "app connection ended with an error");
            }
        });
    }
    drop(listener);
    draining.cancel();
    connections.close();
    ctx.sessions.close();
    let drained = async {
        connections.wait().await;
        ctx.sessions.wait().await;
    };
    if tokio::time::timeout(drain_timeout, drained).await.is_err() {
        // Sessions still open are closed with 1001, not cut.
        ctx.sessions_closing.cancel();
        let _ = tokio::time::timeout(SESSION_CLOSE_WAIT, ctx.sessions.wait()).await;
        warn!(
            drain_timeout_s = drain_timeout.as_secs(),
            "drain timeout reached; closing app connections"
        );
    }
}

/// The body of every response the server gives: forwarded or local,
/// observed for the metrics.
pub type ServedBody = Observed<ResponseBody>;

async fn handle(
    request: Request<Incoming>,
    ctx: Arc<ServerContext>,
) -> Result<Response<ServedBody>, Infallible> {
    let id = format!("{:016x}", fastrand::u64(..));
    let span = info_span!(
        "request",
        id = %id,
        client = %ctx.client_name,
        method = %request.method(),
        path = %request.uri().path(),
    );
    async move {
        let (mut parts, body) = request.into_parts();
        let decision = ctx
            .access
            .check(&parts.method, parts.uri.path(), &mut parts.headers);
        let cors = decision.cors;
        let local = |mut response: Response<ResponseBody>| {
            finish_headers(response.headers_mut(), &cors);
            Ok(response.map(|body| Observed::new(body, None)))
        };
        let verdict = decision
            .verdict
            .and_then(|verdict| check_head_size(&parts.headers).map(|()| verdict));
        match verdict {
            Ok(Verdict::Forward) => {}
            Ok(Verdict::Preflight) => {
                let mut response = Response::new(Either::Left(Full::new(Bytes::new())));
                *response.status_mut() = StatusCode::NO_CONTENT;
                return local(response);
            }
            Ok(Verdict::HealthOnly) => return local(health(&ctx.tunnel, None)),
            Err(error) => {
                warn!(
                    status = error.status.as_u16(),
                    code = error.code,
                    "request refused locally"
                );
                return local(error.into_response::<Full<Bytes>>().map(Either::Left));
            }
        }
        let request = Request::from_parts(parts, body);
        if request.method() == Method::GET && request.uri().path() == "/healthz" {
            return local(health(&ctx.tunnel, Some(&ctx.expiry)));
        }
        let started = Instant::now();
        let request_bytes = http_body::Body::size_hint(request.body()).exact();
        let response = if websocket::is_upgrade_request(request.method(), request.headers()) {
            // Boxed, so plain requests do not carry its state.
            Box::pin(crate::websocket::upgrade(&ctx, id, request)).await
        } else {
            forward(&ctx.tunnel, ctx.connect_wait, id, request).await
        };
        let status = response.status().as_u16();
        // The relay logs every request at info; here it is debug detail.
        debug!(
            status,
            head_us = started.elapsed().as_micros() as u64,
            "response head"
        );
        let done = ctx
            .metrics
            .as_ref()
            .map(|metrics| metrics.answered(status, started, request_bytes));
        let mut response = response;
        finish_headers(response.headers_mut(), &cors);
        Ok(response.map(|body| Observed::new(body, done)))
    }
    .instrument(span)
    .await
}

/// `GET /healthz`: 200 while a relay is up and confirmed alive (heard
/// from within the confirmation window), 503 (OpenAI-shaped, with the
/// reason) otherwise. With the certificate's expiry (the caller may know
/// the detail), both carry it, each relay's address, link and transport,
/// the request streams open and the live tasks of this process; without
/// it, only the status.
fn health(tunnel: &Tunnel, expiry: Option<&CertificateExpiry>) -> Response<ResponseBody> {
    let detail = expiry.is_some();
    let links = tunnel.links();
    let confirm_within = tunnel.settings().confirm_within;
    let up = links.iter().find_map(|link| {
        let silent = link.silent_for()?;
        let (connection, _) = link.usable()?;
        (silent <= confirm_within).then_some((link, connection))
    });
    let (status, mut body) = match up {
        Some(_) if !detail => (StatusCode::OK, serde_json::json!({"status": "ok"})),
        Some((link, connection)) => (
            StatusCode::OK,
            serde_json::json!({
                "status": "ok",
                "relay": link.address,
                "transport": connection.kind().name(),
                "rtt_ms": connection.rtt().as_secs_f64() * 1000.0,
            }),
        ),
        None => {
            let stopped = links
                .iter()
                .all(|link| matches!(link.state, LinkState::Stopped));
            let silent = links.iter().filter_map(RelayLink::silent_for).min();
            let error = if stopped {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "client_shutting_down",
                    "passage-client is shutting down",
                )
            } else if let Some(silent) = silent {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tunnel_unconfirmed",
                    format!(
                        "the tunnel is not confirmed alive: nothing heard from the relay for {:.1} s",
                        silent.as_secs_f64()
                    ),
                )
            } else {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tunnel_unavailable",
                    match last_errors(&links) {
                        Some(errors) if detail => {
                            format!("the tunnel to the relay is down: {errors}")
                        }
                        Some(_) => "the tunnel to the relay is down".to_owned(),
                        None => "the tunnel to the relay is not up yet".to_owned(),
                    },
                )
            };
            let body = serde_json::from_slice(&error.body()).unwrap_or_default();
            (error.status, body)
        }
    };
    if let Some(expiry) = expiry {
        expiry.health_fields(&mut body);
        let relays: Vec<serde_json::Value> = links.iter().map(link_detail).collect();
        body["relays"] = relays.into();
        body["open_streams"] = tunnel.open_streams().into();
        body["tasks"] = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
            .into();
    }
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// One relay's entry in the health detail.
fn link_detail(link: &RelayLink) -> serde_json::Value {
    if let (Some((connection, _)), Some(silent)) = (link.usable(), link.silent_for()) {
        return serde_json::json!({
            "address": link.address,
            "state": "up",
            "transport": connection.kind().name(),
            "rtt_ms": connection.rtt().as_secs_f64() * 1000.0,
            "silent_ms": silent.as_millis() as u64,
            "fallbacks": link.fallbacks,
            "quic_probes": link.probes,
        });
    }
    match &link.state {
        LinkState::Up { connection, .. } => serde_json::json!({
            "address": link.address,
            "state": "connecting",
            "last_error": connection.close_reason().map(|reason| reason.to_string()),
        }),
        LinkState::Connecting { last_error } => serde_json::json!({
            "address": link.address,
            "state": "connecting",
            "last_error": last_error,
        }),
        LinkState::Stopped => serde_json::json!({
            "address": link.address,
            "state": "stopped",
        }),
    }
}
