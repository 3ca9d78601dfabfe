//! The mock's uploads (a digested multipart file) and bulk transfers
//! (pattern downloads, a counting sink).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use super::streams::query_u64;
use super::{MockBody, MockRecord, bad_request, digest_body, json, pattern_bytes, sha256_hex};

pub(super) async fn upload(request: Request<Incoming>) -> Response<MockBody> {
    let boundary = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("boundary=").nth(1))
        .map(|b| b.trim_matches('"').to_owned());
    let (len, sha256, filename) = match boundary {
        // An SDK upload: digest the `file` part, as the real API stores it.
        Some(boundary) => match request.into_body().collect().await {
            Ok(body) => match multipart_file(&body.to_bytes(), &boundary) {
                Some((filename, content)) => (content.len() as u64, sha256_hex(content), filename),
                None => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"error": "no file part"}),
                    );
                }
            },
            Err(e) => {
                return bad_request(&e);
            }
        },
        // A raw upload: digest it as it streams, never holding it.
        None => match digest_body(request.into_body()).await {
            Ok((len, sha256, _)) => (len, sha256, "upload".to_owned()),
            Err(e) => {
                return bad_request(&e);
            }
        },
    };
    json(
        StatusCode::OK,
        serde_json::json!({
            "id": "file-mock",
            "object": "file",
            "bytes": len,
            "created_at": 0,
            "filename": filename,
            "purpose": "assistants",
            "status": "processed",
            "sha256": sha256,
        }),
    )
}

/// The filename and content of the part named `file` in a multipart body.
pub(super) fn multipart_file<'a>(body: &'a [u8], boundary: &str) -> Option<(String, &'a [u8])> {
    let delimiter = format!("--{boundary}");
    let mut rest = body;
    while let Some(start) = find(rest, delimiter.as_bytes()) {
        rest = &rest[start + delimiter.len()..];
        let headers_end = find(rest, b"\r\n\r\n")?;
        let headers = String::from_utf8_lossy(&rest[..headers_end]).into_owned();
        let content = &rest[headers_end + 4..];
        let content_end = find(content, format!("\r\n{delimiter}").as_bytes())?;
        if headers.contains("name=\"file\"") {
            let filename = headers
                .split("filename=\"")
                .nth(1)
                .and_then(|f| f.split('"').next())
                .unwrap_or("upload")
                .to_owned();
            return Some((filename, &content[..content_end]));
        }
        rest = &content[content_end..];
    }
    None
}

pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Streams `len` pattern bytes in 64 KiB chunks.
pub(super) struct PatternStream {
    offset: u64,
    len: u64,
    record: Arc<MockRecord>,
}

impl futures_util::Stream for PatternStream {
    type Item = Result<Frame<Bytes>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.offset >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.offset).min(64 * 1024) as usize;
        let chunk = pattern_bytes(self.offset, n);
        self.offset += n as u64;
        self.record
            .downloaded
            .fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}

pub(super) fn download(request: &Request<Incoming>, record: Arc<MockRecord>) -> Response<MockBody> {
    let len = query_u64(request, "bytes").unwrap_or(0);
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(PatternStream {
        offset: 0,
        len,
        record,
    })));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    response
}

pub(super) async fn sink(request: Request<Incoming>) -> Response<MockBody> {
    let mut body = request.into_body();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => len += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => {
                return bad_request(&e);
            }
        }
    }
    json(StatusCode::OK, serde_json::json!({"bytes": len}))
}
