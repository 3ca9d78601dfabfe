//! The request head: reading it off the stream, checking the fields that
//! end up in logs, the path forms rules could misread, and the few headers
//! the body stages read (length and type).

use futures_util::StreamExt;
use http::StatusCode;
use passage_shared::error_body::ApiError;
use passage_shared::frame::{Frame, FrameCodec, RequestHead, reset_code};
use passage_shared::transport::BoxRecv;
use tokio_util::codec::FramedRead;
use tracing::warn;

use super::{Responder, StreamContext};

/// Longest request id a client may send (it generates 16 hex digits).
const MAX_ID_LEN: usize = 32;
/// Longest request target accepted; API paths are far shorter.
const MAX_TARGET_LEN: usize = 8 * 1024;

/// Waits for the stream's request head; anything else (another frame, an
/// error, the end, no head in time) resets the stream as a protocol error.
pub(super) async fn read_head(
    frames: &mut FramedRead<BoxRecv, FrameCodec>,
    responder: &mut Responder,
    ctx: &StreamContext,
    client: &str,
) -> Option<RequestHead> {
    let other = match tokio::time::timeout(ctx.head_timeout, frames.next()).await {
        Ok(Some(Ok(Frame::RequestHead(head)))) => return Some(head),
        other => other,
    };
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
    None
}

/// The request's path: its target without the query.
pub(super) fn path_of(head: &RequestHead) -> String {
    head.path_and_query
        .split('?')
        .next()
        .unwrap_or("")
        .to_owned()
}

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

/// Refuses path forms that a prefix rule or the upstream could read as
/// another path: backslashes always, and under path rules also encoded
/// slashes or backslashes and empty segments (`//`). Without path rules an
/// encoded slash is left alone: it can only name another path on the same
/// upstream, and some model ids need one.
pub(super) fn check_path_form(path: &str, has_path_rules: bool) -> Result<(), ApiError> {
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

/// The head's `content-length` ([`check_head`] allows one plain number).
pub(super) fn declared_length(head: &RequestHead) -> Option<u64> {
    head.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(&h.value).ok())
        .and_then(|v| v.parse().ok())
}

/// The head's `content-type`, if it has one that is text.
pub(super) fn content_type(head: &RequestHead) -> Option<&str> {
    head.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-type"))
        .and_then(|h| std::str::from_utf8(&h.value).ok())
}

/// How many `content-type` headers the head has.
pub(super) fn content_type_count(head: &RequestHead) -> usize {
    head.headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-type"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use passage_shared::frame::Header;

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
