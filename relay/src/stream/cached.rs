//! The cache path: whether a request uses the answer cache, reading its
//! (small) body whole to key it, answering a hit from the cache, and
//! sending a miss upstream marked to be kept.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use http::StatusCode;
use http_body_util::{Either, Empty};
use passage_shared::error_body::ApiError;
use passage_shared::frame::{Frame, FrameCodec, Header, RequestHead, ResponseHead};
use passage_shared::transport::BoxRecv;
use tokio_util::codec::FramedRead;

use crate::answer_cache::{CACHE_HEADER, CacheKey, CachedAnswer, MAX_CACHED_BODY};
use crate::body_prefix::{Reservation, read_prefix};
use crate::policy::{Applied, CacheUse};
use crate::request_body::RequestBody;
use crate::request_model::{BodyKind, json_model};

use super::head::{content_type, content_type_count, declared_length};
use super::response::proxy;
use super::{Outcome, Request, Responder, StreamContext};

/// Where and for how long a request's answer is cached.
#[derive(Debug)]
pub(super) struct CachePlan {
    scope: String,
    ttl: Duration,
    max_entry: usize,
}

/// A cache miss's key and limits, until the answer's head is known.
#[derive(Debug)]
pub(super) struct CachePending {
    /// Where the answer is kept.
    pub(super) key: CacheKey,
    /// How long it is kept.
    pub(super) ttl: Duration,
    /// Largest answer kept, in bytes.
    pub(super) max_entry: usize,
}

/// Whether this request uses the cache, by the client's rules and its
/// `x-passage-cache` header (which never goes upstream): a repeatable
/// endpoint, and a JSON body of a declared length under the limit.
pub(super) fn cache_plan(
    head: &mut RequestHead,
    path: &str,
    applied: &Applied,
    client: &str,
    max_body: u64,
) -> Option<CachePlan> {
    let asked = head
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(CACHE_HEADER))
        .map(|h| h.value.to_ascii_lowercase());
    if asked.is_some() {
        head.headers
            .retain(|h| !h.name.eq_ignore_ascii_case(CACHE_HEADER));
    }
    let rules = &applied.rules;
    let wanted = match rules.cache_use() {
        CacheUse::Off => false,
        CacheUse::Default => asked.as_deref() != Some(b"skip".as_slice()),
        CacheUse::OptIn => asked.as_deref() == Some(b"use".as_slice()),
    };
    if !wanted || !crate::answer_cache::cacheable(&head.method, path) {
        return None;
    }
    if head.has_body {
        // Anything request_body would refuse or stream goes its way.
        let small = declared_length(head)
            .is_some_and(|length| length <= MAX_CACHED_BODY && length <= max_body);
        if !small
            || content_type_count(head) != 1
            || BodyKind::of(content_type(head)) != BodyKind::Json
        {
            return None;
        }
    }
    Some(CachePlan {
        scope: rules
            .cache_scope
            .clone()
            .unwrap_or_else(|| client.to_owned()),
        ttl: rules
            .cache_ttl_seconds
            .map_or(crate::answer_cache::DEFAULT_TTL, |s| {
                Duration::from_secs(u64::from(s.get()))
            }),
        max_entry: rules
            .cache_max_entry_kib
            .map_or(crate::answer_cache::DEFAULT_MAX_ENTRY, |kib| {
                kib.get() as usize * 1024
            }),
    })
}

/// A request that uses the cache: its whole body is read (it is small),
/// then the answer comes from the cache, or from the upstream and is kept.
pub(super) async fn serve_cacheable(
    mut req: Request<'_>,
    head: RequestHead,
    plan: CachePlan,
    mut frames: FramedRead<BoxRecv, FrameCodec>,
) -> Outcome {
    let (body, held) = if head.has_body {
        match whole_body(req.ctx, req.client, &head, &mut frames).await {
            Ok((body, held)) => (body, Some(held)),
            Err(error) => return req.refuse(error),
        }
    } else {
        (Bytes::new(), None)
    };
    let (ctx, client) = (req.ctx, req.client);
    req.record
        .bytes_in
        .store(body.len() as u64, Ordering::Relaxed);
    if !body.is_empty() {
        req.record.model = json_model(&body);
    }
    if req.applied.restricts_models()
        && let Err(error) = req.applied.check_model(client, req.record.model.as_deref())
    {
        return req.refuse(error);
    }
    let key = crate::answer_cache::key(
        &plan.scope,
        &head.method,
        &head.path_and_query,
        &head.headers,
        !ctx.upstream.replaces_authorization(),
        &body,
    );
    if let Some(answer) = ctx.state.cache_get(&key).await {
        let record = &mut *req.record;
        record.cache_hit = true;
        record.status = answer.status;
        record.ttfb = Some(req.started.elapsed());
        record.bytes_out = answer.pieces.iter().map(|p| p.len() as u64).sum();
        // Its slot is free before the app has the answer, as on every path.
        record.charge().await;
        return replay(req.responder, &answer).await;
    }
    req.record.cache_plan = Some(CachePending {
        key,
        ttl: plan.ttl,
        max_entry: plan.max_entry,
    });
    let upstream_body = if head.has_body {
        let mut resumed = RequestBody::resume(frames, vec![body], true);
        if let Some(held) = held {
            resumed = resumed.hold_until_prefix_sent(Box::new(held));
        }
        Either::Right(resumed)
    } else {
        Either::Left(Empty::<Bytes>::new())
    };
    proxy(&mut req, head, upstream_body).await
}

/// Reads a cacheable request's whole body (`cache_plan` saw a declared
/// length of at most 1 MiB) under a reservation of the relay's budget.
async fn whole_body(
    ctx: &StreamContext,
    client: &Arc<str>,
    head: &RequestHead,
    frames: &mut FramedRead<BoxRecv, FrameCodec>,
) -> Result<(Bytes, Reservation), ApiError> {
    let length = declared_length(head).unwrap_or(0) as usize;
    let held = ctx
        .prefix_budget
        .reserve(client, length, ctx.head_timeout)
        .await?;
    let prefix = read_prefix(frames, length, ctx.head_timeout, |_| Ok(false)).await?;
    if !prefix.ended || prefix.bytes.len() != length {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "request_body_failed",
            format!("the request body does not match its Content-Length ({length} bytes)"),
        ));
    }
    Ok((prefix.bytes.freeze(), held))
}

/// Sends a cached answer: its head (marked a hit), each piece as a frame
/// (an SSE event each, as they first came), and the end.
async fn replay(responder: &mut Responder, answer: &CachedAnswer) -> Outcome {
    let mut headers = answer.headers.clone();
    let sse = headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-type") && h.value.starts_with(b"text/event-stream")
    });
    if !sse {
        let length: usize = answer.pieces.iter().map(Bytes::len).sum();
        headers.push(Header {
            name: "content-length".into(),
            value: Bytes::from(length.to_string()),
        });
    }
    headers.push(Header {
        name: CACHE_HEADER.into(),
        value: Bytes::from_static(b"hit"),
    });
    let head = Frame::ResponseHead(ResponseHead {
        status: answer.status,
        headers,
    });
    let pieces = answer
        .pieces
        .iter()
        .filter(|piece| !piece.is_empty())
        .map(|piece| Frame::Data(piece.clone()));
    for frame in std::iter::once(head).chain(pieces).chain([Frame::End]) {
        if responder.feed(frame).await.is_err() {
            return Outcome::ClientGone;
        }
    }
    match responder.flush().await {
        Ok(()) => Outcome::Complete,
        Err(_) => Outcome::ClientGone,
    }
}
