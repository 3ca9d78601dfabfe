//! Checks read from the two handshakes: whether the relay answered at all,
//! how each transport fared, and what the relay made of the certificate.

use std::net::SocketAddr;
use std::time::Duration;

use passage_shared::cert_expiry::{CertificateExpiry, RENEW_WITHIN_DAYS};
use passage_shared::doctor::Check;

use super::dial::{Dial, Refusal};
use super::{DoctorOptions, REISSUE};
use crate::connect::TransportChoice;

/// Whether the relay answered over either transport.
pub(super) fn relay_check(
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

/// What one handshake got, in a few words.
fn dial_summary(dial: &Dial, limit: Duration) -> String {
    match dial {
        Dial::Welcomed(..) => "welcomed".to_owned(),
        Dial::Refused(..) => "refused the certificate".to_owned(),
        Dial::NoReply => format!("no reply within {} s", limit.as_secs()),
        Dial::Failed(e) => e.clone(),
    }
}

/// How one transport fared, against the transport `run` would use and
/// whether the other one works.
pub(super) fn transport_check(
    name: &str,
    dial: &Dial,
    other: &Dial,
    options: &DoctorOptions,
) -> Check {
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

/// What the relay made of the client certificate, and how long it has left.
pub(super) fn certificate_check(expiry: &CertificateExpiry, quic: &Dial, tcp: &Dial) -> Check {
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
