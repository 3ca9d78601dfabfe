//! Writes seed inputs for the fuzz targets into corpus/TARGET/.
//!
//! Run from fuzz/: `cargo run --release --example make_seeds`.

use std::fs;
use std::path::Path;

use bytes::{BufMut, Bytes, BytesMut};
use passage_shared::frame::{
    Frame, Header, RequestHead, ResponseHead, StreamFailure, Welcome, encode_frame,
};

fn header(name: &str, value: &[u8]) -> Header {
    Header {
        name: name.into(),
        value: Bytes::copy_from_slice(value),
    }
}

fn request(id: &str, method: &str, target: &str, headers: Vec<Header>) -> Frame {
    Frame::RequestHead(RequestHead {
        id: id.into(),
        method: method.into(),
        path_and_query: target.into(),
        headers,
        has_body: true,
    })
}

fn wire(frames: &[Frame]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for frame in frames {
        encode_frame(frame, &mut buf).expect("encodes");
    }
    buf.to_vec()
}

fn payload(frame: &Frame) -> Vec<u8> {
    wire(std::slice::from_ref(frame))[4..].to_vec()
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    let chat = request(
        "7f3a-01",
        "POST",
        "/v1/chat/completions?x=1",
        vec![
            header("content-type", b"application/json"),
            header("authorization", b"Bearer sk-app"),
            header("host", b"127.0.0.1:8080"),
            header("x-raw", &[0xff, 0x00, 0x80]),
        ],
    );
    let all_kinds = [
        chat.clone(),
        Frame::ResponseHead(ResponseHead {
            status: 429,
            headers: vec![header("retry-after", b"7")],
        }),
        Frame::Data(Bytes::from_static(b"{\"model\":\"gpt-4o\"}")),
        Frame::Data(Bytes::new()),
        Frame::End,
        Frame::Failure(StreamFailure {
            code: "upstream_body_failed".into(),
            message: "connection reset".into(),
        }),
        Frame::Welcome(Welcome {
            client: "alice".into(),
        }),
        Frame::GoAway,
    ];

    // frame_decode: every kind alone, all in one stream, a cut stream,
    // an oversized prefix, trailing payload bytes.
    for (i, frame) in all_kinds.iter().enumerate() {
        write(
            "frame_decode",
            &format!("kind-{i}"),
            &wire(&[frame.clone()]),
        );
    }
    let stream = wire(&all_kinds);
    write("frame_decode", "all-kinds", &stream);
    write("frame_decode", "cut", &stream[..stream.len() - 3]);
    let mut big = BytesMut::new();
    big.put_u32(u32::MAX);
    big.put_slice(b"abc");
    write("frame_decode", "too-large", &big);
    let mut trailing = BytesMut::from(&wire(&[Frame::End])[..]);
    trailing.put_u8(0);
    let len = (trailing.len() - 4) as u32;
    trailing[..4].copy_from_slice(&len.to_be_bytes());
    write("frame_decode", "trailing", &trailing);

    // relay_head: heads the relay must take, refuse or clean up, each both
    // as a framed stream and as a bare payload.
    let heads = [
        ("chat", chat.clone()),
        (
            "models-get",
            request("a", "GET", "/v1/models?limit=2", vec![]),
        ),
        (
            "hop-by-hop",
            request(
                "b",
                "POST",
                "/v1/audio/transcriptions",
                vec![
                    header("connection", b"keep-alive, x-private"),
                    header("keep-alive", b"timeout=5"),
                    header("transfer-encoding", b"chunked"),
                    header("te", b"trailers"),
                    header("x-private", b"hop"),
                    header("content-type", b"multipart/form-data; boundary=XY"),
                ],
            ),
        ),
        ("dot-segment", request("c", "POST", "/v1/%2e%2E/x", vec![])),
        (
            "absolute",
            request("d", "POST", "http://evil.example/x", vec![]),
        ),
        ("root", request("e", "GET", "/", vec![])),
        (
            "bad-header",
            request("f", "POST", "/v1/x", vec![header("bad name", b"x")]),
        ),
        (
            "bad-value",
            request("g", "POST", "/v1/x", vec![header("x-ok", b"line\nbreak")]),
        ),
        ("bad-id", request("not ok!", "POST", "/v1/x", vec![])),
        ("bad-method", request("h", "PO ST", "/v1/x", vec![])),
        (
            "custom-method",
            request("i", "PROPFIND", "/v1/x?a=b#f", vec![]),
        ),
    ];
    for (name, frame) in &heads {
        write(
            "relay_head",
            &format!("{name}-framed"),
            &wire(&[frame.clone(), Frame::End]),
        );
        write("relay_head", &format!("{name}-payload"), &payload(frame));
    }

    // body_scanners: [boundary length][boundary][2 chunk-seed bytes][body]
    let scanner_seed = |boundary: &str, seed: u16, body: &[u8]| {
        let mut input = vec![boundary.len() as u8];
        input.extend_from_slice(boundary.as_bytes());
        input.extend_from_slice(&seed.to_le_bytes());
        input.extend_from_slice(body);
        input
    };
    let multipart = "--XY\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\0\0\0\0WAVE\r\n--XY--\r\n";
    write(
        "body_scanners",
        "multipart",
        &scanner_seed("XY", 0x1234, multipart.as_bytes()),
    );
    write(
        "body_scanners",
        "multipart-default",
        &scanner_seed("", 3, multipart.as_bytes()),
    );
    let second = "--b0undary\r\nContent-Disposition: form-data; name=model\r\n\r\na\r\n--b0undary\r\ncontent-disposition: form-data; NAME*=utf-8''Model\r\n\r\nb\r\n--b0undary--";
    write(
        "body_scanners",
        "multipart-second",
        &scanner_seed("b0undary", 0xbeef, second.as_bytes()),
    );
    let unquoted = "preamble\r\n--Q\r\nContent-Disposition: form-data; name=modelx\r\n\r\nv\r\n--Q\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-mini-transcribe\r\n--Q--";
    write(
        "body_scanners",
        "multipart-preamble",
        &scanner_seed("Q", 0x0007, unquoted.as_bytes()),
    );
    write(
        "body_scanners",
        "json-model",
        &scanner_seed("", 0x00ff, br#"{"messages":[{"role":"user","model":"inner"}],"model":"gpt-\u0034o","stream":true}"#),
    );
    write(
        "body_scanners",
        "json-usage",
        &scanner_seed("", 0x0102, br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#),
    );
    write(
        "body_scanners",
        "json-responses-usage",
        &scanner_seed(
            "",
            0x0305,
            br#"{"response":{"usage":{"input_tokens":5,"output_tokens":7}},"usage":null}"#,
        ),
    );
    let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
               data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n\
               event: response.completed\n\
               data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"total_tokens\":10}}}\n\n\
               data: [DONE]\n\n";
    write(
        "body_scanners",
        "sse-usage",
        &scanner_seed("", 0x0a0b, sse.as_bytes()),
    );
    write(
        "body_scanners",
        "content-type-multipart",
        &scanner_seed("", 1, b"multipart/form-data; boundary=\"abc\"; charset=x"),
    );
    write(
        "body_scanners",
        "content-type-json",
        &scanner_seed("", 2, b"application/vnd.api+json; charset=utf-8"),
    );
}
