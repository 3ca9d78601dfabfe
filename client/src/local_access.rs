//! Who may use the local endpoint. Anyone who reaches it spends the
//! relay's key, so by default only this machine may, and not web pages:
//!
//! - on a loopback address, a request whose `Host` is not a loopback name
//!   or address is refused (a web page that rebinds its DNS name to
//!   127.0.0.1 still sends its own name);
//! - a request with an `Origin` (a browser's cross-origin request) is
//!   refused unless that origin is on the CORS allow-list, which then gets
//!   the CORS headers and its preflights answered here;
//! - with an access token, every request but `GET /healthz` must carry it
//!   as its API key (`Authorization: Bearer TOKEN`); it is removed before
//!   the request goes on. Listening beyond loopback requires one.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use passage_shared::error_body::ApiError;

/// The local access rules of a running client.
#[derive(Clone, Default)]
pub struct LocalAccess {
    /// `Authorization` value apps must send (`Bearer TOKEN`), if set.
    token: Option<HeaderValue>,
    /// Whether `Host` must name this machine (the listener is on loopback).
    loopback_hosts_only: bool,
    /// Origins whose browser requests are allowed (exact `scheme://host[:port]`).
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
    #[error("CORS origin {0:?} is not of the form http(s)://host[:port]")]
    BadOrigin(String),
}

/// What the guard decided about one request.
#[derive(Debug)]
pub enum Verdict {
    /// Forward it; add these headers to its response (CORS).
    Forward(HeaderMap),
    /// Answer here (a CORS preflight) with this status and headers.
    Answer(StatusCode, HeaderMap),
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
            Some(token) => {
                if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(LocalAccessError::BadToken);
                }
                let mut value = HeaderValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| LocalAccessError::BadToken)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let cors_origins = cors_origins
            .iter()
            .map(|origin| {
                let trimmed = origin.trim_end_matches('/');
                let valid = (trimmed.starts_with("http://") || trimmed.starts_with("https://"))
                    && trimmed.split("://").nth(1).is_some_and(|rest| {
                        !rest.is_empty() && !rest.contains('/') && !rest.contains('@')
                    });
                if !valid {
                    return Err(LocalAccessError::BadOrigin(origin.clone()));
                }
                HeaderValue::try_from(trimmed.to_ascii_lowercase())
                    .map_err(|_| LocalAccessError::BadOrigin(origin.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(LocalAccess {
            token,
            loopback_hosts_only: loopback,
            cors_origins,
        })
    }

    /// Whether an access token is required.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Checks a request; on success the token (if any) has been removed
    /// from `headers`. `GET /healthz` needs no token.
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &mut HeaderMap,
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
        let mut cors = HeaderMap::new();
        if let Some(origin) = headers.get(header::ORIGIN) {
            let lowered = origin
                .to_str()
                .map(str::to_ascii_lowercase)
                .unwrap_or_default();
            let Some(allowed) = self.cors_origins.iter().find(|o| *o == lowered.as_str()) else {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "origin_not_allowed",
                    "browser requests from this origin are not allowed; add it with --cors-origin",
                ));
            };
            cors.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed.clone());
            cors.insert(header::VARY, HeaderValue::from_static("Origin"));
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
                return Ok(Verdict::Answer(StatusCode::NO_CONTENT, cors));
            }
        }
        if let Some(token) = &self.token
            && !(method == Method::GET && path == "/healthz")
        {
            let presented = headers.get(header::AUTHORIZATION);
            if !presented.is_some_and(|value| constant_time_eq(value.as_bytes(), token.as_bytes()))
            {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_access_token",
                    "this passage-client needs its access token as the API key (Authorization: Bearer TOKEN)",
                ));
            }
            headers.remove(header::AUTHORIZATION);
        }
        Ok(Verdict::Forward(cors))
    }
}

/// Adds the CORS headers a verdict asked for to a response's headers.
pub fn add_headers(target: &mut HeaderMap, extra: HeaderMap) {
    let mut last: Option<HeaderName> = None;
    for (name, value) in extra {
        if let Some(name) = name {
            last = Some(name);
        }
        if let Some(name) = &last {
            target.insert(name.clone(), value);
        }
    }
}

/// Whether a `Host` value names this machine: `localhost` (or a name
/// under it), an IPv4 loopback address or `[::1]`, with any port.
fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, port)) if port.is_empty() || port.starts_with(':') => inside,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
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
    fn loopback_hosts_are_recognised() {
        for host in [
            "localhost",
            "localhost:8710",
            "127.0.0.1:8710",
            "127.9.9.9",
            "[::1]:8710",
            "[::1]",
            "app.localhost:1",
            "LOCALHOST.",
        ] {
            assert!(is_loopback_host(host.as_bytes()), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8710",
            "10.0.0.1:8710",
            "[::2]:1",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "[::1]x",
        ] {
            assert!(!is_loopback_host(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn a_rebound_name_is_refused_on_loopback() {
        let access = LocalAccess::new(true, None, &[]).expect("valid");
        let mut map = headers(&[("host", "attacker.example:8710")]);
        let refused = access
            .check(&Method::POST, "/v1/chat/completions", &mut map)
            .expect_err("refused");
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert_eq!(refused.code, "host_not_allowed");
        let mut map = headers(&[("host", "127.0.0.1:8710")]);
        assert!(access.check(&Method::POST, "/v1/x", &mut map).is_ok());
    }

    #[test]
    fn origins_need_the_allow_list_and_preflights_are_answered() {
        let access =
            LocalAccess::new(true, None, &["http://localhost:3000/".into()]).expect("valid");
        let mut map = headers(&[("host", "localhost"), ("origin", "http://evil.example")]);
        let refused = access
            .check(&Method::POST, "/v1/x", &mut map)
            .expect_err("refused");
        assert_eq!(refused.code, "origin_not_allowed");
        let mut map = headers(&[
            ("host", "localhost"),
            ("origin", "http://localhost:3000"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ]);
        let Ok(Verdict::Answer(status, cors)) = access.check(&Method::OPTIONS, "/v1/x", &mut map)
        else {
            panic!("a preflight is answered here");
        };
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(
            cors[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "http://localhost:3000"
        );
        assert_eq!(
            cors[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization, content-type"
        );
        assert!(LocalAccess::new(true, None, &["localhost:3000".into()]).is_err());
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
            .expect_err("refused");
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        let mut map = headers(&[("authorization", "Bearer local-token-0123456789")]);
        assert!(access.check(&Method::GET, "/v1/models", &mut map).is_ok());
        assert!(
            map.get(header::AUTHORIZATION).is_none(),
            "the token never leaves"
        );
        let mut map = headers(&[]);
        assert!(access.check(&Method::GET, "/healthz", &mut map).is_ok());
        assert!(LocalAccess::new(false, Some("short"), &[]).is_err());
        assert!(!format!("{access:?}").contains("local-token"));
    }
}
