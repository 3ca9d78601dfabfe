//! The OpenAI-shaped JSON error that passage returns for everything it
//! refuses or fails at, so SDKs show a meaningful message.
//!
//! Both programs build their own errors through [`ApiError`]; errors that
//! come from the upstream API are passed through untouched and never go
//! through here.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};

/// The `type` field of every error passage itself produces.
pub const ERROR_TYPE: &str = "passage_error";

/// An error passage answers with instead of an upstream response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status of the response.
    pub status: StatusCode,
    /// Machine-readable code, e.g. `tunnel_unavailable`.
    pub code: &'static str,
    /// Human-readable message shown by SDKs.
    pub message: String,
    /// Seconds after which a retry may succeed (sent as `retry-after`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// Makes an error with the given status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error with a `retry-after` of `seconds` (at least 1).
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// The JSON body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Bytes {
        let value = serde_json::json!({
            "error": {
                "message": self.message,
                "type": ERROR_TYPE,
                "param": null,
                "code": self.code,
            }
        });
        Bytes::from(value.to_string())
    }

    /// The whole HTTP response, with a body type built from the JSON bytes.
    pub fn into_response<B: From<Bytes>>(self) -> http::Response<B> {
        let body = self.body();
        let mut response = http::Response::new(B::from(body));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_openai_shape() {
        let error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "tunnel_unavailable",
            "no \"tunnel\"",
        );
        let value: serde_json::Value = serde_json::from_slice(&error.body()).expect("json");
        assert_eq!(value["error"]["message"], "no \"tunnel\"");
        assert_eq!(value["error"]["type"], ERROR_TYPE);
        assert_eq!(value["error"]["code"], "tunnel_unavailable");
        let response: http::Response<Bytes> = error.into_response();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
}
