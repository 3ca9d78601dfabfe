//! Where requests go: the one configured base URL, paths joined to it
//! without leaving it, and the upstream request built from a request head.

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, StatusCode, Uri};
use passage_shared::error_body::ApiError;
use passage_shared::frame::RequestHead;
use passage_shared::http_map::extend_from_wire;

use crate::upstream_config::UpstreamConfigError;

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
pub(super) fn has_dot_segment(path: &str) -> bool {
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
