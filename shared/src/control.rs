//! The relay's control messages to a client (the welcome, then perhaps a
//! go-away), with their writer and reader side by side as a codec pairs
//! encode and decode: over QUIC each message on a unidirectional stream
//! of its own, over TCP on the client's control stream.

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio_util::codec::FramedRead;

use crate::frame::{
    Frame, FrameCodec, FrameError, Welcome, encode_frame, frame_reader, frame_writer,
};
use crate::transport::tcp::{ControlStream, H2Recv, H2Send, ServerConnection};

/// A message on the control channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// The client certificate was accepted, under this name.
    Welcome(Welcome),
    /// The relay is shutting down: open no new streams on this connection.
    GoAway,
}

impl From<ControlMessage> for Frame {
    fn from(message: ControlMessage) -> Frame {
        match message {
            ControlMessage::Welcome(welcome) => Frame::Welcome(welcome),
            ControlMessage::GoAway => Frame::GoAway,
        }
    }
}

/// Why a control message could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The stream for the message could not be opened, written or
    /// finished (the connection is gone).
    #[error("{0}")]
    Stream(String),
    /// The bytes were not a frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A control stream ended before its message.
    #[error("the relay closed a control stream early")]
    ClosedEarly,
    /// A frame that is not a control message arrived on the control channel.
    #[error("the relay sent a {0} frame on the control channel")]
    Unexpected(&'static str),
}

/// Sends `message` on a QUIC stream of its own (relay side).
pub async fn send_quic(
    connection: &quinn::Connection,
    message: ControlMessage,
) -> Result<(), ControlError> {
    let stream = connection
        .open_uni()
        .await
        .map_err(|e| ControlError::Stream(e.to_string()))?;
    let mut writer = frame_writer(stream);
    writer.send(Frame::from(message)).await?;
    writer
        .get_mut()
        .finish()
        .map_err(|e| ControlError::Stream(e.to_string()))
}

/// Sends `message` on the client's control stream of a TCP connection
/// (relay side).
pub fn send_tcp(
    connection: &mut ServerConnection,
    message: ControlMessage,
) -> Result<(), ControlError> {
    let mut encoded = BytesMut::new();
    encode_frame(&Frame::from(message), &mut encoded)?;
    connection
        .send_control(encoded.freeze())
        .map_err(|e| ControlError::Stream(e.to_string()))
}

/// The client's end of the control channel: where the relay's messages
/// arrive.
pub enum ControlReader {
    /// QUIC: each message on a unidirectional stream of its own.
    Quic(quinn::Connection),
    /// TCP: the control stream.
    Tcp {
        /// The relay's control frames.
        frames: FramedRead<H2Recv, FrameCodec>,
        /// The client's side of the control stream, open while the
        /// connection lives (resetting it tells the relay the client left).
        send: H2Send,
    },
}

impl ControlReader {
    /// Reads the relay's messages on a TCP connection's control stream.
    pub fn tcp(stream: ControlStream) -> Self {
        ControlReader::Tcp {
            frames: frame_reader(stream.recv),
            send: stream.send,
        }
    }

    /// The relay's next control message; `None` once the connection ends.
    pub async fn next(&mut self) -> Option<Result<ControlMessage, ControlError>> {
        let frame = match self {
            ControlReader::Quic(connection) => {
                let stream = connection.accept_uni().await.ok()?;
                match frame_reader(stream).next().await {
                    Some(frame) => frame.map_err(ControlError::from),
                    None => Err(ControlError::ClosedEarly),
                }
            }
            ControlReader::Tcp { frames, .. } => frames.next().await?.map_err(ControlError::from),
        };
        Some(frame.and_then(|frame| match frame {
            Frame::Welcome(welcome) => Ok(ControlMessage::Welcome(welcome)),
            Frame::GoAway => Ok(ControlMessage::GoAway),
            other => Err(ControlError::Unexpected(other.kind())),
        }))
    }

    /// Resolves when the relay announces its shutdown; never if the
    /// connection ends first.
    pub async fn go_away(&mut self) {
        while let Some(message) = self.next().await {
            if let Ok(ControlMessage::GoAway) = message {
                return;
            }
        }
        std::future::pending().await
    }
}
