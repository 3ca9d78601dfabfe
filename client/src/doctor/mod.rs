//! `passage-client doctor`: checks each hop from this machine to the
//! upstream in order (bundle, name, relay, QUIC, TCP, certificate,
//! upstream, then the path's round trip, loss and throughput) and says
//! which one fails.
//!
//! It dials the relays itself, beside any `run` on the same bundle, and
//! asks the relay through the tunnel with requests marked for it (see
//! `passage_shared::doctor`); nothing it does is billed upstream.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use passage_shared::bundle::Bundle;
use passage_shared::cert_expiry::{CertificateExpiry, RENEW_WITHIN_DAYS};
use passage_shared::doctor::{
    Check, DOCTOR_DOWNLOAD, DOCTOR_ECHO, DOCTOR_HEADER, DOCTOR_MAX_DOWNLOAD, DOCTOR_UPLOAD,
    DOCTOR_UPSTREAM, Report, UpstreamReport, Verdict,
};
use passage_shared::frame::{Frame, Header, RequestHead, frame_reader, frame_writer};
use passage_shared::pki::parse_cert;
use passage_shared::transport::{TransportKind, TransportTuning};

use crate::connect::{Connection, Dialer, Endpoints, Established, NO_REPLY, TransportChoice};
use crate::tunnel::RelayTarget;

/// What `doctor` was asked to check.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// Relays after the bundle's (as `run --relay`).
    pub extra_relays: Vec<String>,
    /// The transport `run` would use: a check of one it would not use
    /// only warns.
    pub choice: TransportChoice,
    /// The relays' TCP port, when not their UDP one.
    pub tcp_port: Option<u16>,
    /// Transport settings, as `run` has them.
    pub tuning: TransportTuning,
    /// Longest wait for each handshake and each answer.
    pub timeout: Duration,
    /// Longest each throughput transfer runs.
    pub transfer_time: Duration,
}

/// Checks the bundle at `path` and each relay it names.
pub async fn examine(path: &Path, options: &DoctorOptions) -> Report {
    let bundle = match Bundle::load(path) {
        Ok(bundle) => bundle,
        Err(e) => {
            return Report::new(vec![Check::fail(
                "bundle",
                format!(
                    "cannot use {}: {}",
                    path.display(),
                    passage_shared::error_chain(&e)
                ),
                "give the bundle file `passage-relay issue` wrote for this client, as it wrote it (mode 0600)",
            )]);
        }
    };
    let expiry = match client_certificate_expiry(&bundle) {
        Ok(expiry) => expiry,
        Err(why) => return Report::new(vec![Check::fail("bundle", why, REISSUE)]),
    };
    let (quic, tls) = match crate::tunnel_tls(&bundle, options.tuning) {
        Ok(configs) => configs,
        Err(e) => {
            return Report::new(vec![Check::fail(
                "bundle",
                passage_shared::error_chain(&e),
                REISSUE,
            )]);
        }
    };
    let bundle_check = Check::ok(
        "bundle",
        format!(
            "{}: client {:?}, relay {}",
            path.display(),
            bundle.name,
            bundle.relays.join(", ")
        ),
    );
    let targets = crate::relay_targets(&bundle, &options.extra_relays, options.tcp_port);
    let several = targets.len() > 1;
    let mut per_relay = Vec::new();
    for target in targets {
        let dialer = Dialer {
            server_name: target.server_name.clone(),
            quic: quic.clone(),
            tls: tls.clone(),
            tuning: options.tuning,
            endpoints: Arc::new(Mutex::new(Endpoints::default())),
        };
        let mut checks = examine_relay(&target, &dialer, &expiry, options).await;
        if several {
            for check in &mut checks {
                check.name = format!("{} ({})", check.name, target.address);
            }
        }
        per_relay.push(checks);
    }
    // With several relays, requests work while any one does: the others'
    // failures are then warnings.
    if per_relay
        .iter()
        .any(|checks| checks.iter().all(|c| c.verdict != Verdict::Fail))
    {
        for check in per_relay.iter_mut().flatten() {
            if check.verdict == Verdict::Fail {
                check.verdict = Verdict::Warn;
                check.detail.push_str(" (another relay serves)");
            }
        }
    }
    let mut checks = vec![bundle_check];
    checks.extend(per_relay.into_iter().flatten());
    Report::new(checks)
}

const REISSUE: &str = "issue a new bundle with `passage-relay renew --name NAME` on the relay";

/// The client certificate's expiry, as the bundle holds it.
fn client_certificate_expiry(bundle: &Bundle) -> Result<CertificateExpiry, String> {
    let der = parse_cert(&bundle.cert, "the client certificate")
        .map_err(|e| passage_shared::error_chain(&e))?;
    CertificateExpiry::of(&der).ok_or_else(|| "the client certificate cannot be read".to_owned())
}

/// How one handshake went.
enum Dial {
    /// The relay welcomed this client (boxed: the others are small).
    Welcomed(Box<Established>, Duration),
    /// The relay (or this end, judging the relay) refused the certificates.
    Refused(Refusal, Duration),
    /// Nothing answered in time.
    NoReply,
    /// The path failed another way (refused connection, unreachable, …).
    Failed(String),
}

impl Dial {
    fn reached_relay(&self) -> bool {
        matches!(self, Dial::Welcomed(..) | Dial::Refused(..))
    }
}

/// Why a handshake that reached the relay was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// The relay has this client's certificate on its revocation list.
    Revoked,
    /// The relay found the client certificate expired.
    Expired,
    /// The relay does not know the CA of the client certificate.
    UnknownClientCa,
    /// The relay's certificate is not from the bundle's CA, or does not
    /// name the relay.
    RelayNotTrusted(String),
    /// Refused for another reason, as given.
    Other(String),
}

/// Reads a handshake's error, as the transports word it: the relay's TLS
/// alert (TCP: rustls names it; QUIC: its crypto error code, 0x100 plus the
/// alert) or passage's own close reason, and this end's verdict on the
/// relay's certificate.
fn refusal(error: &str) -> Option<Refusal> {
    let has = |needle: &str| error.contains(needle);
    if has("CertificateRevoked") || has("error 44") || has("certificate revoked") {
        Some(Refusal::Revoked)
    } else if has("CertificateExpired") || has("error 45") {
        Some(Refusal::Expired)
    } else if has("UnknownCA") || has("error 48") || has("BadCertificate") || has("error 42") {
        Some(Refusal::UnknownClientCa)
    } else if has("invalid peer certificate") {
        Some(Refusal::RelayNotTrusted(error.to_owned()))
    } else if has("refused the connection") {
        Some(Refusal::Other(error.to_owned()))
    } else {
        None
    }
}

async fn dial(dialer: &Dialer, addr: SocketAddr, kind: TransportKind, limit: Duration) -> Dial {
    let started = Instant::now();
    let attempt = async {
        match kind {
            TransportKind::Quic => dialer.quic(addr).await,
            TransportKind::Tcp => dialer.tcp(addr).await,
        }
    };
    match tokio::time::timeout(limit, attempt).await {
        Err(_) => Dial::NoReply,
        Ok(Ok(established)) => Dial::Welcomed(Box::new(established), started.elapsed()),
        Ok(Err(error)) if error == NO_REPLY => Dial::NoReply,
        Ok(Err(error)) => match refusal(&error) {
            Some(refusal) => Dial::Refused(refusal, started.elapsed()),
            None => Dial::Failed(error),
        },
    }
}

async fn examine_relay(
    target: &RelayTarget,
    dialer: &Dialer,
    expiry: &CertificateExpiry,
    options: &DoctorOptions,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let addr = match tokio::net::lookup_host(&target.address).await {
        Ok(mut addrs) => match addrs.next() {
            Some(addr) => {
                checks.push(Check::ok(
                    "dns",
                    format!("{} is {}", target.address, addr.ip()),
                ));
                addr
            }
            None => {
                checks.push(Check::fail(
                    "dns",
                    format!("{} resolves to no address", target.address),
                    "check the relay's name in the bundle and this machine's DNS",
                ));
                return checks;
            }
        },
        Err(e) => {
            checks.push(Check::fail(
                "dns",
                format!("cannot resolve {}: {e}", target.address),
                "check the relay's name in the bundle and this machine's DNS (an IP address works too)",
            ));
            return checks;
        }
    };
    let tcp_addr = SocketAddr::new(addr.ip(), target.tcp_port.unwrap_or(addr.port()));
    // Both transports are tried whatever `run` would use: the pair tells a
    // relay that is down from a path that drops UDP.
    let (quic, tcp) = tokio::join!(
        dial(dialer, addr, TransportKind::Quic, options.timeout),
        dial(dialer, tcp_addr, TransportKind::Tcp, options.timeout),
    );
    checks.push(relay_check(addr, tcp_addr, &quic, &tcp, options.timeout));
    checks.push(transport_check("quic", &quic, &tcp, options));
    checks.push(transport_check("tcp", &tcp, &quic, options));
    checks.push(certificate_check(expiry, &quic, &tcp));
    let prefer_tcp = options.choice == TransportChoice::Tcp;
    let (first, second) = if prefer_tcp { (tcp, quic) } else { (quic, tcp) };
    let established = match (first, second) {
        (Dial::Welcomed(established, _), other) | (other, Dial::Welcomed(established, _)) => {
            if let Dial::Welcomed(spare, _) = other {
                spare.abandon();
            }
            established
        }
        _ => {
            for name in ["upstream", "rtt", "loss", "throughput"] {
                checks.push(Check::skip(name, "no connection to the relay"));
            }
            return checks;
        }
    };
    let over = established.connection.kind();
    checks.push(upstream_check(&established.connection, options.timeout).await);
    checks.extend(path_checks(&established.connection, over, options).await);
    established.leave(passage_shared::frame::close_code::ABANDONED, "doctor done");
    checks
}

fn relay_check(
    addr: SocketAddr,
    tcp_addr: SocketAddr,
    quic: &Dial,
    tcp: &Dial,
    limit: Duration,
) -> Check {
    if quic.reached_relay() || tcp.reached_relay() {
        let answered: Vec<&str> = [("QUIC", quic), ("TCP", tcp)]
            .iter()
            .filter(|(_, dial)| dial.reached_relay())
            .map(|(name, _)| *name)
            .collect();
        return Check::ok(
            "relay",
            format!("{addr} answered over {}", answered.join(" and ")),
        );
    }
    let tcp_refused = matches!(tcp, Dial::Failed(e) if e.contains("refused"));
    let detail = match (quic, tcp) {
        (Dial::NoReply, _) if tcp_refused => format!(
            "nothing answers at {addr}: no QUIC reply within {} s, TCP {tcp_addr} refused",
            limit.as_secs()
        ),
        _ => format!(
            "no answer from {addr}: QUIC {}, TCP {}",
            dial_summary(quic, limit),
            dial_summary(tcp, limit)
        ),
    };
    Check::fail(
        "relay",
        detail,
        "is passage-relay running there, and are UDP and TCP open to its port in its firewall?",
    )
}

fn dial_summary(dial: &Dial, limit: Duration) -> String {
    match dial {
        Dial::Welcomed(..) => "welcomed".to_owned(),
        Dial::Refused(..) => "refused the certificate".to_owned(),
        Dial::NoReply => format!("no reply within {} s", limit.as_secs()),
        Dial::Failed(e) => e.clone(),
    }
}

fn transport_check(name: &str, dial: &Dial, other: &Dial, options: &DoctorOptions) -> Check {
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let (used, other_name) = match name {
        "quic" => (options.choice != TransportChoice::Tcp, "TCP"),
        _ => (options.choice != TransportChoice::Quic, "QUIC"),
    };
    let problem = match dial {
        Dial::Welcomed(_, took) => {
            return Check::ok(name, format!("handshake and welcome in {:.1} ms", ms(took)));
        }
        Dial::Refused(_, took) => {
            return Check::ok(
                name,
                format!(
                    "handshake in {:.1} ms; the relay refused the certificate (see certificate)",
                    ms(took)
                ),
            );
        }
        Dial::NoReply => format!("no reply within {} s", options.timeout.as_secs()),
        Dial::Failed(e) => e.clone(),
    };
    let hint = if name == "quic" {
        "UDP is blocked or throttled on this path (or the relay's firewall drops it): `--transport auto` falls back to TLS over TCP"
    } else {
        "TCP to the relay's port is blocked, or the relay serves no TCP (--no-tcp) or serves it on another port (--tcp-port)"
    };
    let other_works = matches!(other, Dial::Welcomed(..));
    if !other.reached_relay() {
        // The relay check already failed: say what this transport saw.
        return Check::fail(name, problem, hint);
    }
    if used && !(options.choice == TransportChoice::Auto && other_works) {
        Check::fail(name, problem, hint)
    } else {
        Check::warn(
            name,
            format!("{problem}; {other_name} works"),
            if used {
                format!("{hint}; meanwhile the client uses {other_name}")
            } else {
                hint.to_owned()
            },
        )
    }
}

fn certificate_check(expiry: &CertificateExpiry, quic: &Dial, tcp: &Dial) -> Check {
    const NAME: &str = "certificate";
    if matches!(quic, Dial::Welcomed(..)) || matches!(tcp, Dial::Welcomed(..)) {
        let detail = format!("accepted by the relay; {}", expiry.describe());
        return if expiry.days_left() < RENEW_WITHIN_DAYS {
            Check::warn(NAME, detail, REISSUE)
        } else {
            Check::ok(NAME, detail)
        };
    }
    let refusal = [quic, tcp].into_iter().find_map(|dial| match dial {
        Dial::Refused(refusal, _) => Some(refusal.clone()),
        _ => None,
    });
    match refusal {
        Some(Refusal::Revoked) => Check::fail(
            NAME,
            "revoked: the relay has this client's certificate on its revocation list",
            "ask the relay's operator for a new bundle (`passage-relay renew --name NAME`)",
        ),
        Some(Refusal::Expired) => Check::fail(
            NAME,
            format!("expired: the relay refused it; {}", expiry.describe()),
            REISSUE,
        ),
        Some(Refusal::UnknownClientCa) if expiry.expired() => Check::fail(
            NAME,
            format!("refused by the relay; it expired: {}", expiry.describe()),
            REISSUE,
        ),
        Some(Refusal::UnknownClientCa) => Check::fail(
            NAME,
            "refused: the relay does not trust the CA that issued this bundle",
            "the bundle comes from another PKI directory than the relay's --pki: issue one from the relay's",
        ),
        Some(Refusal::RelayNotTrusted(why)) => Check::fail(
            NAME,
            format!("the relay's certificate is not trusted by this bundle: {why}"),
            "the relay serves a certificate from another CA, or one without this relay's name (`passage-relay init --host NAME`); a bundle from the relay's PKI directory fixes the first",
        ),
        Some(Refusal::Other(why)) => Check::fail(
            NAME,
            why,
            "see the relay's log for why it refused this client",
        ),
        None if expiry.expired() => Check::fail(
            NAME,
            format!("expired: {} (the relay was not reached)", expiry.describe()),
            REISSUE,
        ),
        None => Check::skip(NAME, "the relay was not reached"),
    }
}

/// A question to the relay itself on a new stream: its status and body
/// (at most `keep` bytes of it), and the time to the response head.
async fn ask(
    connection: &Connection,
    question: &str,
    upload: Option<Duration>,
    keep: usize,
    read_for: Option<Duration>,
) -> Result<(u16, Vec<u8>, u64, Duration), String> {
    let (send, recv) = connection.open_stream().await?;
    let mut writer = frame_writer(send);
    let mut frames = frame_reader(recv);
    let started = Instant::now();
    let head = RequestHead {
        id: format!("doctor-{}", started.elapsed().as_nanos()),
        method: if upload.is_some() { "POST" } else { "GET" }.to_owned(),
        path_and_query: "/".to_owned(),
        headers: vec![Header {
            name: DOCTOR_HEADER.to_owned(),
            value: Bytes::from(question.to_owned()),
        }],
        has_body: upload.is_some(),
    };
    writer
        .send(Frame::RequestHead(head))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(for_how_long) = upload {
        let piece = Bytes::from(vec![0u8; 64 * 1024]);
        let until = Instant::now() + for_how_long;
        let mut sent = 0u64;
        while Instant::now() < until && sent < DOCTOR_MAX_DOWNLOAD {
            writer
                .send(Frame::Data(piece.clone()))
                .await
                .map_err(|e| e.to_string())?;
            sent += piece.len() as u64;
        }
    }
    writer.send(Frame::End).await.map_err(|e| e.to_string())?;
    let status = match frames.next().await {
        Some(Ok(Frame::ResponseHead(head))) => head.status,
        Some(Ok(frame)) => return Err(format!("the relay answered with a {} frame", frame.kind())),
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("the relay closed the stream unanswered".to_owned()),
    };
    let head_after = started.elapsed();
    let body_started = Instant::now();
    let mut body = Vec::new();
    let mut bytes = 0u64;
    while let Some(frame) = frames.next().await {
        match frame.map_err(|e| e.to_string())? {
            Frame::Data(data) => {
                bytes += data.len() as u64;
                if body.len() < keep {
                    body.extend_from_slice(&data[..data.len().min(keep - body.len())]);
                }
            }
            Frame::End => break,
            Frame::Failure(failure) => return Err(failure.message),
            _ => {}
        }
        if read_for.is_some_and(|limit| body_started.elapsed() >= limit) {
            // Enough for a figure: dropping the stream stops the relay.
            break;
        }
    }
    if read_for.is_some() {
        return Ok((status, body, bytes, body_started.elapsed()));
    }
    Ok((status, body, bytes, head_after))
}

async fn upstream_check(connection: &Connection, limit: Duration) -> Check {
    // The relay waits up to 10 s per key for the upstream.
    let wait = limit.max(Duration::from_secs(25));
    let answer = tokio::time::timeout(
        wait,
        ask(connection, DOCTOR_UPSTREAM, None, 64 * 1024, None),
    )
    .await;
    match answer {
        Ok(Ok((200, body, _, _))) => match serde_json::from_slice::<UpstreamReport>(&body) {
            Ok(report) => report.check(),
            Err(e) => Check::warn(
                "upstream",
                format!("the relay's answer is unreadable: {e}"),
                "is the relay the same version as this client?",
            ),
        },
        Ok(Ok((status, _, _, _))) => Check::warn(
            "upstream",
            format!("the relay does not answer doctor questions (HTTP {status})"),
            "upgrade the relay to a passage with `doctor`",
        ),
        Ok(Err(e)) => Check::fail(
            "upstream",
            format!("the question to the relay failed: {e}"),
            "see the relay's log",
        ),
        Err(_) => Check::fail(
            "upstream",
            format!("the relay gave no answer within {} s", wait.as_secs()),
            "see the relay's log",
        ),
    }
}

/// Round trip, loss (of what this end sends) and throughput each way.
async fn path_checks(
    connection: &Connection,
    over: TransportKind,
    options: &DoctorOptions,
) -> Vec<Check> {
    let limit = options.timeout;
    let mut checks = Vec::new();
    let mut rtts = Vec::new();
    for _ in 0..5 {
        match tokio::time::timeout(limit, ask(connection, DOCTOR_ECHO, None, 0, None)).await {
            Ok(Ok((200, _, _, took))) => rtts.push(took),
            Ok(Ok((status, ..))) => {
                checks.push(Check::warn(
                    "rtt",
                    format!("the relay does not answer doctor questions (HTTP {status})"),
                    "upgrade the relay to a passage with `doctor`",
                ));
                return checks;
            }
            Ok(Err(e)) => {
                checks.push(Check::fail(
                    "rtt",
                    format!("a round trip failed: {e}"),
                    "see the relay's log",
                ));
                return checks;
            }
            Err(_) => {
                checks.push(Check::fail(
                    "rtt",
                    format!("no answer to a round trip within {} s", limit.as_secs()),
                    "the path stalls: see the loss figure with --transport tcp and quic",
                ));
                return checks;
            }
        }
    }
    rtts.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    checks.push(Check::ok(
        "rtt",
        format!(
            "{:.1} ms over {over} (median of 5 requests; least {:.1} ms; the transport's estimate {:.1} ms)",
            ms(rtts[2]),
            ms(rtts[0]),
            ms(connection.rtt())
        ),
    ));
    let before = connection.sent_and_lost();
    let upload = tokio::time::timeout(
        options.transfer_time + limit,
        ask(
            connection,
            DOCTOR_UPLOAD,
            Some(options.transfer_time),
            32,
            None,
        ),
    )
    .await;
    let after = connection.sent_and_lost();
    // The relay's count of what arrived, over the time from the head to
    // its answer (the upload stops early at the most a doctor may send).
    let up = match upload {
        Ok(Ok((200, body, _, took))) => {
            let bytes: u64 = String::from_utf8_lossy(&body).trim().parse().unwrap_or(0);
            Some((bytes, took))
        }
        _ => None,
    };
    let lost = match (before, after) {
        (Some((sent0, lost0)), Some((sent1, lost1))) if sent1 > sent0 => {
            let (sent, lost) = (sent1 - sent0, lost1.saturating_sub(lost0));
            let share = lost as f64 / sent as f64 * 100.0;
            let what = match over {
                TransportKind::Quic => "packets lost",
                TransportKind::Tcp => "segments retransmitted",
            };
            let detail = format!("{share:.1}% of {sent} {what} on the way to the relay");
            Some(if share >= 5.0 {
                Check::warn(
                    "loss",
                    detail,
                    "a lossy path: streaming may stutter; try the other transport with --transport",
                )
            } else {
                Check::ok("loss", detail)
            })
        }
        _ => None,
    };
    checks.push(lost.unwrap_or_else(|| Check::skip("loss", "the transport gave no counts")));
    let started = Instant::now();
    let download = tokio::time::timeout(
        options.transfer_time + limit,
        ask(
            connection,
            &format!("{DOCTOR_DOWNLOAD} {DOCTOR_MAX_DOWNLOAD}"),
            None,
            0,
            Some(options.transfer_time),
        ),
    )
    .await;
    let mbit = |bytes: u64, took: Duration| bytes as f64 * 8.0 / took.as_secs_f64().max(1e-6) / 1e6;
    match (download, up) {
        (Ok(Ok((200, _, bytes, took))), up) => {
            let up_text = up
                .map(|(bytes, took)| format!(", up {:.1} Mbit/s", mbit(bytes, took)))
                .unwrap_or_default();
            checks.push(Check::ok(
                "throughput",
                format!(
                    "down {:.1} Mbit/s ({} KiB in {:.1} s){up_text}",
                    mbit(bytes, took),
                    bytes / 1024,
                    started.elapsed().as_secs_f64()
                ),
            ));
        }
        (Ok(Ok((status, ..))), _) => checks.push(Check::warn(
            "throughput",
            format!("the relay refused the transfer (HTTP {status})"),
            "upgrade the relay to a passage with `doctor`",
        )),
        (Ok(Err(e)), _) => checks.push(Check::fail(
            "throughput",
            format!("the transfer failed: {e}"),
            "the path breaks under load: see the relay's log",
        )),
        (Err(_), _) => checks.push(Check::fail(
            "throughput",
            "the transfer stalled",
            "the path breaks under load",
        )),
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_read_from_both_transports_wording() {
        assert_eq!(
            refusal("the relay refused the connection: received fatal alert: CertificateRevoked"),
            Some(Refusal::Revoked)
        );
        assert_eq!(
            refusal("aborted by peer: the cryptographic handshake failed: error 45"),
            Some(Refusal::Expired)
        );
        assert_eq!(
            refusal(
                "the relay refused the connection: closed by peer: client certificate revoked (code 16)"
            ),
            Some(Refusal::Revoked)
        );
        assert!(matches!(
            refusal("TLS: invalid peer certificate: UnknownIssuer"),
            Some(Refusal::RelayNotTrusted(_))
        ));
        assert_eq!(refusal("TCP: Connection refused (os error 111)"), None);
    }
}
