//! A peer with a valid certificate that breaks the frame protocol: each
//! bad stream ends with an error and nothing else, while the same
//! connection's other streams and the relay carry on, on either transport.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use passage_client::{Connection, Dialer, Established};
use passage_shared::frame::{ALPN_TCP, Frame, Header, RequestHead, encode_frame, frame_reader};
use passage_shared::pki::{parse_cert, parse_key};
use passage_shared::transport::{TransportTuning, quic};
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{InProcessRelay, TestPki, free_udp_port};
use tokio::io::AsyncWriteExt;

/// A connection to the relay over `transport` as a passage client, welcomed.
async fn connect(
    relay: std::net::SocketAddr,
    bundle: &passage_shared::bundle::Bundle,
    transport: Transport,
) -> Established {
    let tls = passage_shared::tls::client_tls_config(
        parse_cert(&bundle.ca_cert, "ca").expect("ca"),
        vec![parse_cert(&bundle.cert, "cert").expect("cert")],
        parse_key(&bundle.key, "key").expect("key"),
    )
    .expect("tls");
    let mut tcp_tls = tls.clone();
    tcp_tls.alpn_protocols = vec![ALPN_TCP.to_vec()];
    let tuning = TransportTuning::default();
    let dialer = Dialer {
        server_name: "localhost".to_owned(),
        quic: quic::client_config(tls, tuning).expect("quic config"),
        tls: Arc::new(tcp_tls),
        tuning,
        endpoints: Arc::default(),
    };
    let welcomed = match transport {
        Transport::Tcp => dialer.tcp(relay).await,
        _ => dialer.quic(relay).await,
    };
    welcomed.expect("welcomed")
}

fn head(id: &str, method: &str, path: &str, has_body: bool) -> Frame {
    Frame::RequestHead(RequestHead {
        id: id.into(),
        method: method.into(),
        path_and_query: path.into(),
        headers: vec![Header {
            name: "content-type".into(),
            value: Bytes::from_static(b"application/octet-stream"),
        }],
        has_body,
    })
}

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut wire = BytesMut::new();
    for frame in frames {
        encode_frame(frame, &mut wire).expect("encodes");
    }
    wire.to_vec()
}

/// Sends `bytes` on a new stream and says how the relay ended it:
/// `reset`, `status N` (a response head), or `closed`.
async fn exchange(connection: &Connection, bytes: &[u8], finish: bool) -> String {
    let (mut send, recv) = connection.open_stream().await.expect("open a stream");
    let _ = send.write_all(bytes).await;
    if finish {
        send.finish();
    }
    let mut frames = frame_reader(recv);
    let first = tokio::time::timeout(Duration::from_secs(15), frames.next())
        .await
        .expect("the relay ends the stream in time");
    match first {
        Some(Ok(Frame::ResponseHead(head))) => format!("status {}", head.status),
        Some(Ok(other)) => format!("frame {}", other.kind()),
        Some(Err(_)) => "reset".to_owned(),
        None => "closed".to_owned(),
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_streams_end_alone(#[values(Quic, Tcp)] transport: Transport) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.head_timeout = Duration::from_secs(2);
    });
    let bundle = pki.issue("peer", &[relay.addr]);
    let established = connect(relay.addr, &bundle, transport).await;
    let connection = &established.connection;

    // A request left open the whole time on the same connection.
    let (mut long_send, long_recv) = connection.open_stream().await.expect("open");
    long_send
        .write_all(&encode(&[
            head("long", "GET", "/v1/endless", false),
            Frame::End,
        ]))
        .await
        .expect("send");
    let mut long_frames = frame_reader(long_recv);
    assert!(matches!(
        long_frames.next().await,
        Some(Ok(Frame::ResponseHead(_)))
    ));

    let mut garbage = vec![0u8; 300];
    for (i, byte) in garbage.iter_mut().enumerate() {
        *byte = (i * 131 % 251) as u8;
    }
    let mut oversized = u32::MAX.to_be_bytes().to_vec();
    oversized.extend_from_slice(b"xxxx");
    let whole = encode(&[head("cut", "GET", "/v1/models", false)]);
    let cut = whole[..whole.len() / 2].to_vec();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage", garbage, true),
        ("oversized length", oversized, false),
        (
            "a body before the head",
            encode(&[Frame::Data(Bytes::from_static(b"x")), Frame::End]),
            true,
        ),
        ("an end before the head", encode(&[Frame::End]), true),
        ("a truncated head", cut, true),
        ("a head never finished", whole[..3].to_vec(), false),
        ("a go-away from a client", encode(&[Frame::GoAway]), true),
    ];
    for (what, bytes, finish) in cases {
        let ended = exchange(connection, &bytes, finish).await;
        assert_eq!(ended, "reset", "{what}");
    }
    // Two heads: the second one breaks the body, and the request fails
    // as the sender's fault.
    let two_heads = encode(&[
        head("two", "POST", "/sink", true),
        head("again", "POST", "/sink", true),
    ]);
    let ended = exchange(connection, &two_heads, true).await;
    assert_eq!(ended, "status 400", "two heads");
    // A bad request id or target: a clear 400.
    let ended = exchange(
        connection,
        &encode(&[head("bad id!", "GET", "/v1/models", false), Frame::End]),
        true,
    )
    .await;
    assert_eq!(ended, "status 400");

    // The connection and its long stream are unharmed.
    let ended = exchange(
        connection,
        &encode(&[head("ok", "GET", "/v1/models", false), Frame::End]),
        true,
    )
    .await;
    assert_eq!(ended, "status 200");
    let more = tokio::time::timeout(Duration::from_secs(5), long_frames.next()).await;
    assert!(
        matches!(more, Ok(Some(Ok(Frame::Data(_))))),
        "the long stream still flows: {more:?}"
    );
    assert!(
        connection.close_reason().is_none(),
        "the connection is still up"
    );
}
