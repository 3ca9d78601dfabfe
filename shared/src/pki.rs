//! The private PKI: a CA, the relay's certificate and per-client
//! certificates, made with rcgen and stored as PEM files in one directory.
//!
//! Layout of a PKI directory (`passage-relay init --dir DIR`):
//!
//! ```text
//! DIR/ca.crt  DIR/ca.key            the CA (key 0600)
//! DIR/relay.crt  DIR/relay.key      the relay's server certificate (key 0600)
//! DIR/clients/NAME.toml             one bundle per issued client (0600)
//! DIR/issued/, DIR/revoked.toml     issued and revoked certificates (see `revocation`)
//! ```
//!
//! Private keys and bundles are created with mode 0600 and never overwritten.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use crate::bundle::Bundle;
pub use crate::private_file::{PrivateRead, read_private_text};

/// Hosts the relay certificate names when `init` is given none.
pub const DEFAULT_RELAY_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Days a CA certificate is valid.
const CA_DAYS: i64 = 3650;
/// Days the relay certificate is valid.
pub const RELAY_DAYS: i64 = 1825;
/// Days a client certificate is valid unless `issue` is told otherwise.
pub const DEFAULT_CLIENT_DAYS: i64 = 730;
/// Backdating of `not_before`, so a client whose clock is a little behind still connects.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// What can go wrong making or reading the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file that must not be overwritten already exists.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A private key file is readable by others.
    #[error(
        "{} is readable by group or others (mode {mode:o}); it holds a private key: run chmod 600 on it",
        path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A certificate or key could not be made or parsed.
    #[error("{context}: {message}")]
    Crypto {
        /// What was being done.
        context: String,
        /// The underlying error.
        message: String,
    },
    /// A client name or host name was refused.
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        /// Which kind of name.
        what: &'static str,
        /// The offending value.
        value: String,
        /// Why it is refused.
        why: &'static str,
    },
}

fn crypto(context: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let context = context.into();
    move |e| PkiError::Crypto {
        context,
        message: e.to_string(),
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The relay's TLS identity, loaded from a PKI directory.
pub struct RelayIdentity {
    /// The CA certificate client certificates must chain to.
    pub ca: CertificateDer<'static>,
    /// The relay certificate chain (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    /// The relay private key.
    pub key: PrivateKeyDer<'static>,
}

/// A PKI directory made by `passage-relay init`.
#[derive(Debug, Clone)]
pub struct PkiDir {
    root: PathBuf,
}

impl PkiDir {
    /// Names a PKI directory (nothing is read yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PkiDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the CA certificate.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.root.join("ca.crt")
    }

    /// Path of the CA private key.
    pub fn ca_key_path(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    /// Path of the relay certificate.
    pub fn relay_cert_path(&self) -> PathBuf {
        self.root.join("relay.crt")
    }

    /// Path of the relay private key.
    pub fn relay_key_path(&self) -> PathBuf {
        self.root.join("relay.key")
    }

    /// Default path of a client's bundle.
    pub fn bundle_path(&self, name: &str) -> PathBuf {
        self.root.join("clients").join(format!("{name}.toml"))
    }

    /// Makes the CA and the relay certificate for `hosts`; refuses to
    /// overwrite an existing CA.
    pub fn init(&self, hosts: &[String]) -> Result<(), PkiError> {
        for path in [self.ca_cert_path(), self.ca_key_path()] {
            if path.exists() {
                return Err(PkiError::Exists(path));
            }
        }
        let hosts: Vec<String> = if hosts.is_empty() {
            DEFAULT_RELAY_HOSTS.iter().map(|h| h.to_string()).collect()
        } else {
            hosts.to_vec()
        };
        for host in &hosts {
            validate_host(host)?;
        }
        create_private_dir(&self.root)?;

        let now = OffsetDateTime::now_utc();
        let ca_key = KeyPair::generate().map_err(crypto("generating the CA key"))?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = distinguished_name("passage CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params.not_before = now - CLOCK_SKEW;
        ca_params.not_after = now + Duration::days(CA_DAYS);
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(crypto("signing the CA certificate"))?;
        let issuer = Issuer::new(ca_params, ca_key);

        let relay_names =
            CertificateParams::new(hosts.clone()).map_err(crypto("relay certificate names"))?;
        let (relay_cert, relay_key) = sign_leaf(
            relay_names,
            "passage relay",
            ExtendedKeyUsagePurpose::ServerAuth,
            RELAY_DAYS,
            &issuer,
        )?;

        write_new_file(
            &self.ca_key_path(),
            issuer.key().serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new_file(&self.ca_cert_path(), ca_cert.pem().as_bytes(), 0o644)?;
        write_new_file(
            &self.relay_key_path(),
            relay_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new_file(&self.relay_cert_path(), relay_cert.pem().as_bytes(), 0o644)?;
        Ok(())
    }

    /// Signs a new client certificate and returns its bundle (not yet written).
    pub fn issue_client(
        &self,
        name: &str,
        relays: &[String],
        server_name: Option<&str>,
        days: i64,
    ) -> Result<Bundle, PkiError> {
        validate_client_name(name)?;
        if let Some(server_name) = server_name {
            validate_host(server_name)?;
        }
        let ca_pem = read_text(&self.ca_cert_path())?;
        let ca_key_pem = read_private(&self.ca_key_path())?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(crypto("reading the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
            .map_err(crypto("reading the CA certificate"))?;

        let (cert, key) = sign_leaf(
            CertificateParams::default(),
            name,
            ExtendedKeyUsagePurpose::ClientAuth,
            days,
            &issuer,
        )?;

        Ok(Bundle {
            name: name.to_owned(),
            relays: relays.to_vec(),
            server_name: server_name.map(str::to_owned),
            ca_cert: ca_pem,
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Replaces the relay's certificate and key with new ones from the same
    /// CA for the same names, valid `days`; the old pair is kept beside
    /// them as `relay.crt.old` and `relay.key.old`. Clients need no change:
    /// they trust the CA. The key is renamed into place before the
    /// certificate, so a relay reading between the two finds a mismatched
    /// pair, keeps its old one, and reads again.
    pub fn renew_relay(&self, days: i64) -> Result<(), PkiError> {
        let names = self.relay_names()?;
        let ca_pem = read_text(&self.ca_cert_path())?;
        let ca_key_pem = read_private(&self.ca_key_path())?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(crypto("reading the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
            .map_err(crypto("reading the CA certificate"))?;
        let params = CertificateParams::new(names).map_err(crypto("relay certificate names"))?;
        let (cert, key) = sign_leaf(
            params,
            "passage relay",
            ExtendedKeyUsagePurpose::ServerAuth,
            days,
            &issuer,
        )?;
        let (cert_path, key_path) = (self.relay_cert_path(), self.relay_key_path());
        let with_suffix = |path: &Path, suffix: &str| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        for (path, text, mode) in [
            (&key_path, key.serialize_pem(), 0o600),
            (&cert_path, cert.pem(), 0o644),
        ] {
            let fresh = with_suffix(path, ".new");
            let _ = fs::remove_file(&fresh);
            write_new_file(&fresh, text.as_bytes(), mode)?;
        }
        for path in [&key_path, &cert_path] {
            fs::copy(path, with_suffix(path, ".old")).map_err(io_at(path))?;
        }
        for path in [&key_path, &cert_path] {
            fs::rename(with_suffix(path, ".new"), path).map_err(io_at(path))?;
        }
        Ok(())
    }

    /// The DNS names and IP addresses the relay certificate is valid for.
    pub fn relay_names(&self) -> Result<Vec<String>, PkiError> {
        let der = parse_cert(
            &read_text(&self.relay_cert_path())?,
            "the relay certificate",
        )?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Crypto {
                context: "parsing the relay certificate".into(),
                message: e.to_string(),
            })?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        names.push((*dns).to_owned())
                    }
                    x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                        let ip = match bytes.len() {
                            4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*bytes)
                                .ok()
                                .map(std::net::IpAddr::from),
                            _ => None,
                        };
                        names.extend(ip.map(|ip| ip.to_string()));
                    }
                    _ => {}
                }
            }
        }
        Ok(names)
    }

    /// Loads the relay's certificate, key and the CA it trusts for clients.
    pub fn load_relay_identity(&self) -> Result<RelayIdentity, PkiError> {
        Ok(RelayIdentity {
            ca: parse_cert(&read_text(&self.ca_cert_path())?, "the CA certificate")?,
            chain: vec![parse_cert(
                &read_text(&self.relay_cert_path())?,
                "the relay certificate",
            )?],
            key: parse_key(&read_private(&self.relay_key_path())?, "the relay key")?,
        })
    }
}

/// When the DER certificate `der` expires (`None` if it cannot be read).
pub fn certificate_not_after(der: &[u8]) -> Option<OffsetDateTime> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, cert)| cert.validity().not_after.to_datetime())
}

/// A UTC time as `YYYY-MM-DD`, as expiry dates are shown.
pub fn day_of(time: OffsetDateTime) -> String {
    format!(
        "{}-{:02}-{:02}",
        time.year(),
        u8::from(time.month()),
        time.day()
    )
}

/// Parses one PEM certificate.
pub fn parse_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Crypto {
        context: format!("reading {what}"),
        message: e.to_string(),
    })
}

/// Parses one PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    // The error text of a key parser never contains key material.
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Crypto {
        context: format!("reading {what}"),
        message: e.to_string(),
    })
}

/// The common name of a certificate's subject: a client's identity.
pub fn certificate_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Writes `contents` to a file that must not exist yet, with `mode`, and
/// creates missing parent directories (mode 0700).
pub fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent)?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_owned())
            } else {
                io_at(path)(e)
            }
        })?;
    file.write_all(contents).map_err(io_at(path))?;
    file.sync_all().map_err(io_at(path))
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_at(dir))
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_at(path))
}

/// Reads a file that holds a private key, refusing one that others could
/// read too: a key that has been exposed must not be used unnoticed.
fn read_private(path: &Path) -> Result<String, PkiError> {
    match read_private_text(path) {
        Ok(text) => Ok(text),
        Err(PrivateRead::Exposed(mode)) => Err(PkiError::Exposed {
            path: path.to_owned(),
            mode,
        }),
        Err(PrivateRead::Io(source)) => Err(io_at(path)(source)),
    }
}

/// Makes a key pair and signs a leaf certificate for it: `params` brings
/// the names, the rest is common to the relay's and the clients' certificates.
fn sign_leaf(
    mut params: CertificateParams,
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
    days: i64,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
    let key = KeyPair::generate().map_err(crypto(format!("generating a key for {common_name}")))?;
    let now = OffsetDateTime::now_utc();
    params.distinguished_name = distinguished_name(common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::days(days);
    let cert = params
        .signed_by(&key, issuer)
        .map_err(crypto(format!("signing the certificate for {common_name}")))?;
    Ok((cert, key))
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "passage");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Whether `name` may name a client (what `issue` accepts).
pub fn is_valid_client_name(name: &str) -> bool {
    validate_client_name(name).is_ok()
}

/// Client names become file names and log fields: keep them plain.
fn validate_client_name(name: &str) -> Result<(), PkiError> {
    let invalid = |why| PkiError::InvalidName {
        what: "client name",
        value: name.to_owned(),
        why,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(invalid("it must be 1 to 64 characters long"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(invalid("it must not start with '.' or '-'"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "only letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(())
}

fn validate_host(host: &str) -> Result<(), PkiError> {
    if host.parse::<std::net::IpAddr>().is_ok()
        || rustls::pki_types::ServerName::try_from(host).is_ok()
    {
        Ok(())
    } else {
        Err(PkiError::InvalidName {
            what: "host",
            value: host.to_owned(),
            why: "not a DNS name or IP address",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_private_keys_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init(&[]).expect("init");
        assert_eq!(mode(&pki.ca_key_path()), 0o600);
        assert_eq!(mode(&pki.relay_key_path()), 0o600);
        let identity = pki.load_relay_identity().expect("loads");
        assert_eq!(identity.chain.len(), 1);
        assert!(matches!(pki.init(&[]), Err(PkiError::Exists(_))));
    }

    #[test]
    fn issued_client_carries_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(dir.path());
        pki.init(&["relay.example".into(), "192.0.2.7".into()])
            .expect("init");
        assert_eq!(
            pki.relay_names().expect("names"),
            ["relay.example", "192.0.2.7"]
        );
        let bundle = pki
            .issue_client("alice", &["relay.example:4433".into()], None, 30)
            .expect("issue");
        let der = parse_cert(&bundle.cert, "client").expect("cert");
        assert_eq!(certificate_common_name(&der).as_deref(), Some("alice"));
        parse_key(&bundle.key, "client key").expect("key");
    }

    #[test]
    fn bad_client_names_are_refused() {
        for name in ["", "../x", "a b", ".hidden", &"x".repeat(65)] {
            assert!(validate_client_name(name).is_err(), "{name:?}");
        }
        validate_client_name("team-laptop_1.2").expect("plain name");
    }
}
