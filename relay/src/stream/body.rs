//! The request body sent upstream, after its checks. Two paths: a client
//! free to use any model gets its body streamed straight on (a JSON body's
//! start copied as it passes, to name its model in the usage line); a
//! client under a model rule has the start of its body held back and read
//! until its model is known and allowed, under [`PREFIX_BUDGET`].

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Either;
use passage_shared::error_body::ApiError;
use passage_shared::frame::{FrameCodec, RequestHead};
use passage_shared::transport::BoxRecv;
use tokio_util::codec::FramedRead;

use crate::body_prefix::{PREFIX_BUDGET, read_prefix, reservation};
use crate::request_body::{BodyRefusal, RequestBody, too_large};
use crate::request_model::{BodyKind, MultipartScanner, json_model};
use crate::upstream::UpstreamBody;

use super::Request;
use super::head::{content_type, content_type_count, declared_length};

/// Most body bytes of an unrestricted client's JSON request kept (as it
/// streams past, never held back) to name its model in the usage line.
const ACCOUNTING_SCAN_LIMIT: usize = 64 * 1024;

/// A copy of a JSON body, kept as it streams past while the body is small
/// enough to name its model afterwards.
#[derive(Debug, Default)]
pub(super) struct JsonCopy {
    /// The body's bytes so far, while they are at most the scan limit.
    pub(super) bytes: Vec<u8>,
    /// How many bytes have passed.
    pub(super) len: usize,
}

/// The upstream body of a request that has one, after the body checks:
/// size, and for a model-restricted client the model, read from a prefix
/// held back under [`PREFIX_BUDGET`] until it has gone upstream.
pub(super) async fn request_body(
    req: &mut Request<'_>,
    head: &RequestHead,
    frames: FramedRead<BoxRecv, FrameCodec>,
) -> Result<UpstreamBody, ApiError> {
    let declared = declared_length(head);
    if let Some(length) = declared
        && length > req.ctx.max_body
    {
        return Err(too_large(req.ctx.max_body));
    }
    if content_type_count(head) > 1 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_content_type",
            "the request has more than one Content-Type header",
        ));
    }
    let kind = BodyKind::of(content_type(head));
    if !req.applied.restricts_models() {
        return Ok(plain_body(req, kind, frames));
    }
    model_checked_body(req, kind, declared, frames).await
}

/// The body of a client free to use any model: nothing is held back; a
/// JSON body's chunks are kept as they pass, only to name its model in the
/// usage line.
fn plain_body(
    req: &mut Request<'_>,
    kind: BodyKind,
    frames: FramedRead<BoxRecv, FrameCodec>,
) -> UpstreamBody {
    let mut body = RequestBody::new(frames)
        .counting(req.record.bytes_in.clone())
        .limited(req.ctx.max_body);
    if kind == BodyKind::Json {
        let copy = Arc::new(std::sync::Mutex::new(JsonCopy::default()));
        req.record.json_copy = Some(copy.clone());
        body = body.inspect(Box::new(move |chunk: &Bytes| {
            let mut copy = copy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            copy.len += chunk.len();
            if copy.len <= ACCOUNTING_SCAN_LIMIT {
                copy.bytes.extend_from_slice(chunk);
            } else {
                copy.bytes = Vec::new();
            }
            Ok(())
        }));
    }
    Either::Right(body.reporting(req.record.body_refusal.clone()))
}

/// The body of a client under a model rule: its start is held back (a
/// reservation of the relay's budget) and read until the model is known,
/// the model checked, and the rest of a form watched for a second one.
async fn model_checked_body(
    req: &mut Request<'_>,
    kind: BodyKind,
    declared: Option<u64>,
    mut frames: FramedRead<BoxRecv, FrameCodec>,
) -> Result<UpstreamBody, ApiError> {
    let (ctx, client) = (req.ctx, req.client);
    let mut scanner = model_scanner(req, &kind)?;
    let scan_limit = ctx.model_scan_limit.min(PREFIX_BUDGET / 4);
    // Reserve what the body says it needs, not the whole scan limit, so
    // small requests do not crowd each other out.
    let Some(limit) = reservation(declared, kind == BodyKind::Json, scan_limit) else {
        return Err(json_too_large(client, scan_limit));
    };
    let held = ctx
        .prefix_budget
        .reserve(client, limit, ctx.head_timeout)
        .await?;
    let prefix = read_prefix(
        &mut frames,
        limit,
        ctx.head_timeout,
        |chunk| match &mut scanner {
            Some(scanner) => {
                scanner.feed(chunk).map_err(|error| {
                    BodyRefusal::Model {
                        client: client.clone(),
                        error,
                    }
                    .api_error()
                })?;
                Ok(scanner.model().is_some())
            }
            None => Ok(false),
        },
    )
    .await?;
    check_prefix_length(
        prefix.bytes.len() as u64,
        declared,
        prefix.ended,
        ctx.max_body,
    )?;
    req.record.model = match &scanner {
        Some(scanner) => scanner.model().map(str::to_owned),
        None if prefix.ended => json_model(&prefix.bytes),
        None => return Err(json_too_large(client, scan_limit)),
    };
    req.applied
        .check_model(client, req.record.model.as_deref())?;
    let ended = prefix.ended;
    let mut body = RequestBody::resume(frames, prefix.into_chunks(), ended)
        .hold_until_prefix_sent(Box::new(held))
        .counting(req.record.bytes_in.clone())
        .limited(ctx.max_body);
    if let Some(mut scanner) = scanner {
        // The rest of the form streams on, watched for a second `model`.
        let client = client.clone();
        body = body.inspect(Box::new(move |chunk: &Bytes| {
            scanner.feed(chunk).map_err(|error| BodyRefusal::Model {
                client: client.clone(),
                error,
            })
        }));
    }
    Ok(Either::Right(
        body.reporting(req.record.body_refusal.clone()),
    ))
}

/// What finds the model in a body of this kind: a multipart scanner for a
/// form, none for JSON (the whole prefix is parsed); other kinds name no
/// model and are refused.
fn model_scanner(req: &Request<'_>, kind: &BodyKind) -> Result<Option<MultipartScanner>, ApiError> {
    match kind {
        BodyKind::Json => Ok(None),
        BodyKind::Multipart(boundary) => Ok(Some(MultipartScanner::new(boundary))),
        BodyKind::BadMultipart => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_content_type",
            "a multipart body needs exactly one boundary and the form-data type",
        )),
        BodyKind::Other => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "model_not_allowed",
            format!(
                "client '{}' may only use the models of rule {}.allow_models, and a body that is neither JSON nor a multipart form names no model",
                req.client, req.applied.source
            ),
        )),
    }
}

/// The 413 for a JSON body too large to find its model in.
fn json_too_large(client: &str, scan_limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "model_check_body_too_large",
        format!(
            "client '{client}' is under a model rule, and this JSON body is larger than the {} KiB the relay reads to find its model (--model-scan-limit-kib)",
            scan_limit / 1024
        ),
    )
}

/// Checks a held-back prefix of `read` bytes against the body limit and
/// the declared length (all of it, if the body `ended` within it).
fn check_prefix_length(
    read: u64,
    declared: Option<u64>,
    ended: bool,
    max_body: u64,
) -> Result<(), ApiError> {
    if read > max_body {
        return Err(too_large(max_body));
    }
    if let Some(length) = declared
        && (read > length || (ended && read < length))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "request_body_failed",
            format!("the request body has {read} bytes, its Content-Length says {length}"),
        ));
    }
    Ok(())
}
