//! Tests of how the doctor reads handshake errors.

use super::dial::{Refusal, refusal};

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
