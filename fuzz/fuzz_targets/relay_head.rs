//! Request heads from the wire, as the relay meets them: `check_head`,
//! `upstream_request` and `extend_from_wire` must never panic, and a
//! request that is built always goes to the configured upstream, under its
//! base path, without the app's Host and with the relay's Authorization.

#![no_main]

use std::sync::OnceLock;

use http::HeaderMap;
use http::header::{AUTHORIZATION, HOST, HeaderValue};
use libfuzzer_sys::fuzz_target;
use passage_fuzz::decode_stream;
use passage_relay::check_head;
use passage_relay::upstream::{UpstreamBase, upstream_request};
use passage_shared::frame::{Frame, RequestHead, decode_payload};
use passage_shared::http_map::{MAX_HEADERS, extend_from_wire, is_hop_by_hop};

fn base() -> &'static UpstreamBase {
    static BASE: OnceLock<UpstreamBase> = OnceLock::new();
    BASE.get_or_init(|| UpstreamBase::parse("https://api.openai.com/base").expect("valid base"))
}

fn check(head: &RequestHead) {
    let mut map = HeaderMap::new();
    let extended = extend_from_wire(&mut map, head.headers.clone());
    if extended.is_ok() {
        assert!(head.headers.len() <= MAX_HEADERS);
        assert!(map.len() <= head.headers.len());
        for name in map.keys() {
            // regressions/relay_head-hop-by-hop-case*.bin: names in any case.
            assert!(!is_hop_by_hop(name.as_str()), "hop-by-hop {name} kept");
        }
    }

    if check_head(head).is_err() {
        return;
    }
    let built = upstream_request(base(), None, head.clone(), ());
    if let Ok(request) = &built {
        let uri = request.uri();
        assert_eq!(
            uri.authority().map(|a| a.as_str()),
            Some("api.openai.com"),
            "request left the upstream: {uri}"
        );
        assert_eq!(uri.scheme_str(), Some("https"));
        assert!(
            uri.path().starts_with("/base/"),
            "request left the base path: {uri}"
        );
        assert!(request.headers().get(HOST).is_none(), "app Host kept");
        assert!(extended.is_ok(), "built a request from invalid headers");
    }

    // With a relay key the app's Authorization is always replaced.
    let key = HeaderValue::from_static("Bearer relay-key");
    let keyed = upstream_request(base(), Some(&key), head.clone(), ());
    assert_eq!(built.is_ok(), keyed.is_ok());
    if let Ok(request) = keyed {
        let values: Vec<&HeaderValue> = request.headers().get_all(AUTHORIZATION).iter().collect();
        assert_eq!(values, [&key]);
    }
}

fuzz_target!(|data: &[u8]| {
    // The input as a stream of length-prefixed frames...
    for frame in decode_stream(&[data]).frames {
        if let Frame::RequestHead(head) = frame {
            check(&head);
        }
    }
    // ...and as a single frame payload without its prefix.
    if let Ok(Frame::RequestHead(head)) = decode_payload(data) {
        check(&head);
    }
});
