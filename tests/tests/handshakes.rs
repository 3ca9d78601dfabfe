//! Handshakes the relay must refuse, counted by reason, while it goes on
//! serving legitimate clients; a client that refuses an impostor relay;
//! and garbage on the relay's UDP port.
//!
//! The refused peers are raw clients (quinn, or rustls and h2 over TCP)
//! with the certificates a test chooses, so each case fails for exactly one
//! reason. Every case runs over both transports.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use passage_shared::bundle::Bundle;
use passage_shared::frame::{ALPN, ALPN_TCP, Frame, frame_reader};
use passage_shared::pki::{PkiDir, parse_cert, parse_key};
use passage_shared::transport::{TransportTuning, tcp};
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{InProcessRelay, LocalClient, TestPki, free_udp_port, sample, scrape};
use passage_tests::stack::body_json;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const WAIT: Duration = Duration::from_secs(10);

/// What a raw client presents and expects.
struct Attempt {
    /// Certificate chain and key, or none at all.
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    /// The CA the client trusts for the relay.
    ca: CertificateDer<'static>,
    /// The protocol it asks for (default: the transport's own).
    alpn: Option<Vec<u8>>,
}

impl Attempt {
    fn from_bundle(bundle: &Bundle) -> Attempt {
        Attempt {
            identity: Some((
                vec![parse_cert(&bundle.cert, "cert").expect("cert")],
                parse_key(&bundle.key, "key").expect("key"),
            )),
            ca: parse_cert(&bundle.ca_cert, "ca").expect("ca"),
            alpn: None,
        }
    }

    /// Connects to `relay`; Ok(name) if the relay welcomed it, else why not.
    async fn run(self, relay: SocketAddr, transport: Transport) -> Result<String, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca).map_err(|e| e.to_string())?;
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut tls = match self.identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?,
            None => builder.with_no_client_auth(),
        };
        let tcp = transport == Transport::Tcp;
        let default_alpn = if tcp { ALPN_TCP } else { ALPN };
        tls.alpn_protocols = vec![self.alpn.unwrap_or_else(|| default_alpn.to_vec())];
        if tcp {
            return tcp_welcome(relay, tls).await;
        }
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal"))
            .map_err(|e| e.to_string())?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let connecting = endpoint
            .connect(relay, "localhost")
            .map_err(|e| e.to_string())?;
        let connection = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        // In TLS 1.3 the relay judges the client's certificate after the
        // client thinks it is done: only the welcome proves acceptance.
        let welcome = tokio::time::timeout(Duration::from_secs(3), async {
            let uni = connection.accept_uni().await.map_err(|e| e.to_string())?;
            match frame_reader(uni).next().await {
                Some(Ok(Frame::Welcome(welcome))) => Ok(welcome.client),
                other => Err(format!("no welcome: {other:?}")),
            }
        })
        .await
        .map_err(|_| "no welcome in time".to_owned())?;
        connection.close(0u32.into(), b"done");
        welcome
    }
}

/// A raw TLS-over-TCP handshake with `tls`, then the relay's welcome on
/// the control stream: Ok(name) if it came, else why not.
async fn tcp_welcome(relay: SocketAddr, tls: rustls::ClientConfig) -> Result<String, String> {
    let connect = tcp::ClientConnection::connect(
        relay,
        "localhost",
        Arc::new(tls),
        TransportTuning::default(),
    );
    let (connection, control) = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let welcome = tokio::time::timeout(Duration::from_secs(3), frame_reader(control.recv).next())
        .await
        .map_err(|_| "no welcome in time".to_owned())?;
    connection.close("done");
    match welcome {
        Some(Ok(Frame::Welcome(welcome))) => Ok(welcome.client),
        other => Err(format!("no welcome: {other:?}")),
    }
}

/// Sends `count` random messages to the relay's port: datagrams over QUIC,
/// short-lived connections with random bytes over TCP.
async fn send_garbage(target: SocketAddr, transport: Transport, count: u32) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    for i in 0..count {
        let len = (next() % 1400) as usize + 1;
        let mut message: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if transport == Transport::Tcp {
            if i % 3 == 0 {
                // Looks like a TLS handshake record: goes further into the parser.
                message[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
            }
            if let Ok(mut stream) = tokio::net::TcpStream::connect(target).await {
                use tokio::io::AsyncWriteExt;
                let _ = stream.write_all(&message).await;
            }
            continue;
        }
        if i % 3 == 0 {
            // Looks like a QUIC long header: goes further into the parser.
            message[0] = 0xc0 | (message[0] & 0x0f);
        }
        let _ = socket.send_to(&message, target).await;
        if i % 200 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

/// The relay's handshake failures for `reason` so far.
async fn failures(metrics: SocketAddr, reason: &str) -> f64 {
    let text = scrape(metrics).await;
    sample(
        &text,
        &format!("passage_relay_handshake_failures_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_are_refused_counted_and_harmless(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.metrics = Some("127.0.0.1:0".parse().expect("literal"));
    });
    let metrics = relay.metrics.expect("metrics on");
    let good = pki.issue("good", &[relay.addr]);
    assert_eq!(
        Attempt::from_bundle(&good).run(relay.addr, transport).await,
        Ok("good".to_owned()),
        "a passage client is welcomed"
    );
    let ca = parse_cert(&good.ca_cert, "ca").expect("ca");

    // No certificate at all.
    let none = Attempt {
        identity: None,
        ca: ca.clone(),
        alpn: None,
    };
    assert!(none.run(relay.addr, transport).await.is_err());

    // A certificate from another CA (the client trusts the relay's).
    let stranger = TestPki::new().issue("stranger", &[relay.addr]);
    let mut other_ca = Attempt::from_bundle(&stranger);
    other_ca.ca = ca.clone();
    assert!(other_ca.run(relay.addr, transport).await.is_err());

    // An expired certificate from the right CA.
    let expired = PkiDir::new(pki.path())
        .issue_client("expired", &[relay.addr.to_string()], Some("localhost"), -2)
        .expect("issue an expired certificate");
    assert!(
        Attempt::from_bundle(&expired)
            .run(relay.addr, transport)
            .await
            .is_err()
    );

    // The relay's own certificate (made for servers) presented by a
    // client: right CA, but not a client certificate.
    let dir = PkiDir::new(pki.path());
    let relay_cert = std::fs::read_to_string(pki.path().join("relay.crt")).expect("relay.crt");
    let relay_key = std::fs::read_to_string(pki.path().join("relay.key")).expect("relay.key");
    let impersonator = Attempt {
        identity: Some((
            vec![parse_cert(&relay_cert, "cert").expect("cert")],
            parse_key(&relay_key, "key").expect("key"),
        )),
        ca: ca.clone(),
        alpn: None,
    };
    assert!(impersonator.run(relay.addr, transport).await.is_err());

    // A good certificate asking for another protocol.
    let mut wrong_alpn = Attempt::from_bundle(&good);
    wrong_alpn.alpn = Some(b"h3".to_vec());
    assert!(wrong_alpn.run(relay.addr, transport).await.is_err());

    // A revoked certificate.
    let revoked = pki.issue("revoked", &[relay.addr]);
    dir.revoke("revoked").expect("revoke");
    relay.reload();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        Attempt::from_bundle(&revoked)
            .run(relay.addr, transport)
            .await
            .is_err()
    );

    for reason in [
        "no_certificate",
        "expired_certificate",
        "wrong_alpn",
        "revoked",
    ] {
        assert!(
            failures(metrics, reason).await >= 1.0,
            "{reason} not counted"
        );
    }
    let foreign = failures(metrics, "bad_signature").await + failures(metrics, "unknown_ca").await;
    assert!(foreign >= 1.0, "the foreign certificate was not counted");
    let text = scrape(metrics).await;
    let total: f64 = text
        .lines()
        .filter(|line| line.starts_with("passage_relay_handshake_failures_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(total >= 6.0, "six refusals counted: {text}");

    // And the relay still serves.
    assert_eq!(
        Attempt::from_bundle(&good).run(relay.addr, transport).await,
        Ok("good".to_owned())
    );
    let client = LocalClient::start_over(good, transport, |_| {}).await;
    client.wait_for_relay(relay.addr, WAIT).await;
    assert_eq!(
        client.get("/v1/models").await.expect("answer").status(),
        200
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_refuses_an_impostor_relay(#[values(Quic, Tcp)] transport: Transport) {
    let genuine = TestPki::new();
    let impostor_pki = TestPki::new();
    let impostor_upstream = MockUpstream::start().await.expect("mock upstream");
    let impostor = InProcessRelay::start(
        &impostor_pki,
        free_udp_port(),
        &impostor_upstream.url(),
        |_| {},
    );
    // A genuine bundle, pointed at the impostor's address.
    let client = LocalClient::start_over(
        genuine.issue("app", &[impostor.addr]),
        transport,
        |config| {
            config.connect_wait = Duration::from_millis(1500);
        },
    )
    .await;
    let response = client.get("/v1/models").await.expect("answer");
    assert_eq!(response.status(), 503);
    let body = body_json(response).await;
    assert_eq!(body["error"]["code"], "tunnel_unavailable", "{body}");
    assert_eq!(
        impostor_upstream.request_count(),
        0,
        "no request reached the impostor"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_handshake_burst_do_not_stop_the_relay(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |_| {});
    let client = LocalClient::start_over(pki.issue("app", &[relay.addr]), transport, |_| {}).await;
    client.wait_for_relay(relay.addr, WAIT).await;
    let ca = parse_cert(&pki.issue("probe", &[relay.addr]).ca_cert, "ca").expect("ca");

    let target = relay.addr;
    let garbage_count = if transport == Transport::Tcp {
        500
    } else {
        5000
    };
    let garbage = tokio::spawn(send_garbage(target, transport, garbage_count));
    let burst: Vec<_> = (0..100)
        .map(|_| {
            let attempt = Attempt {
                identity: None,
                ca: ca.clone(),
                alpn: None,
            };
            tokio::spawn(attempt.run(target, transport))
        })
        .collect();
    for _ in 0..50 {
        let response = client.get("/v1/models").await.expect("answer");
        assert_eq!(
            response.status(),
            200,
            "the legitimate client is served throughout"
        );
    }
    garbage.await.expect("garbage sender");
    for attempt in burst {
        assert!(
            attempt.await.expect("task").is_err(),
            "no burst attempt was welcomed"
        );
    }
    let fresh = LocalClient::start_over(pki.issue("late", &[relay.addr]), transport, |_| {}).await;
    fresh.wait_for_relay(relay.addr, WAIT).await;
    assert_eq!(fresh.get("/v1/models").await.expect("answer").status(), 200);
}
