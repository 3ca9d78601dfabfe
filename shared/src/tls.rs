//! rustls configurations for both ends of the tunnel: TLS 1.3 only, the ring
//! provider, ALPN `passage/1`, and trust in the private CA alone.
//!
//! The relay requires a client certificate chained to its CA and not on
//! its revocation list; the client trusts only the CA from its bundle for
//! the relay (never the system roots). 0-RTT stays off on both sides: early data can be replayed, and a
//! replayed POST costs tokens.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::frame::ALPN;
use crate::revocation::Revocations;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the certificates or keys.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the CA.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: CertificateDer<'static>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    Ok(roots)
}

/// Checks a client certificate against the revocation list, then hands
/// it to the CA verifier for everything else.
#[derive(Debug)]
struct RevocationCheck {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Revocations,
}

impl ClientCertVerifier for RevocationCheck {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.revocations.is_revoked(end_entity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The relay's own certificate and key, replaceable while it serves: a
/// renewed certificate (`passage-relay renew --server`) is put in place on
/// reload, for every handshake from then on, over QUIC and TCP alike.
#[derive(Debug)]
pub struct RelayCertificate {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl RelayCertificate {
    /// The certificate `chain` (leaf first) with its `key`.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<RelayCertificate, TlsError> {
        Ok(RelayCertificate {
            current: std::sync::RwLock::new(Arc::new(certified_key(chain, key)?)),
        })
    }

    /// Serves `chain` and `key` from the next handshake on; the key must
    /// match the certificate, or the old pair stays.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let fresh = Arc::new(certified_key(chain, key)?);
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// The leaf certificate served now.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .cert
            .first()
            .cloned()
    }
}

impl rustls::server::ResolvesServerCert for RelayCertificate {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// A certificate chain and its key as rustls signs with them, checked to
/// belong together.
fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider())?;
    certified.keys_match()?;
    Ok(certified)
}

/// The relay's TLS config: its own certificate (replaceable, see
/// [`RelayCertificate`]), and client certificates required, verified
/// against `ca`, and refused when in `revocations`.
pub fn relay_tls_config(
    ca: CertificateDer<'static>,
    certificate: Arc<RelayCertificate>,
    revocations: Revocations,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone())
        .build()?;
    let verifier = Arc::new(RevocationCheck { inner, revocations });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    // No session resumption: a resumed handshake reuses the earlier client
    // certificate without asking the verifier, so a revoked client could
    // come back. Reconnects are rare; a full handshake costs little.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A TLS config that trusts only `ca` and presents no certificate: for a
/// relay's `doctor` to tell whether the relay of this PKI serves a port
/// (the relay then refuses it, after its own certificate was checked).
pub fn anonymous_probe_config(
    ca: CertificateDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The client's TLS config: trusts only `ca`, presents its own certificate.
pub fn client_tls_config(
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}
