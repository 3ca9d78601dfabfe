//! The upstream client's own tests: path joining, lanes, errors.

use super::*;
use http::header::{AUTHORIZATION, HOST};

/// The plain statement of [`has_dot_segment`], allocating freely.
fn dot_segment_reference(path: &str) -> bool {
    let split = path
        .to_ascii_lowercase()
        .replace("%2f", "/")
        .replace("%5c", "/")
        .replace('\\', "/");
    split.split('/').any(|segment| {
        let decoded = segment.replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

#[test]
fn dot_segments_are_found_in_every_spelling() {
    let cases = [
        ("/v1/chat/completions", false),
        ("/v1/../x", true),
        ("/v1/./x", true),
        ("/v1/x/..", true),
        ("..", true),
        ("/v1/%2e%2E/x", true),
        ("/v1/.%2e", true),
        ("/v1/chat/..%2ffiles", true),
        ("/v1/%2E.%5Cadmin", true),
        ("/v1\\..\\x", true),
        ("/v1/...", false),
        ("/v1/.x", false),
        ("/v1/model..1", false),
        ("/v1/org%2Fmodel", false),
        ("/v1/%2", false),
        ("/v1/%%2e", false),
        ("/v1/%2e%", false),
        ("", false),
        ("/", false),
    ];
    for (path, expected) in cases {
        assert_eq!(has_dot_segment(path), expected, "{path}");
        assert_eq!(dot_segment_reference(path), expected, "reference: {path}");
    }
    // Every short path over the interesting bytes agrees with the reference.
    let alphabet: &[&str] = &["/", ".", "%2e", "%2F", "%5c", "\\", "%", "2", "e", "a"];
    let mut paths = vec![String::new()];
    for _ in 0..4 {
        paths = paths
            .iter()
            .flat_map(|p| alphabet.iter().map(move |a| format!("{p}{a}")))
            .collect();
        for path in &paths {
            assert_eq!(
                has_dot_segment(path),
                dot_segment_reference(path),
                "{path:?}"
            );
        }
    }
}
use bytes::Bytes;
use passage_shared::frame::Header;

fn head(path: &str, headers: &[(&str, &str)]) -> RequestHead {
    RequestHead {
        id: "1".into(),
        method: "POST".into(),
        path_and_query: path.into(),
        headers: headers
            .iter()
            .map(|(n, v)| Header {
                name: (*n).into(),
                value: Bytes::copy_from_slice(v.as_bytes()),
            })
            .collect(),
        has_body: true,
    }
}

#[test]
fn base_urls_are_checked() {
    assert!(UpstreamBase::parse("https://api.openai.com").is_ok());
    assert!(UpstreamBase::parse("http://127.0.0.1:9000/base/").is_ok());
    for bad in [
        "ftp://x",
        "api.openai.com",
        "https://u:p@h",
        "https://h/?q=1",
        "/v1",
    ] {
        assert!(UpstreamBase::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_destination_is_always_the_configured_upstream() {
    let base = UpstreamBase::parse("https://api.openai.com/base/").expect("valid");
    let request = upstream_request(
        &base,
        None,
        head("/v1/models?limit=2", &[("host", "evil.example")]),
        (),
    )
    .expect("builds");
    assert_eq!(
        request.uri(),
        "https://api.openai.com/base/v1/models?limit=2"
    );
    assert!(request.headers().get(HOST).is_none());
    for target in [
        "http://evil.example/x",
        "evil.example:443",
        "*",
        "",
        "/../admin",
        "/v1/%2e%2E/x",
        "/v1/./x",
        "/v1/chat/..%2ffiles",
        "/v1/%2E.%5Cadmin",
    ] {
        assert!(
            upstream_request(&base, None, head(target, &[]), ()).is_err(),
            "{target}"
        );
    }
    let encoded = upstream_request(&base, None, head("/v1/models/org%2Fmodel..1", &[]), ())
        .expect("an encoded slash that makes no dot segment");
    assert_eq!(
        encoded.uri(),
        "https://api.openai.com/base/v1/models/org%2Fmodel..1"
    );
}

#[test]
fn the_relay_key_replaces_the_apps_authorization() {
    let base = UpstreamBase::parse("http://127.0.0.1:1").expect("valid");
    let relay_key = HeaderValue::from_static("Bearer relay-key");
    let app = head("/v1/x", &[("authorization", "Bearer app-key")]);
    let request = upstream_request(&base, Some(&relay_key), app.clone(), ()).expect("builds");
    let values: Vec<_> = request.headers().get_all(AUTHORIZATION).iter().collect();
    assert_eq!(values, [&relay_key]);
    let passed = upstream_request(&base, None, app, ()).expect("builds");
    assert_eq!(passed.headers()[AUTHORIZATION], "Bearer app-key");
}

#[test]
fn the_key_is_never_printed() {
    let key = ApiKey::new("sk-secret".into());
    assert!(!format!("{key:?}").contains("sk-secret"));
}
