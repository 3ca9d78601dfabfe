//! The frame codec on arbitrary bytes: decoding must never panic, must not
//! depend on how the bytes arrive (whole, split in two, byte by byte), and
//! every decoded frame must re-encode to bytes that decode to the same frame.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use passage_fuzz::{decode_stream, split_point};
use passage_shared::frame::{FrameCodec, MAX_FRAME_LEN, encode_frame};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let whole = decode_stream(&[data]);

    let (a, b) = data.split_at(split_point(data));
    let split = decode_stream(&[a, b]);
    assert_eq!(whole, split, "split at {} decodes differently", a.len());

    // Byte by byte is the extreme case of the same property; keep it to
    // inputs small enough that it stays cheap.
    if data.len() <= 4096 {
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        let trickled = decode_stream(&bytes);
        assert_eq!(whole, trickled, "byte-by-byte feed decodes differently");
    }

    for frame in &whole.frames {
        let mut wire = BytesMut::new();
        encode_frame(frame, &mut wire).expect("a decoded frame re-encodes");
        assert!(wire.len() - 4 <= MAX_FRAME_LEN);
        let again = FrameCodec
            .decode(&mut wire)
            .expect("a re-encoded frame decodes")
            .expect("a re-encoded frame is complete");
        assert_eq!(&again, frame, "frame changed in a round trip");
        assert!(wire.is_empty(), "bytes left after a re-encoded frame");
    }
});
