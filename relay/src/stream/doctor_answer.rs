//! The relay's answers to a client's `doctor`: a request head marked with
//! [`DOCTOR_HEADER`] is answered here (an echo, the upstream check, or a
//! download for a throughput figure) and never goes upstream.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::CONTENT_LENGTH;
use passage_shared::doctor::{
    DOCTOR_DOWNLOAD, DOCTOR_ECHO, DOCTOR_HEADER, DOCTOR_MAX_DOWNLOAD, DOCTOR_UPLOAD,
    DOCTOR_UPSTREAM,
};
use passage_shared::frame::{Frame, FrameCodec, FrameError, Header, RequestHead, ResponseHead};
use passage_shared::transport::BoxRecv;
use tokio_util::codec::FramedRead;

use super::{Responder, StreamContext};

/// Longest the upstream check waits for each answer.
const UPSTREAM_LIMIT: Duration = Duration::from_secs(10);
/// Size of each data frame of a download.
const PIECE: usize = 64 * 1024;

/// The doctor's question in `head`, if it carries one.
pub fn question(head: &RequestHead) -> Option<&[u8]> {
    head.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(DOCTOR_HEADER))
        .map(|h| &h.value[..])
}

/// Answers `question` on the stream: 200 with the answer, or 400 for a
/// question this relay does not know.
pub async fn answer(
    question: &[u8],
    frames: &mut FramedRead<BoxRecv, FrameCodec>,
    responder: &mut Responder,
    ctx: &StreamContext,
) -> Result<u16, FrameError> {
    let text = String::from_utf8_lossy(question);
    let mut words = text.split_ascii_whitespace();
    match (words.next(), words.next()) {
        (Some(DOCTOR_ECHO), None) => whole(responder, 200, "text/plain", Bytes::new()).await,
        (Some(DOCTOR_UPSTREAM), None) => {
            let report = crate::upstream_check::check_upstream(&ctx.upstream, UPSTREAM_LIMIT).await;
            let body = serde_json::to_vec(&report).unwrap_or_default();
            whole(responder, 200, "application/json", Bytes::from(body)).await
        }
        (Some(DOCTOR_UPLOAD), None) => {
            let mut bytes = 0u64;
            while let Some(frame) = frames.next().await {
                match frame? {
                    Frame::Data(data) => bytes += data.len() as u64,
                    Frame::End => break,
                    other => {
                        return Err(FrameError::Malformed(format!(
                            "a {} frame in a doctor's upload",
                            other.kind()
                        )));
                    }
                }
            }
            whole(responder, 200, "text/plain", Bytes::from(bytes.to_string())).await
        }
        (Some(DOCTOR_DOWNLOAD), Some(bytes)) => match bytes.parse::<u64>() {
            Ok(bytes) if bytes <= DOCTOR_MAX_DOWNLOAD => download(responder, bytes).await,
            _ => unknown(responder, &text).await,
        },
        _ => unknown(responder, &text).await,
    }
}

async fn unknown(responder: &mut Responder, question: &str) -> Result<u16, FrameError> {
    let body = format!("unknown doctor question {question:?}");
    whole(responder, 400, "text/plain", Bytes::from(body)).await
}

/// `bytes` bytes of zeros in pieces, each a frame of its own.
async fn download(responder: &mut Responder, bytes: u64) -> Result<u16, FrameError> {
    responder
        .feed(Frame::ResponseHead(head(
            200,
            "application/octet-stream",
            bytes,
        )))
        .await?;
    let piece = Bytes::from(vec![0u8; PIECE]);
    let mut left = bytes;
    while left > 0 {
        let take = usize::try_from(left.min(PIECE as u64)).unwrap_or(PIECE);
        responder.send(Frame::Data(piece.slice(..take))).await?;
        left -= take as u64;
    }
    responder.send(Frame::End).await?;
    Ok(200)
}

/// A whole response: head, body and end in one write.
async fn whole(
    responder: &mut Responder,
    status: u16,
    content_type: &'static str,
    body: Bytes,
) -> Result<u16, FrameError> {
    let length = body.len() as u64;
    responder
        .feed(Frame::ResponseHead(head(status, content_type, length)))
        .await?;
    if !body.is_empty() {
        responder.feed(Frame::Data(body)).await?;
    }
    responder.send(Frame::End).await?;
    Ok(status)
}

fn head(status: u16, content_type: &'static str, length: u64) -> ResponseHead {
    ResponseHead {
        status,
        headers: vec![
            Header {
                name: "content-type".to_owned(),
                value: Bytes::from_static(content_type.as_bytes()),
            },
            Header {
                name: CONTENT_LENGTH.as_str().to_owned(),
                value: Bytes::from(length.to_string()),
            },
        ],
    }
}
