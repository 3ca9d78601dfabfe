//! Mapping between `http` header maps and the headers carried in frames.
//!
//! Hop-by-hop headers belong to one HTTP connection and are never carried:
//! the fixed list from RFC 9110 §7.6.1 plus any header that the message's
//! own `Connection` header names. Everything else travels byte for byte.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::frame::Header;

/// Headers that describe a single connection, not the message.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers that mark a request for the tunnel itself (a WebSocket
/// session, a doctor's question): set by passage, never taken from an app.
const TUNNEL_MARKERS: [&str; 2] = [
    crate::websocket::UPGRADE_HEADER,
    crate::doctor::DOCTOR_HEADER,
];

/// Whether `name` (in any case) is a hop-by-hop header by definition.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The end-to-end headers of `headers`, in order, ready for a frame.
pub fn headers_to_wire(headers: &HeaderMap) -> Vec<Header> {
    let named_by_connection: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            !is_hop_by_hop(name)
                && !TUNNEL_MARKERS.iter().any(|m| m.eq_ignore_ascii_case(name))
                && !named_by_connection.iter().any(|n| n == name)
        })
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        })
        .collect()
}

/// Most header lines one message may carry through the tunnel. Real API
/// traffic uses a few dozen; the cap keeps a hostile head from growing a
/// `HeaderMap` past its limits (which would panic) or amplifying memory.
pub const MAX_HEADERS: usize = 256;

/// Headers received in a frame that cannot become an HTTP header map.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// A name or value is not valid HTTP.
    #[error("invalid header {name:?}")]
    Invalid {
        /// The name as received, cut to 64 bytes.
        name: String,
    },
    /// More header lines than [`MAX_HEADERS`].
    #[error("{count} header lines, more than the limit of {max}")]
    TooMany {
        /// Lines received.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Appends the frame's headers to `headers`, dropping any hop-by-hop ones a
/// misbehaving peer may have sent.
pub fn extend_from_wire(headers: &mut HeaderMap, wire: Vec<Header>) -> Result<(), HeaderError> {
    if wire.len() > MAX_HEADERS {
        return Err(HeaderError::TooMany {
            count: wire.len(),
            max: MAX_HEADERS,
        });
    }
    headers.reserve(wire.len());
    for Header { name, value } in wire {
        if is_hop_by_hop(&name) {
            continue;
        }
        let invalid = || HeaderError::Invalid {
            name: name.chars().take(64).collect(),
        };
        let value = HeaderValue::from_maybe_shared(value).map_err(|_| invalid())?;
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid())?;
        headers.append(name, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names_in_any_case_are_dropped() {
        let mut headers = HeaderMap::new();
        let wire = vec![
            Header {
                name: "keEp-alive".into(),
                value: bytes::Bytes::from_static(b"1"),
            },
            Header {
                name: "Transfer-Encoding".into(),
                value: bytes::Bytes::from_static(b"chunked"),
            },
            Header {
                name: "x-kept".into(),
                value: bytes::Bytes::from_static(b"1"),
            },
        ];
        extend_from_wire(&mut headers, wire).expect("valid");
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn an_app_cannot_send_a_tunnel_marker() {
        let mut headers = HeaderMap::new();
        headers.insert("Passage-Doctor", HeaderValue::from_static("upstream"));
        headers.insert("passage-upgrade", HeaderValue::from_static("websocket"));
        headers.insert("x-passage-cache", HeaderValue::from_static("skip"));
        let wire = headers_to_wire(&headers);
        let names: Vec<&str> = wire.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["x-passage-cache"]);
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_the_rest_kept_in_order() {
        let mut headers = HeaderMap::new();
        headers.append(
            "connection",
            HeaderValue::from_static("keep-alive, X-Private"),
        );
        headers.append("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.append("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.append("x-private", HeaderValue::from_static("hop"));
        headers.append("x-multi", HeaderValue::from_static("one"));
        headers.append("x-multi", HeaderValue::from_static("two"));
        headers.append("authorization", HeaderValue::from_static("Bearer k"));
        let wire = headers_to_wire(&headers);
        let names: Vec<&str> = wire.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["x-multi", "x-multi", "authorization"]);

        let mut back = HeaderMap::new();
        extend_from_wire(&mut back, wire).expect("valid");
        let multi: Vec<&[u8]> = back
            .get_all("x-multi")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(multi, [b"one".as_slice(), b"two".as_slice()]);
    }

    #[test]
    fn invalid_wire_headers_are_refused() {
        let mut headers = HeaderMap::new();
        let bad = vec![Header {
            name: "bad name".into(),
            value: Bytes::from_static(b"x"),
        }];
        assert!(extend_from_wire(&mut headers, bad).is_err());
        let bad_value = vec![Header {
            name: "x-ok".into(),
            value: Bytes::from_static(b"line\nbreak"),
        }];
        assert!(extend_from_wire(&mut headers, bad_value).is_err());
    }

    #[test]
    fn too_many_headers_are_refused_without_panicking() {
        let many: Vec<Header> = (0..40_000)
            .map(|i| Header {
                name: format!("x-{i}"),
                value: Bytes::from_static(b"v"),
            })
            .collect();
        let mut headers = HeaderMap::new();
        assert!(matches!(
            extend_from_wire(&mut headers, many),
            Err(HeaderError::TooMany { count: 40_000, .. })
        ));
        assert!(headers.is_empty());
    }
}
