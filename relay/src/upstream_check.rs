//! The relay's check of its upstream for `doctor`: one `GET /v1/models`
//! per relay key (the API does not bill a models list), or one without a
//! key when apps bring their own, read for reach and each key's verdict.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http::header::HeaderValue;
use http_body_util::{BodyExt, Either, Empty};
use passage_shared::doctor::{KeyCheck, KeyVerdict, UpstreamReport};
use passage_shared::frame::RequestHead;

use crate::upstream::{UpstreamClient, upstream_request};

/// The path asked: listed by every OpenAI-compatible API, free of charge.
const CHECK_PATH: &str = "/v1/models";
/// Most of an answer's body read for its error message.
const MESSAGE_BYTES: usize = 16 * 1024;

/// Asks the upstream once per key (or once without one), each within
/// `limit`; never logs or returns a key.
pub async fn check_upstream(upstream: &UpstreamClient, limit: Duration) -> UpstreamReport {
    let keys = upstream.key_authorizations();
    let mut report = UpstreamReport {
        upstream: upstream.base().to_string(),
        reachable: false,
        latency_ms: 0.0,
        error: None,
        keyless_status: None,
        keys: Vec::new(),
    };
    let attempts: Vec<Option<HeaderValue>> = if keys.is_empty() {
        vec![None]
    } else {
        keys.into_iter().map(Some).collect()
    };
    for (index, authorization) in attempts.into_iter().enumerate() {
        let started = Instant::now();
        let answer = tokio::time::timeout(limit, ask(upstream, authorization.as_ref())).await;
        let (status, message) = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                report.error = Some(error);
                return report;
            }
            Err(_) => {
                report.error = Some(format!("no answer within {} s", limit.as_secs()));
                return report;
            }
        };
        if index == 0 {
            report.reachable = true;
            report.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        }
        if authorization.is_none() {
            report.keyless_status = Some(status.as_u16());
            continue;
        }
        let verdict = match status.as_u16() {
            200..=299 => KeyVerdict::Accepted,
            401 | 403 => KeyVerdict::Rejected,
            429 => KeyVerdict::Limited,
            _ => KeyVerdict::Unexpected,
        };
        report.keys.push(KeyCheck {
            key: index + 1,
            status: status.as_u16(),
            verdict,
            message: (verdict != KeyVerdict::Accepted)
                .then_some(message)
                .flatten(),
        });
    }
    report
}

/// One models list: its status and, for an error, the upstream's message.
async fn ask(
    upstream: &UpstreamClient,
    authorization: Option<&HeaderValue>,
) -> Result<(StatusCode, Option<String>), String> {
    let head = RequestHead {
        id: "doctor".to_owned(),
        method: "GET".to_owned(),
        path_and_query: CHECK_PATH.to_owned(),
        headers: Vec::new(),
        has_body: false,
    };
    let request = upstream_request(
        upstream.base(),
        authorization,
        head,
        Either::Left(Empty::<Bytes>::new()),
    )
    .map_err(|e| e.message)?;
    let (response, _slot) = upstream.send(request).await.map_err(|e| e.message)?;
    let status = response.status();
    if status.is_success() {
        return Ok((status, None));
    }
    let body = http_body_util::Limited::new(response.into_body(), MESSAGE_BYTES)
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    Ok((status, error_message(&body)))
}

/// The `error.message` of an OpenAI-shaped error body.
fn error_message(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let message = value.get("error")?.get("message")?.as_str()?;
    // An API key the upstream echoes back in its message stays out.
    Some(redact_keys(message).chars().take(200).collect())
}

/// `message` with anything that looks like an API key (`sk-…`) cut short.
fn redact_keys(message: &str) -> String {
    message
        .split(' ')
        .map(|word| {
            if word.starts_with("sk-") && word.len() > 8 {
                format!("{}…", word.chars().take(6).collect::<String>())
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_and_keys_in_them_cut() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-abc123456789. You can find your API key at https://platform.openai.com.","type":"invalid_request_error"}}"#;
        let message = error_message(body).expect("message");
        assert!(
            message.starts_with("Incorrect API key provided: sk-abc…"),
            "{message}"
        );
        assert!(!message.contains("123456789"), "{message}");
        assert_eq!(error_message(b"not json"), None);
    }
}
