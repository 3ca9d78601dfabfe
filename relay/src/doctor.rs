//! `passage-relay doctor`: checks what `serve` with the same flags needs,
//! in order (the PKI and the relay's certificate, the revocation list, the
//! listen sockets, the API keys, the upstream and the keys' verdict, the
//! state backend) and says which one fails. It can run beside a serving
//! relay: a port in use by the relay of the same PKI passes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use passage_shared::cert_expiry::{CertificateExpiry, RENEW_WITHIN_DAYS};
use passage_shared::doctor::{Check, Report};
use passage_shared::frame::ALPN_TCP;
use passage_shared::pki::{PkiDir, day_of};
use passage_shared::tls::anonymous_probe_config;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::state::Backend;
use crate::upstream::UpstreamClient;
use crate::{RelayConfig, TcpListen};

/// Longest wait for each probe of a port.
const PROBE_WAIT: Duration = Duration::from_secs(3);
/// Longest the upstream check waits for each answer.
const UPSTREAM_WAIT: Duration = Duration::from_secs(10);

/// Checks everything `serve` with `config` needs.
pub async fn examine(config: &RelayConfig) -> Report {
    let mut checks = Vec::new();
    let pki = PkiDir::new(&config.pki_dir);
    let ca = match pki_checks(&pki, &mut checks) {
        Some(ca) => ca,
        None => return Report::new(checks),
    };
    checks.push(match pki.revoked_fingerprints() {
        Ok(revoked) => Check::ok(
            "revocations",
            format!("{} certificates revoked", revoked.len()),
        ),
        Err(e) => Check::fail(
            "revocations",
            passage_shared::error_chain(&e),
            "fix or remove the revocation list (revoked.toml) in the PKI directory",
        ),
    });
    let tcp = match config.listen_tcp {
        TcpListen::Off => Check::skip(
            "tcp",
            "--no-tcp: clients whose networks block UDP cannot connect",
        ),
        TcpListen::SamePort => tcp_check(config.listen, &ca).await,
        TcpListen::At(addr) => tcp_check(addr, &ca).await,
    };
    // A relay of this PKI on the TCP side of the same port holds its UDP
    // side too.
    let relay_serving = config.listen_tcp == TcpListen::SamePort && tcp.detail.contains(SERVED);
    checks.push(udp_check(config.listen, relay_serving));
    checks.push(tcp);
    if let Some(addr) = config.metrics {
        checks.push(metrics_check(addr).await);
    }
    checks.push(if config.api_keys.is_empty() {
        Check::ok(
            "keys",
            "none: apps' own Authorization goes upstream (--api-key-env holds a key on the relay)",
        )
    } else {
        Check::ok(
            "keys",
            format!("{} from the environment", config.api_keys.len()),
        )
    });
    checks.push(
        match UpstreamClient::new(
            config.upstream.clone(),
            &config.api_keys,
            config.connect_timeout,
            config.upstream_http2,
            config.upstream_streams_per_connection,
        ) {
            Ok(upstream) => crate::upstream_check::check_upstream(&upstream, UPSTREAM_WAIT)
                .await
                .check(),
            Err(e) => Check::fail(
                "upstream",
                passage_shared::error_chain(&e),
                "fix --upstream or the key",
            ),
        },
    );
    checks.push(state_check(config).await);
    Report::new(checks)
}

/// The CA and the relay's certificate and key; the CA when they load.
fn pki_checks(pki: &PkiDir, checks: &mut Vec<Check>) -> Option<CertificateDer<'static>> {
    let identity = match pki.load_relay_identity() {
        Ok(identity) => identity,
        Err(e) => {
            checks.push(Check::fail(
                "pki",
                passage_shared::error_chain(&e),
                "--pki names the directory `passage-relay init` made; the service must be able to read it",
            ));
            return None;
        }
    };
    let names = pki.relay_names().unwrap_or_default().join(", ");
    checks.push(Check::ok(
        "pki",
        format!("{} (relay certificate for {names})", pki.root().display()),
    ));
    let leaf = identity
        .chain
        .first()
        .map(|c| c.as_ref())
        .unwrap_or_default();
    checks.push(expiry_check(
        "certificate",
        "the relay's certificate",
        leaf,
        "renew it with `passage-relay renew --server`, then SIGHUP the relay (clients need no change)",
    ));
    checks.push(expiry_check(
        "ca",
        "the CA certificate",
        identity.ca.as_ref(),
        "a new CA means new bundles for every client: plan it (`passage-relay init` in a new directory)",
    ));
    Some(identity.ca)
}

/// A certificate's validity as a check.
pub fn expiry_check(name: &str, what: &str, der: &[u8], hint: &str) -> Check {
    let Some(expiry) = CertificateExpiry::of(der) else {
        return Check::fail(name, format!("{what} cannot be read"), hint);
    };
    let detail = format!("{what} is {}", expiry.describe());
    if expiry.expired() {
        Check::fail(
            name,
            format!("{what} expired on {}", day_of(expiry.not_after())),
            hint,
        )
    } else if expiry.days_left() < RENEW_WITHIN_DAYS {
        Check::warn(name, detail, hint)
    } else {
        Check::ok(name, detail)
    }
}

/// The address to reach a listener bound to `addr` from this machine.
fn local_address(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// How the tcp check words a port the relay of this PKI serves.
const SERVED: &str = "served by a relay with this PKI";

fn udp_check(addr: SocketAddr, relay_serving: bool) -> Check {
    match std::net::UdpSocket::bind(addr) {
        Ok(_) => Check::ok("udp", format!("{addr} is free for QUIC")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && relay_serving => {
            Check::ok("udp", format!("{addr} is {SERVED} (running now)"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Check::warn(
            "udp",
            format!("{addr} is in use"),
            "`serve` cannot start beside another process on this port",
        ),
        Err(e) => Check::fail(
            "udp",
            format!("cannot bind {addr}: {e}"),
            "pick another --listen, or let the service bind it (ports below 1024 need CAP_NET_BIND_SERVICE)",
        ),
    }
}

async fn tcp_check(addr: SocketAddr, ca: &CertificateDer<'static>) -> Check {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => return Check::ok("tcp", format!("{addr} is free for TLS over TCP")),
        Err(e) if e.kind() != std::io::ErrorKind::AddrInUse => {
            return Check::fail(
                "tcp",
                format!("cannot bind {addr}: {e}"),
                "pick another --listen-tcp, or let the service bind it (ports below 1024 need CAP_NET_BIND_SERVICE)",
            );
        }
        Err(_) => {}
    }
    match serves_this_pki(local_address(addr), ca).await {
        Ok(true) => Check::ok("tcp", format!("{addr} is {SERVED} (running now)")),
        Ok(false) => Check::fail(
            "tcp",
            format!("{addr} is in use by something that is not a relay of this PKI"),
            "stop it, or give the relay another port (--listen, --listen-tcp)",
        ),
        Err(why) => Check::fail(
            "tcp",
            format!("{addr} is in use, and its server did not answer TLS: {why}"),
            "stop it, or give the relay another port (--listen, --listen-tcp)",
        ),
    }
}

/// Whether the TLS server at `addr` presents a certificate from `ca`: a
/// handshake without a client certificate, which the relay refuses only
/// after this end has checked its certificate.
async fn serves_this_pki(addr: SocketAddr, ca: &CertificateDer<'static>) -> Result<bool, String> {
    let config = anonymous_probe_config(ca.clone(), ALPN_TCP).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(
            connector
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await,
        )
    };
    let handshake = tokio::time::timeout(PROBE_WAIT, attempt)
        .await
        .map_err(|_| "no answer".to_owned())??;
    let Err(error) = handshake else {
        return Ok(true);
    };
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        // This end judged the certificate: issuer or signature not the CA's.
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        )) => Ok(false),
        // Any other verdict (a name the certificate lacks, the relay's
        // refusal of an anonymous client) came from a certificate of the CA.
        Some(_) => Ok(true),
        None => Err(error.to_string()),
    }
}

async fn metrics_check(addr: SocketAddr) -> Check {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Check::ok(
            "metrics",
            format!("{addr} is free for /metrics and /healthz"),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Check::warn(
            "metrics",
            format!("{addr} is in use (by this relay if it is serving)"),
            "`serve` cannot start beside another process on this port",
        ),
        Err(e) => Check::fail(
            "metrics",
            format!("cannot bind {addr}: {e}"),
            "pick another --metrics address",
        ),
    }
}

async fn state_check(config: &RelayConfig) -> Check {
    match &config.state.backend {
        Backend::Redis { .. } if !config.state.ledger && config.state.cache_bytes == 0 => {
            Check::skip("state", "nothing kept")
        }
        Backend::Redis { url } => match crate::state::redis::ping(url, UPSTREAM_WAIT).await {
            Ok(took) => Check::ok(
                "state",
                format!(
                    "Redis answered PING in {:.1} ms",
                    took.as_secs_f64() * 1000.0
                ),
            ),
            Err(why) => Check::fail(
                "state",
                format!("Redis: {why}"),
                match config.state.fail {
                    crate::state::FailMode::Open => {
                        "check the --state URL, the Redis server and its firewall; meanwhile the relay serves under its own limits (--state-fail open)"
                    }
                    crate::state::FailMode::Closed => {
                        "check the --state URL, the Redis server and its firewall; meanwhile the relay refuses limited clients (--state-fail closed)"
                    }
                },
            ),
        },
        Backend::Embedded { .. } if !config.state.ledger => {
            Check::ok("state", "in memory; no usage ledger (--no-ledger)")
        }
        Backend::Embedded { data_dir, required } => {
            let probe = data_dir.join(format!(".doctor-{}", std::process::id()));
            let writable = std::fs::write(&probe, b"").and_then(|()| std::fs::remove_file(&probe));
            let ledger = data_dir.join(crate::ledger::LEDGER_FILE);
            match writable {
                Ok(()) => Check::ok(
                    "state",
                    format!("in memory; usage ledger {}", ledger.display()),
                ),
                Err(e) if *required => Check::fail(
                    "state",
                    format!("cannot write to --data-dir {}: {e}", data_dir.display()),
                    "make the directory writable by the relay's user (StateDirectory= under systemd)",
                ),
                Err(e) => Check::warn(
                    "state",
                    format!(
                        "cannot write to {} ({e}): the relay runs without a usage ledger",
                        data_dir.display()
                    ),
                    "give --data-dir a writable directory to keep the ledger",
                ),
            }
        }
    }
}
