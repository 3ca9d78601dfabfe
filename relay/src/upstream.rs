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

use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use passage_shared::error_body::ApiError;
use passage_shared::error_chain;
use passage_shared::frame::RequestHead;
use passage_shared::http_map::extend_from_wire;

use crate::keys::KeyRing;
use crate::request_body::RequestBody;
pub use crate::upstream_config::{ApiKey, UpstreamConfigError};

/// The body of a request sent upstream: nothing, or the app's body frames.
pub type UpstreamBody = Either<Empty<Bytes>, RequestBody>;

/// Where requests go: scheme, authority and an optional base path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamBase {
    scheme: Scheme,
    authority: Authority,
    base_path: String,
}

impl UpstreamBase {
    /// Parses `http(s)://host[:port][/base/path]`; queries and fragments are refused.
    pub fn parse(url: &str) -> Result<UpstreamBase, UpstreamConfigError> {
        let bad = |why| UpstreamConfigError::BadUrl {
            url: url.to_owned(),
            why,
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| bad("missing http:// or https://"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(bad("the scheme must be http or https"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| bad("missing host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed"));
        }
        Ok(UpstreamBase {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The URI for an app request target (origin form, starting with `/`).
    pub fn join(&self, path_and_query: &str) -> Result<Uri, ApiError> {
        let bad_target = || {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_target",
                "the request target must be a path starting with '/'",
            )
        };
        if !path_and_query.starts_with('/') {
            return Err(bad_target());
        }
        let path = path_and_query.split('?').next().unwrap_or_default();
        if has_dot_segment(path) {
            // `/base/../x` would leave a path-prefixed upstream's base.
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_target",
                "the request path must not contain '.' or '..' segments",
            ));
        }
        let mut joined = String::with_capacity(self.base_path.len() + path_and_query.len());
        joined.push_str(&self.base_path);
        joined.push_str(path_and_query);
        // From the string's own buffer: no second copy.
        let joined =
            PathAndQuery::from_maybe_shared(Bytes::from(joined)).map_err(|_| bad_target())?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(joined)
            .build()
            .map_err(|_| bad_target())
    }
}

impl std::fmt::Display for UpstreamBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// Whether a path has a `.` or `..` segment, literally or percent-encoded,
/// with segments split also at backslashes and encoded slashes, as an
/// upstream that decodes them would split them. One pass, no allocation.
fn has_dot_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    let encoded = |at: usize, hi: u8, lo: u8| {
        bytes.get(at) == Some(&b'%')
            && bytes.get(at + 1) == Some(&hi)
            && bytes
                .get(at + 2)
                .is_some_and(|b| b.to_ascii_lowercase() == lo)
    };
    // Dots in the current segment, and whether it holds anything else.
    let (mut dots, mut other) = (0usize, false);
    let mut at = 0;
    loop {
        let separator = if at == bytes.len() || matches!(bytes[at], b'/' | b'\\') {
            1
        } else if encoded(at, b'2', b'f') || encoded(at, b'5', b'c') {
            3
        } else {
            0
        };
        if separator > 0 {
            if !other && (dots == 1 || dots == 2) {
                return true;
            }
            if at == bytes.len() {
                return false;
            }
            (dots, other) = (0, false);
            at += separator;
        } else if bytes[at] == b'.' {
            dots += 1;
            at += 1;
        } else if encoded(at, b'2', b'e') {
            dots += 1;
            at += 3;
        } else {
            other = true;
            at += 1;
        }
    }
}

/// Builds the upstream request for `head`: fixed destination, the app's
/// end-to-end headers, and the relay's key in place of the app's when set.
pub fn upstream_request<B>(
    base: &UpstreamBase,
    authorization: Option<&HeaderValue>,
    head: RequestHead,
    body: B,
) -> Result<Request<B>, ApiError> {
    let method = Method::from_bytes(head.method.as_bytes()).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_method",
            "invalid HTTP method",
        )
    })?;
    let uri = base.join(&head.path_and_query)?;
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    extend_from_wire(headers, head.headers)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_header", e.to_string()))?;
    // The app addressed the client on 127.0.0.1; the upstream gets its own
    // host, which hyper derives from the URI.
    headers.remove(HOST);
    if let Some(authorization) = authorization {
        headers.insert(AUTHORIZATION, authorization.clone());
    }
    Ok(request)
}

/// The HTTP client of one lane.
type LaneClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>;

/// Most lanes (so upstream HTTP/2 connections) the relay opens.
const MAX_LANES: usize = 256;
/// Requests in flight on one lane before another opens, by default: the
/// least a server should allow on an HTTP/2 connection (RFC 9113, 6.5.2).
pub const DEFAULT_STREAMS_PER_CONNECTION: u32 = 100;

/// One pool of upstream connections, and what it carries now.
#[derive(Debug)]
struct Lane {
    client: LaneClient,
    in_flight: std::sync::atomic::AtomicU32,
}

/// A request's place on its lane, held until its response has ended.
#[derive(Debug)]
pub struct LaneSlot(std::sync::Arc<Lane>);

impl Drop for LaneSlot {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The lanes, and how to open another.
struct Lanes {
    lanes: std::sync::RwLock<Vec<std::sync::Arc<Lane>>>,
    builder: hyper_util::client::legacy::Builder,
    connector: hyper_rustls::HttpsConnector<HttpConnector>,
    per_lane: u32,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("per_lane", &self.per_lane)
            .finish_non_exhaustive()
    }
}

impl Lanes {
    fn new_lane(&self) -> std::sync::Arc<Lane> {
        std::sync::Arc::new(Lane {
            client: self.builder.build(self.connector.clone()),
            in_flight: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// A place on the first lane with room, opening a lane if none has.
    fn take(&self) -> LaneSlot {
        use std::sync::atomic::Ordering;
        let with_room = |lanes: &[std::sync::Arc<Lane>]| {
            lanes.iter().find_map(|lane| {
                lane.in_flight
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.per_lane).then_some(n + 1)
                    })
                    .ok()
                    .map(|_| LaneSlot(lane.clone()))
            })
        };
        {
            let lanes = self
                .lanes
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(slot) = with_room(&lanes) {
                return slot;
            }
        }
        let mut lanes = self
            .lanes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(slot) = with_room(&lanes) {
            return slot;
        }
        let lane = if lanes.len() < MAX_LANES {
            let lane = self.new_lane();
            lanes.push(lane.clone());
            lane
        } else {
            // Every lane full: the least loaded queues one more.
            lanes
                .iter()
                .min_by_key(|lane| lane.in_flight.load(Ordering::Acquire))
                .cloned()
                .unwrap_or_else(|| self.new_lane())
        };
        lane.in_flight.fetch_add(1, Ordering::AcqRel);
        LaneSlot(lane)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain statement of [`has_dot_segment`], allocating freely.
    fn dot_segment_reference(path: &str) -> bool {
        let split = path
            .to_ascii_lowercase()
            .replace("%2f", "/")
            .replace("%5c", "/")
            .replace('\\', "/");
        split.split('/').any(|segment| {
            let decoded = segment.replace("%2e", ".");
            decoded == "." || decoded == ".."
        })
    }

    #[test]
    fn dot_segments_are_found_in_every_spelling() {
        let cases = [
            ("/v1/chat/completions", false),
            ("/v1/../x", true),
            ("/v1/./x", true),
            ("/v1/x/..", true),
            ("..", true),
            ("/v1/%2e%2E/x", true),
            ("/v1/.%2e", true),
            ("/v1/chat/..%2ffiles", true),
            ("/v1/%2E.%5Cadmin", true),
            ("/v1\\..\\x", true),
            ("/v1/...", false),
            ("/v1/.x", false),
            ("/v1/model..1", false),
            ("/v1/org%2Fmodel", false),
            ("/v1/%2", false),
            ("/v1/%%2e", false),
            ("/v1/%2e%", false),
            ("", false),
            ("/", false),
        ];
        for (path, expected) in cases {
            assert_eq!(has_dot_segment(path), expected, "{path}");
            assert_eq!(dot_segment_reference(path), expected, "reference: {path}");
        }
        // Every short path over the interesting bytes agrees with the reference.
        let alphabet: &[&str] = &["/", ".", "%2e", "%2F", "%5c", "\\", "%", "2", "e", "a"];
        let mut paths = vec![String::new()];
        for _ in 0..4 {
            paths = paths
                .iter()
                .flat_map(|p| alphabet.iter().map(move |a| format!("{p}{a}")))
                .collect();
            for path in &paths {
                assert_eq!(
                    has_dot_segment(path),
                    dot_segment_reference(path),
                    "{path:?}"
                );
            }
        }
    }
    use bytes::Bytes;
    use passage_shared::frame::Header;

    fn head(path: &str, headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            id: "1".into(),
            method: "POST".into(),
            path_and_query: path.into(),
            headers: headers
                .iter()
                .map(|(n, v)| Header {
                    name: (*n).into(),
                    value: Bytes::copy_from_slice(v.as_bytes()),
                })
                .collect(),
            has_body: true,
        }
    }

    #[test]
    fn base_urls_are_checked() {
        assert!(UpstreamBase::parse("https://api.openai.com").is_ok());
        assert!(UpstreamBase::parse("http://127.0.0.1:9000/base/").is_ok());
        for bad in [
            "ftp://x",
            "api.openai.com",
            "https://u:p@h",
            "https://h/?q=1",
            "/v1",
        ] {
            assert!(UpstreamBase::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_destination_is_always_the_configured_upstream() {
        let base = UpstreamBase::parse("https://api.openai.com/base/").expect("valid");
        let request = upstream_request(
            &base,
            None,
            head("/v1/models?limit=2", &[("host", "evil.example")]),
            (),
        )
        .expect("builds");
        assert_eq!(
            request.uri(),
            "https://api.openai.com/base/v1/models?limit=2"
        );
        assert!(request.headers().get(HOST).is_none());
        for target in [
            "http://evil.example/x",
            "evil.example:443",
            "*",
            "",
            "/../admin",
            "/v1/%2e%2E/x",
            "/v1/./x",
            "/v1/chat/..%2ffiles",
            "/v1/%2E.%5Cadmin",
        ] {
            assert!(
                upstream_request(&base, None, head(target, &[]), ()).is_err(),
                "{target}"
            );
        }
        let encoded = upstream_request(&base, None, head("/v1/models/org%2Fmodel..1", &[]), ())
            .expect("an encoded slash that makes no dot segment");
        assert_eq!(
            encoded.uri(),
            "https://api.openai.com/base/v1/models/org%2Fmodel..1"
        );
    }

    #[test]
    fn the_relay_key_replaces_the_apps_authorization() {
        let base = UpstreamBase::parse("http://127.0.0.1:1").expect("valid");
        let relay_key = HeaderValue::from_static("Bearer relay-key");
        let app = head("/v1/x", &[("authorization", "Bearer app-key")]);
        let request = upstream_request(&base, Some(&relay_key), app.clone(), ()).expect("builds");
        let values: Vec<_> = request.headers().get_all(AUTHORIZATION).iter().collect();
        assert_eq!(values, [&relay_key]);
        let passed = upstream_request(&base, None, app, ()).expect("builds");
        assert_eq!(passed.headers()[AUTHORIZATION], "Bearer app-key");
    }

    #[test]
    fn the_key_is_never_printed() {
        let key = ApiKey::new("sk-secret".into());
        assert!(!format!("{key:?}").contains("sk-secret"));
    }
}
