//! The relay's body scanners on arbitrary bodies: the multipart model
//! scanner, the JSON model lookup, the content-type classifier and the usage
//! tap must never panic, and the multipart scanner and usage tap must give
//! the same answer whether a body arrives whole or in chunks.
//!
//! Input layout: byte 0 says how many of the next bytes (0..=8) are the
//! boundary (non-alphanumerics dropped; empty means "XY"); the two bytes
//! after them seed the chunk sizes; the rest is the body.

#![no_main]

use bytes::Bytes;
use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use passage_relay::{BodyKind, MultipartError, MultipartScanner, UsageTap, json_model};

/// Cuts `len` bytes into chunk ranges whose sizes come from `seed`: a max
/// chunk of 1 to 128 bytes, sizes 0..=max from a xorshift stream.
fn chunks(len: usize, seed: u16) -> Vec<(usize, usize)> {
    let max = 1usize << (seed & 7);
    let mut state = u32::from(seed >> 3) | 0x9e37_0000;
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = (state as usize % (max + 1)).min(len - at);
        out.push((at, at + size));
        at += size;
    }
    out
}

/// Feeds `parts` to a scanner, stopping at the first error as the relay does.
fn scan(boundary: &str, parts: &[&[u8]]) -> (Result<(), MultipartError>, Option<String>) {
    let mut scanner = MultipartScanner::new(boundary);
    let mut result = Ok(());
    for part in parts {
        result = scanner.feed(part);
        if result.is_err() {
            break;
        }
    }
    (result, scanner.model().map(str::to_owned))
}

fn tap(content_type: &str, body: &Bytes, ranges: &[(usize, usize)]) {
    let mut whole = UsageTap::for_response(StatusCode::OK, Some(content_type));
    whole.observe(body);
    let mut chunked = UsageTap::for_response(StatusCode::OK, Some(content_type));
    for &(start, end) in ranges {
        chunked.observe(&body.slice(start..end));
    }
    let _ = chunked.estimate(body.len() as u64, body.len() as u64);
    let (a, b) = (whole.finish(), chunked.finish());
    assert_eq!(a, b, "{content_type} usage depends on chunking");
    if let Some(usage) = a {
        let _ = usage.total();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 9).min(rest.len());
    let (raw_boundary, rest) = rest.split_at(n);
    let mut boundary: String = raw_boundary
        .iter()
        .filter(|b| b.is_ascii_alphanumeric())
        .map(|&b| char::from(b))
        .collect();
    if boundary.is_empty() {
        boundary.push_str("XY");
    }
    let (seed, body) = match rest {
        [a, b, body @ ..] => (u16::from_le_bytes([*a, *b]), body),
        _ => (0, rest),
    };
    let ranges = chunks(body.len(), seed);
    let parts: Vec<&[u8]> = ranges.iter().map(|&(s, e)| &body[s..e]).collect();

    let one = scan(&boundary, &[body]);
    let many = scan(&boundary, &parts);
    // regressions/body_scanners-long-headers-chunking*.bin: the part-header
    // limit once bit only when a header block spanned chunks.
    assert!(
        one == many,
        "multipart scan depends on chunking (boundary {boundary:?}, chunks {:?}): \
         whole {one:?}, chunked {many:?}",
        parts.iter().map(|p| p.len()).collect::<Vec<_>>()
    );

    if let Some(model) = json_model(body) {
        let _ = model.len();
    }

    let text = String::from_utf8_lossy(body);
    match BodyKind::of(Some(&text)) {
        BodyKind::Multipart(found) => {
            assert!(!found.is_empty() && found.len() <= 70, "boundary {found:?}");
            let _ = scan(&found, &parts);
        }
        BodyKind::Json | BodyKind::BadMultipart | BodyKind::Other => {}
    }

    let body = Bytes::copy_from_slice(body);
    tap("text/event-stream", &body, &ranges);
    tap("application/json", &body, &ranges);
});
