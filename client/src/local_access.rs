//! Who may use the local endpoint. Anyone who reaches it spends the
//! relay's key, so by default only this machine may, and not web pages:
//!
//! - on a loopback address, a request whose `Host` is not a loopback name
//!   or address is refused (a web page that rebinds its DNS name to
//!   127.0.0.1 still sends its own name);
//! - a request with an `Origin` (a browser's cross-origin request) is
//!   refused unless that origin is on the CORS allow-list, which then gets
//!   the CORS headers on every answer and its preflights answered here;
//!   every answer says `Vary: Origin` and carries no CORS header but
//!   passage's, so a browser cache cannot hand one origin's answer to
//!   another;
//! - with an access token, every request must carry it as its API key
//!   (`Authorization: Bearer TOKEN`); it is removed before the request goes
//!   on. `GET /healthz` without it answers only up or down. Listening
//!   beyond loopback requires a token.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use passage_shared::error_body::ApiError;
use passage_shared::loopback_host::is_loopback_host;

/// The local access rules of a running client.
#[derive(Clone, Default)]
pub struct LocalAccess {
    /// The token apps must send as their API key, if set.
    token: Option<Vec<u8>>,
    /// Whether `Host` must name this machine (the listener is on loopback).
    loopback_hosts_only: bool,
    /// Origins whose browser requests are allowed ([`normalize_origin`]d).
    cors_origins: Vec<HeaderValue>,
}

impl std::fmt::Debug for LocalAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAccess")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("loopback_hosts_only", &self.loopback_hosts_only)
            .field("cors_origins", &self.cors_origins)
            .finish()
    }
}

/// Why the local access settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum LocalAccessError {
    /// The token cannot be an HTTP header value, or is too short to guess-proof.
    #[error("the access token must be at least 16 visible ASCII characters")]
    BadToken,
    /// A CORS origin is not `scheme://host[:port]`.
    #[error("CORS origin {0:?} is not of the form scheme://host[:port]")]
    BadOrigin(String),
}

/// What the guard decided about one request.
#[derive(Debug)]
pub struct Decision {
    /// CORS headers for the answer, whatever it is (empty unless the
    /// request came from an allowed origin); see [`finish_headers`].
    pub cors: HeaderMap,
    /// What to do with the request.
    pub verdict: Result<Verdict, ApiError>,
}

/// What to do with a request the guard let in.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it (or, for `GET /healthz`, answer it with all the detail).
    Forward,
    /// `GET /healthz` without the access token: answer up or down only.
    HealthOnly,
    /// A CORS preflight: answer 204 here.
    Preflight,
}

const PREFLIGHT_MAX_AGE_S: u32 = 600;

impl LocalAccess {
    /// Rules for a listener on a loopback address (`loopback`) or not,
    /// with an optional token and a CORS allow-list.
    pub fn new(
        loopback: bool,
        token: Option<&str>,
        cors_origins: &[String],
    ) -> Result<LocalAccess, LocalAccessError> {
        let token = match token {
            Some(token) if token.len() >= 16 && token.bytes().all(|b| b.is_ascii_graphic()) => {
                Some(token.as_bytes().to_vec())
            }
            Some(_) => return Err(LocalAccessError::BadToken),
            None => None,
        };
        let cors_origins = cors_origins
            .iter()
            .map(|origin| {
                normalize_origin(origin)
                    .and_then(|normal| HeaderValue::try_from(normal).ok())
                    .ok_or_else(|| LocalAccessError::BadOrigin(origin.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(LocalAccess {
            token,
            loopback_hosts_only: loopback,
            cors_origins,
        })
    }

    /// Checks a request; when it may go on, the token (if any) has been
    /// removed from `headers`.
    pub fn check(&self, method: &Method, path: &str, headers: &mut HeaderMap) -> Decision {
        let mut cors = HeaderMap::new();
        let verdict = self.decide(method, path, headers, &mut cors);
        Decision { cors, verdict }
    }

    fn decide(
        &self,
        method: &Method,
        path: &str,
        headers: &mut HeaderMap,
        cors: &mut HeaderMap,
    ) -> Result<Verdict, ApiError> {
        if self.loopback_hosts_only
            && let Some(host) = headers.get(header::HOST)
            && !is_loopback_host(host.as_bytes())
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                "passage-client serves this machine only: the Host header must be localhost or a loopback address",
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN)
            && self.answer_origin(origin, method, headers, cors)?
        {
            return Ok(Verdict::Preflight);
        }
        let Some(token) = &self.token else {
            return Ok(Verdict::Forward);
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| bearer(value.as_bytes()))
            .is_some_and(|given| constant_time_eq(given, token));
        if !presented {
            if method == Method::GET && path == "/healthz" {
                return Ok(Verdict::HealthOnly);
            }
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_access_token",
                "this passage-client needs its access token as the API key (Authorization: Bearer TOKEN)",
            ));
        }
        headers.remove(header::AUTHORIZATION);
        // Some SDKs send the key a second time under these names.
        for name in ["api-key", "x-api-key"] {
            let copies = headers
                .get_all(name)
                .iter()
                .any(|value| constant_time_eq(value.as_bytes(), token));
            if copies {
                headers.remove(name);
            }
        }
        Ok(Verdict::Forward)
    }

    /// Checks a browser request's `origin` against `--cors-origin` and
    /// puts the CORS headers for it in `cors`; `Ok(true)` for a preflight,
    /// which is answered here, never forwarded.
    fn answer_origin(
        &self,
        origin: &HeaderValue,
        method: &Method,
        headers: &HeaderMap,
        cors: &mut HeaderMap,
    ) -> Result<bool, ApiError> {
        let normal = origin.to_str().ok().and_then(normalize_origin);
        let Some(allowed) = self
            .cors_origins
            .iter()
            .find(|o| normal.as_deref().is_some_and(|n| *o == n))
        else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "browser requests from this origin are not allowed; add it with --cors-origin",
            ));
        };
        cors.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed.clone());
        if method == Method::OPTIONS
            && let Some(requested) = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            // A preflight: answered here, never forwarded, and never
            // asked for the token (browsers send none with it).
            cors.insert(header::ACCESS_CONTROL_ALLOW_METHODS, requested.clone());
            if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
                cors.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
            }
            cors.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from(PREFLIGHT_MAX_AGE_S),
            );
            return Ok(true);
        }
        // Apps read the request id, rate-limit and processing headers.
        cors.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("*"),
        );
        Ok(false)
    }
}

/// The credentials of a `Bearer` authorization value (scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ")).then(|| rest.trim_ascii())
}

/// An origin as browsers send it: lower case, no trailing `/`, no default
/// port; `None` unless it is `scheme://host[:port]` (any scheme, so
/// extension and app origins can be allowed too).
pub fn normalize_origin(origin: &str) -> Option<String> {
    let lowered = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let (scheme, authority) = lowered.split_once("://")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    let authority_ok = !authority.is_empty()
        && !authority
            .chars()
            .any(|c| matches!(c, '/' | '@' | '?' | '#' | '\\') || !c.is_ascii_graphic());
    if !scheme_ok || !authority_ok {
        return None;
    }
    let default_port = match scheme {
        "http" => Some(":80"),
        "https" => Some(":443"),
        _ => None,
    };
    let authority = default_port
        .and_then(|port| authority.strip_suffix(port))
        .unwrap_or(authority);
    Some(format!("{scheme}://{authority}"))
}

/// Sets the CORS headers of an answer: drops any `access-control-*` header
/// it came with (only passage's allow-list speaks for this endpoint), adds
/// `cors`, and adds `Origin` to its `Vary`.
pub fn finish_headers(target: &mut HeaderMap, cors: &HeaderMap) {
    let foreign: Vec<HeaderName> = target
        .keys()
        .filter(|name| name.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in foreign {
        target.remove(name);
    }
    for (name, value) in cors {
        target.append(name.clone(), value.clone());
    }
    let varies = target.get_all(header::VARY).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|n| n.trim() == "*" || n.trim().eq_ignore_ascii_case("origin"))
        })
    });
    if !varies {
        target.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn a_rebound_name_is_refused_on_loopback() {
        let access = LocalAccess::new(true, None, &[]).expect("valid");
        let mut map = headers(&[("host", "attacker.example:8710")]);
        let refused = access
            .check(&Method::POST, "/v1/chat/completions", &mut map)
            .verdict
            .expect_err("refused");
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert_eq!(refused.code, "host_not_allowed");
        let mut map = headers(&[("host", "127.0.0.1:8710")]);
        assert!(
            access
                .check(&Method::POST, "/v1/x", &mut map)
                .verdict
                .is_ok()
        );
    }

    #[test]
    fn origins_need_the_allow_list_and_preflights_are_answered() {
        let access =
            LocalAccess::new(true, None, &["http://localhost:3000/".into()]).expect("valid");
        let mut map = headers(&[("host", "localhost"), ("origin", "http://evil.example")]);
        let refused = access.check(&Method::POST, "/v1/x", &mut map);
        assert_eq!(
            refused.verdict.expect_err("refused").code,
            "origin_not_allowed"
        );
        assert!(
            refused.cors.is_empty(),
            "a refused origin gets no CORS headers"
        );
        let mut map = headers(&[
            ("host", "localhost"),
            ("origin", "http://localhost:3000"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ]);
        let decision = access.check(&Method::OPTIONS, "/v1/x", &mut map);
        assert_eq!(decision.verdict.expect("answered"), Verdict::Preflight);
        assert_eq!(
            decision.cors[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "http://localhost:3000"
        );
        assert_eq!(
            decision.cors[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization, content-type"
        );
        assert!(LocalAccess::new(true, None, &["localhost:3000".into()]).is_err());
    }

    #[test]
    fn origins_are_compared_as_browsers_send_them() {
        assert_eq!(
            normalize_origin("HTTPS://App.Example:443/").as_deref(),
            Some("https://app.example")
        );
        assert_eq!(
            normalize_origin("http://app.example:80").as_deref(),
            Some("http://app.example")
        );
        assert_eq!(
            normalize_origin("http://app.example:443").as_deref(),
            Some("http://app.example:443")
        );
        assert_eq!(
            normalize_origin("chrome-extension://abcdefghijklmnop").as_deref(),
            Some("chrome-extension://abcdefghijklmnop")
        );
        for bad in [
            "null",
            "app.example",
            "https://",
            "https://a.example/path",
            "https://user@a.example",
            "1http://a.example",
        ] {
            assert_eq!(normalize_origin(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_answer_varies_on_origin_and_keeps_only_passage_cors() {
        let mut answer = headers(&[
            ("access-control-allow-origin", "*"),
            ("access-control-allow-credentials", "true"),
            ("vary", "Accept-Encoding"),
        ]);
        finish_headers(&mut answer, &HeaderMap::new());
        assert!(answer.get("access-control-allow-origin").is_none());
        assert!(answer.get("access-control-allow-credentials").is_none());
        let vary: Vec<_> = answer.get_all(header::VARY).iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);
        let mut answer = headers(&[("vary", "origin")]);
        finish_headers(&mut answer, &HeaderMap::new());
        assert_eq!(answer.get_all(header::VARY).iter().count(), 1);
    }

    #[test]
    fn the_token_is_required_and_removed() {
        let access = LocalAccess::new(false, Some("local-token-0123456789"), &[]).expect("valid");
        let mut map = headers(&[
            ("host", "192.168.1.5:8710"),
            ("authorization", "Bearer wrong-token-0123456789"),
        ]);
        let refused = access
            .check(&Method::GET, "/v1/models", &mut map)
            .verdict
            .expect_err("refused");
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        let mut map = headers(&[
            ("authorization", "bearer  local-token-0123456789"),
            ("api-key", "local-token-0123456789"),
            ("x-api-key", "another-key"),
        ]);
        assert_eq!(
            access
                .check(&Method::GET, "/v1/models", &mut map)
                .verdict
                .expect("allowed"),
            Verdict::Forward
        );
        assert!(
            map.get(header::AUTHORIZATION).is_none() && map.get("api-key").is_none(),
            "the token never leaves"
        );
        assert_eq!(map["x-api-key"], "another-key");
        let mut map = headers(&[]);
        assert_eq!(
            access
                .check(&Method::GET, "/healthz", &mut map)
                .verdict
                .expect("answered"),
            Verdict::HealthOnly
        );
        let mut map = headers(&[("authorization", "Bearer local-token-0123456789")]);
        assert_eq!(
            access
                .check(&Method::GET, "/healthz", &mut map)
                .verdict
                .expect("answered"),
            Verdict::Forward
        );
        assert!(LocalAccess::new(false, Some("short"), &[]).is_err());
        assert!(!format!("{access:?}").contains("local-token"));
    }
}
