//! Helpers shared by the fuzz targets and the seed generator.

use bytes::BytesMut;
use passage_shared::frame::{Frame, FrameCodec};
use tokio_util::codec::Decoder;

/// What decoding a byte stream gave: the frames up to the first error, and
/// that error's text (None: the stream ended cleanly at a frame boundary).
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Frames decoded before the first error.
    pub frames: Vec<Frame>,
    /// The first error, as its `Display` text.
    pub error: Option<String>,
}

/// Decodes the stream that `parts` make up, feeding the decoder one part at
/// a time as `FramedRead` would: `decode` until `Ok(None)` after each part,
/// then `decode_eof` once the input is over. Stops at the first error.
pub fn decode_stream(parts: &[&[u8]]) -> Decoded {
    let mut codec = FrameCodec;
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for part in parts {
        buf.extend_from_slice(part);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    return Decoded {
                        frames,
                        error: Some(e.to_string()),
                    };
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => {
                return Decoded {
                    frames,
                    error: None,
                };
            }
            Err(e) => {
                return Decoded {
                    frames,
                    error: Some(e.to_string()),
                };
            }
        }
    }
}

/// A split position in `0..=data.len()` chosen by the first input byte,
/// spread over the whole input.
pub fn split_point(data: &[u8]) -> usize {
    match data.first() {
        None => 0,
        Some(&b) => (b as usize * (data.len() + 1)) / 256,
    }
}
