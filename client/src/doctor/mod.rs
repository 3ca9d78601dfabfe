//! `passage-client doctor`: checks each hop from this machine to the
//! upstream in order (bundle, name, relay, QUIC, TCP, certificate,
//! upstream, then the path's round trip, loss and throughput) and says
//! which one fails.
//!
//! It dials the relays itself, beside any `run` on the same bundle, and
//! asks the relay through the tunnel with requests marked for it (see
//! `passage_shared::doctor`); nothing it does is billed upstream.
//!
//! This module assembles the report; [`dial`] makes the handshakes,
//! [`hop_checks`] reads them, [`question`] asks the relay and
//! [`question_checks`] reads its answers.

mod dial;
mod hop_checks;
mod question;
mod question_checks;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use passage_shared::bundle::Bundle;
use passage_shared::cert_expiry::CertificateExpiry;
use passage_shared::doctor::{Check, Report, Verdict};
use passage_shared::pki::parse_cert;
use passage_shared::transport::{TransportKind, TransportTuning};

use crate::connect::{Dialer, Endpoints, TransportChoice};
use crate::tunnel::RelayTarget;
use dial::{Dial, dial};
use hop_checks::{certificate_check, relay_check, transport_check};
use question_checks::{path_checks, upstream_check};

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

/// The hint for a certificate that must be replaced.
const REISSUE: &str = "issue a new bundle with `passage-relay renew --name NAME` on the relay";

/// The client certificate's expiry, as the bundle holds it.
fn client_certificate_expiry(bundle: &Bundle) -> Result<CertificateExpiry, String> {
    let der = parse_cert(&bundle.cert, "the client certificate")
        .map_err(|e| passage_shared::error_chain(&e))?;
    CertificateExpiry::of(&der).ok_or_else(|| "the client certificate cannot be read".to_owned())
}

/// The checks of one relay, hop by hop in order: name, relay, transports,
/// certificate, then the upstream and the path over one connection.
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
