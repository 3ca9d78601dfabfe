//! Property tests of the relay's body scanners (the fuzz targets in
//! `fuzz/` run the same code on arbitrary bytes for longer): the multipart
//! scanner finds the one `model` field, or refuses two, wherever the
//! upload is split into chunks; the usage tap reads a stream's usage
//! chunk however the stream is cut.

use bytes::Bytes;
use http::StatusCode;
use passage_relay::{MultipartError, MultipartScanner, Usage, UsageTap};
use proptest::prelude::*;

/// Splits `bytes` at the `cuts` (taken modulo its length).
fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    let mut out = Vec::new();
    let mut from = 0;
    for point in points {
        out.push(&bytes[from..point]);
        from = point;
    }
    out
}

fn part() -> impl Strategy<Value = (String, String)> {
    (
        prop_oneof![Just("model"), Just("file"), Just("pad"), Just("modelx")],
        "[a-zA-Z0-9 ._:-]{0,300}",
    )
        .prop_map(|(name, value)| (name.to_owned(), value))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_multipart_model_is_found_however_the_upload_is_cut(
        boundary in "[A-Za-z0-9]{1,40}",
        parts in proptest::collection::vec(part(), 0..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut body = String::new();
        for (name, value) in &parts {
            body.push_str(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            ));
        }
        body.push_str(&format!("--{boundary}--\r\n"));
        let models: Vec<&String> = parts.iter().filter(|(n, _)| n == "model").map(|(_, v)| v).collect();

        let mut scanner = MultipartScanner::new(&boundary);
        let mut outcome = Ok(());
        for piece in pieces(body.as_bytes(), &cuts) {
            outcome = scanner.feed(piece);
            if outcome.is_err() {
                break;
            }
        }
        match models.as_slice() {
            [] => {
                prop_assert_eq!(outcome, Ok(()));
                prop_assert_eq!(scanner.model(), None);
            }
            [one] => {
                prop_assert_eq!(outcome, Ok(()));
                let expected = (one.len() <= 256).then_some(one.as_str());
                prop_assert_eq!(scanner.model(), expected);
            }
            _ => prop_assert_eq!(outcome, Err(MultipartError::SecondModel)),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_scanner(
        boundary in "[A-Za-z0-9]{1,10}",
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut whole = MultipartScanner::new(&boundary);
        let whole_outcome = whole.feed(&bytes);
        let mut split = MultipartScanner::new(&boundary);
        let mut split_outcome = Ok(());
        for piece in pieces(&bytes, &cuts) {
            split_outcome = split.feed(piece);
            if split_outcome.is_err() {
                break;
            }
        }
        prop_assert_eq!(whole_outcome, split_outcome);
        prop_assert_eq!(whole.model(), split.model());
    }

    #[test]
    fn a_streams_usage_is_read_however_it_is_cut(
        events in proptest::collection::vec("[a-z ]{0,40}", 0..20),
        prompt in 0u64..100_000,
        completion in 0u64..100_000,
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let mut stream = String::new();
        for text in &events {
            stream.push_str(&format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":null}}\n\n"
            ));
        }
        stream.push_str(&format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion}}}}}\n\ndata: [DONE]\n\n"
        ));
        let mut tap = UsageTap::for_response(StatusCode::OK, Some("text/event-stream"));
        for piece in pieces(stream.as_bytes(), &cuts) {
            tap.observe(&Bytes::copy_from_slice(piece));
        }
        prop_assert_eq!(
            tap.finish(),
            Some(Usage { prompt_tokens: prompt, completion_tokens: completion })
        );
    }
}
