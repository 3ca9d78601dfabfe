//! Questions to the relay itself, over the tunnel, on requests marked for it
//! (see `passage_shared::doctor`); nothing they do is billed upstream.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use passage_shared::doctor::{DOCTOR_HEADER, DOCTOR_MAX_DOWNLOAD};
use passage_shared::frame::{Frame, Header, RequestHead, frame_reader, frame_writer};

use crate::connect::Connection;

/// The relay's answer to one question.
#[derive(Debug)]
pub(super) struct Answer {
    /// The answer's HTTP status.
    pub(super) status: u16,
    /// The start of its body, at most the `keep` bytes asked for.
    pub(super) body: Vec<u8>,
    /// Body bytes that arrived in all.
    pub(super) bytes: u64,
    /// The time to the response head or, when reading for a set time, the
    /// time spent reading the body.
    pub(super) took: Duration,
}

/// A question to the relay itself on a new stream: its status and body
/// (at most `keep` bytes of it), and the time to the response head.
pub(super) async fn ask(
    connection: &Connection,
    question: &str,
    upload: Option<Duration>,
    keep: usize,
    read_for: Option<Duration>,
) -> Result<Answer, String> {
    let (send, recv) = connection.open_stream().await?;
    let mut writer = frame_writer(send);
    let mut frames = frame_reader(recv);
    let started = Instant::now();
    let head = RequestHead {
        id: format!("doctor-{}", started.elapsed().as_nanos()),
        method: if upload.is_some() { "POST" } else { "GET" }.to_owned(),
        path_and_query: "/".to_owned(),
        headers: vec![Header {
            name: DOCTOR_HEADER.to_owned(),
            value: Bytes::from(question.to_owned()),
        }],
        has_body: upload.is_some(),
    };
    writer
        .send(Frame::RequestHead(head))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(for_how_long) = upload {
        let piece = Bytes::from(vec![0u8; 64 * 1024]);
        let until = Instant::now() + for_how_long;
        let mut sent = 0u64;
        while Instant::now() < until && sent < DOCTOR_MAX_DOWNLOAD {
            writer
                .send(Frame::Data(piece.clone()))
                .await
                .map_err(|e| e.to_string())?;
            sent += piece.len() as u64;
        }
    }
    writer.send(Frame::End).await.map_err(|e| e.to_string())?;
    let status = match frames.next().await {
        Some(Ok(Frame::ResponseHead(head))) => head.status,
        Some(Ok(frame)) => return Err(format!("the relay answered with a {} frame", frame.kind())),
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("the relay closed the stream unanswered".to_owned()),
    };
    let head_after = started.elapsed();
    let body_started = Instant::now();
    let mut body = Vec::new();
    let mut bytes = 0u64;
    while let Some(frame) = frames.next().await {
        match frame.map_err(|e| e.to_string())? {
            Frame::Data(data) => {
                bytes += data.len() as u64;
                if body.len() < keep {
                    body.extend_from_slice(&data[..data.len().min(keep - body.len())]);
                }
            }
            Frame::End => break,
            Frame::Failure(failure) => return Err(failure.message),
            _ => {}
        }
        if read_for.is_some_and(|limit| body_started.elapsed() >= limit) {
            // Enough for a figure: dropping the stream stops the relay.
            break;
        }
    }
    let took = if read_for.is_some() {
        body_started.elapsed()
    } else {
        head_after
    };
    Ok(Answer {
        status,
        body,
        bytes,
        took,
    })
}
