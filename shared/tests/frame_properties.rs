//! Property tests of the frame codec, run on stable in CI (the fuzz
//! targets in `fuzz/` explore the same ground for longer): every frame
//! survives a round trip however its bytes are split, and arbitrary bytes
//! never panic the decoder nor make it buffer past the frame limit.

use bytes::{Bytes, BytesMut};
use passage_shared::frame::{
    Frame, FrameCodec, FrameError, Header, MAX_FRAME_LEN, RequestHead, ResponseHead, StreamFailure,
    Welcome, encode_frame,
};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

fn header() -> impl Strategy<Value = Header> {
    (
        "[a-z-]{1,20}",
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(name, value)| Header {
            name,
            value: Bytes::from(value),
        })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            ".{0,40}",
            ".{0,10}",
            ".{0,200}",
            proptest::collection::vec(header(), 0..20),
            any::<bool>()
        )
            .prop_map(|(id, method, path_and_query, headers, has_body)| {
                Frame::RequestHead(RequestHead {
                    id,
                    method,
                    path_and_query,
                    headers,
                    has_body,
                })
            }),
        (any::<u16>(), proptest::collection::vec(header(), 0..20))
            .prop_map(|(status, headers)| Frame::ResponseHead(ResponseHead { status, headers })),
        proptest::collection::vec(any::<u8>(), 0..4096).prop_map(|d| Frame::Data(Bytes::from(d))),
        Just(Frame::End),
        (".{0,30}", ".{0,200}")
            .prop_map(|(code, message)| Frame::Failure(StreamFailure { code, message })),
        ".{0,64}".prop_map(|client| Frame::Welcome(Welcome { client })),
        Just(Frame::GoAway),
    ]
}

/// Decodes `bytes` fed in pieces cut at `cuts`; the frames, then the
/// first error if any.
fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> (Vec<Frame>, Option<String>) {
    let mut codec = FrameCodec;
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    let mut fed = 0;
    for point in points {
        buffer.extend_from_slice(&bytes[fed..point]);
        fed = point;
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string())),
            }
            assert!(
                buffer.capacity() <= MAX_FRAME_LEN + 4 + bytes.len(),
                "the decoder buffered past the limit"
            );
        }
    }
    (frames, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_round_trip_however_they_are_split(
        frames in proptest::collection::vec(frame(), 1..8),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let mut wire = BytesMut::new();
        for frame in &frames {
            encode_frame(frame, &mut wire).expect("encodes");
        }
        let (decoded, error) = decode_in_pieces(&wire, &cuts);
        prop_assert_eq!(error, None);
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_splitting_changes_nothing(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let whole = decode_in_pieces(&bytes, &[]);
        let split = decode_in_pieces(&bytes, &cuts);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn an_oversized_length_is_refused_before_buffering(
        len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX,
        rest in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&len.to_be_bytes());
        buffer.extend_from_slice(&rest);
        let result = FrameCodec.decode(&mut buffer);
        let too_large = matches!(result, Err(FrameError::TooLarge { .. }));
        prop_assert!(too_large, "not refused as too large: {:?}", result);
        prop_assert!(buffer.capacity() < 4096, "nothing was reserved for it");
    }

    #[test]
    fn a_valid_length_with_a_garbage_payload_is_an_error_not_a_panic(
        payload in proptest::collection::vec(any::<u8>(), 1..512),
    ) {
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buffer.extend_from_slice(&payload);
        // Either a frame (the bytes happened to be one) or an error.
        let _ = FrameCodec.decode(&mut buffer);
    }
}
