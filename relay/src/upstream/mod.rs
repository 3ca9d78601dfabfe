//! The relay's HTTP client for the one configured upstream.
//!
//! Only the configured base URL is ever contacted: a request's path and
//! query are appended to it, and nothing the app sends (Host, an absolute
//! URI) chooses where the relay connects. When the relay holds an API key it
//! replaces the app's Authorization header, so the key never has to leave
//! this machine. Connections are pooled (HTTP/2 where the upstream offers
//! it over TLS, HTTP/1.1 otherwise). An HTTP/2 connection carries only as
//! many streams as its server allows at once (often 100 to 256) and queues
//! the rest, so requests are spread over lanes, each a pool of its own: a
//! new lane (a new connection) opens when every lane has
//! `streams_per_connection` requests in flight.

mod lanes;
mod target;
#[cfg(test)]
mod tests;

use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use passage_shared::error_body::ApiError;
use passage_shared::error_chain;
use passage_shared::frame::RequestHead;

use crate::keys::KeyRing;
use crate::request_body::RequestBody;
pub use crate::upstream_config::{ApiKey, UpstreamConfigError};

use lanes::Lanes;
pub use lanes::{DEFAULT_STREAMS_PER_CONNECTION, LaneSlot};
#[cfg(test)]
use target::has_dot_segment;
pub use target::{UpstreamBase, upstream_request};

/// The body of a request sent upstream: nothing, or the app's body frames.
pub type UpstreamBody = Either<Empty<Bytes>, RequestBody>;

/// Pooled HTTP client bound to the configured upstream.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    base: UpstreamBase,
    keys: Option<std::sync::Arc<KeyRing>>,
    lanes: std::sync::Arc<Lanes>,
    /// HTTP/1.1 only, never pooled: a WebSocket upgrade needs a connection
    /// of its own, which the session then keeps.
    upgrades: Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>,
}

impl UpstreamClient {
    /// Makes the client: webpki roots for https, plain http allowed for
    /// local testing, a bounded connect time. `http2_only` speaks HTTP/2
    /// only (prior knowledge on http://); otherwise https negotiates h2 or
    /// HTTP/1.1. Over HTTP/2 a connection carries `streams_per_connection`
    /// requests at once before another opens.
    pub fn new(
        base: UpstreamBase,
        api_keys: &[ApiKey],
        connect_timeout: Duration,
        http2_only: bool,
        streams_per_connection: u32,
    ) -> Result<UpstreamClient, UpstreamConfigError> {
        let keys = KeyRing::new(api_keys)?.map(std::sync::Arc::new);
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?;
        let tls = hyper_rustls::ConfigBuilderExt::with_webpki_roots(tls).with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http.clone());
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_only(http2_only);
        let lanes = Lanes {
            lanes: std::sync::RwLock::new(Vec::new()),
            builder,
            connector: https,
            per_lane: streams_per_connection.max(1),
        };
        let http1 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let upgrades = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_max_idle_per_host(0)
            .build(http1);
        Ok(UpstreamClient {
            base,
            keys,
            lanes: std::sync::Arc::new(lanes),
            upgrades,
        })
    }

    /// Whether the relay's keys replace the app's Authorization (else the
    /// app's own key goes upstream).
    pub fn replaces_authorization(&self) -> bool {
        self.keys.is_some()
    }

    /// Every relay key's `Authorization` value, in the order configured
    /// (none when apps' own keys go upstream).
    pub fn key_authorizations(&self) -> Vec<HeaderValue> {
        self.keys.as_ref().map_or_else(Vec::new, |keys| {
            keys.every().into_iter().map(|k| k.authorization).collect()
        })
    }

    /// The configured upstream.
    pub fn base(&self) -> &UpstreamBase {
        &self.base
    }

    /// Builds the upstream request for `head` (see [`upstream_request`]),
    /// with the next relay key in turn if the relay holds keys; returns
    /// which key, for [`UpstreamClient::report`].
    pub fn request(
        &self,
        head: RequestHead,
        body: UpstreamBody,
    ) -> Result<(Request<UpstreamBody>, Option<usize>), ApiError> {
        let choice = self.keys.as_ref().map(|keys| keys.pick());
        let request = upstream_request(
            &self.base,
            choice.as_ref().map(|c| &c.authorization),
            head,
            body,
        )?;
        Ok((request, choice.map(|c| c.index)))
    }

    /// Tells the key ring how the upstream answered a request sent with `key`.
    pub fn report(&self, key: Option<usize>, status: StatusCode, headers: &http::HeaderMap) {
        if let (Some(keys), Some(index)) = (&self.keys, key) {
            keys.report(index, status, headers);
        }
    }

    /// Sends a WebSocket upgrade request over a new HTTP/1.1 connection
    /// and waits for the response head (`101` hands the connection over:
    /// see `hyper::upgrade::on`).
    pub async fn send_upgrade(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, ApiError> {
        self.upgrades
            .request(request)
            .await
            .map_err(|e| self.send_error(e))
    }

    /// Sends the request on a lane with room and waits for the response
    /// head; the slot keeps the place until dropped (when the response has
    /// ended).
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, LaneSlot), ApiError> {
        let slot = self.lanes.take();
        let response = slot
            .0
            .client
            .request(request)
            .await
            .map_err(|e| self.send_error(e))?;
        Ok((response, slot))
    }

    /// The API error for a request the upstream did not answer.
    fn send_error(&self, e: hyper_util::client::legacy::Error) -> ApiError {
        let detail = error_chain(&e);
        let too_large =
            find_source::<hyper::Error>(&e).is_some_and(hyper::Error::is_parse_too_large);
        if let Some(body_error) = find_source::<crate::request_body::RequestBodyError>(&e) {
            // The app's side broke the body it was sending.
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "request_body_failed",
                format!("the request body failed: {body_error}"),
            )
        } else if too_large {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "invalid_upstream_response",
                format!(
                    "the upstream's response head is larger than passage reads (over HTTP/1.1: at most {UPSTREAM_H1_MAX_HEADERS} header lines): {detail}"
                ),
            )
        } else if e.is_connect() {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!(
                    "passage relay cannot connect to the upstream {}: {detail}",
                    self.base
                ),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_failed",
                format!("the upstream request failed: {detail}"),
            )
        }
    }
}

/// Most header lines hyper's HTTP/1.1 client reads in a response head (its
/// default, kept: raising it costs a heap buffer per response parsed).
pub const UPSTREAM_H1_MAX_HEADERS: usize = 100;

/// The first error of type `T` in `error`'s chain of sources.
fn find_source<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<T>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}
