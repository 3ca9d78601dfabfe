//! The mock's answers about keys and statuses: a rejected key, a rate-limited
//! key, many headers, error statuses, and the echo of anything else.

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;

use super::{MockBody, bad_request, digest_body, json};

/// Whether the request's key is one this mock refuses: any whose
/// Authorization contains `rejected`, as the API refuses a revoked key.
pub(super) fn key_is_rejected(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("rejected"))
}

/// The API's answer to a key it does not know.
pub(super) fn rejected_key() -> Response<MockBody> {
    json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"error": {
            "message": "Incorrect API key provided: sk-rejected-0000. You can find your API key at https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "code": "invalid_api_key"
        }}),
    )
}

pub(super) fn keyed(request: &Request<Incoming>) -> Response<MockBody> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if authorization.contains("limited") {
        let mut response = json(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({"error": {"message": "rate limited", "type": "requests"}}),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
        return response;
    }
    json(
        StatusCode::OK,
        serde_json::json!({"authorization": authorization}),
    )
}

/// A small answer with `n` extra header lines.
pub(super) fn many_headers(n: u64) -> Response<MockBody> {
    let mut response = json(StatusCode::OK, serde_json::json!({"headers": n}));
    for i in 0..n {
        let name = header::HeaderName::try_from(format!("x-extra-{i}")).expect("valid name");
        response
            .headers_mut()
            .insert(name, header::HeaderValue::from_static("1"));
    }
    response
}

pub(super) fn status(path: &str) -> Response<MockBody> {
    let code = path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::IM_A_TEAPOT);
    let mut response = json(
        code,
        serde_json::json!({"error": {"message": format!("mock {}", code.as_u16()), "type": "mock_error", "code": "mock"}}),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("7"));
    response
        .headers_mut()
        .insert("x-request-id", header::HeaderValue::from_static("req-mock"));
    response
}

pub(super) async fn echo(request: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = request.into_parts();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let (len, sha256) = match digest_body(body).await {
        Ok((len, sha256, _)) => (len, sha256),
        Err(e) => {
            return bad_request(&e);
        }
    };
    json(
        StatusCode::OK,
        serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_len": len,
            "body_sha256": sha256,
        }),
    )
}
