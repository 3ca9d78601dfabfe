//! What a running relay re-reads from its PKI directory: the revocation
//! list (revocations in force now, and when one set for later falls due)
//! and its own certificate and key (`renew --server`). It re-reads them on
//! SIGHUP, when the files change on disk (looked at every
//! [`LOOK_EVERY`]), and when a revocation set for later falls due.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use passage_shared::cert_expiry::CertificateExpiry;
use passage_shared::pki::{PkiDir, day_of};
use passage_shared::revocation::{Fingerprint, Revocations};
use passage_shared::tls::RelayCertificate;
use tracing::{info, warn};

/// How often the files' modification times are looked at.
pub const LOOK_EVERY: Duration = Duration::from_secs(30);

/// The relay's hold on its PKI directory.
#[derive(Debug)]
pub struct PkiWatch {
    /// The PKI directory.
    pub pki_dir: PathBuf,
    /// The set the TLS verifier checks.
    pub revocations: Revocations,
    /// Signalled to reload (SIGHUP).
    pub requested: Arc<tokio::sync::Notify>,
    /// The certificate the relay serves.
    pub certificate: Arc<RelayCertificate>,
    /// Its expiry, as `/healthz` and the metrics show it.
    pub expiry: CertificateExpiry,
    /// The files' modification times at the last read.
    seen: Mutex<Vec<Option<SystemTime>>>,
}

/// What a reload found.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// The certificates revoked now, if the list could be read.
    pub revoked: Option<HashSet<Fingerprint>>,
    /// When the next revocation set for later falls due.
    pub next_due: Option<time::OffsetDateTime>,
}

impl PkiWatch {
    /// A watch on `pki_dir`, whose files were just read into `revocations`
    /// and `certificate`.
    pub fn new(
        pki_dir: PathBuf,
        revocations: Revocations,
        certificate: Arc<RelayCertificate>,
        expiry: CertificateExpiry,
    ) -> PkiWatch {
        let watch = PkiWatch {
            pki_dir,
            revocations,
            requested: Arc::new(tokio::sync::Notify::new()),
            certificate,
            expiry,
            seen: Mutex::new(Vec::new()),
        };
        let stamps = watch.stamps();
        *watch.seen_lock() = stamps;
        watch
    }

    fn seen_lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<SystemTime>>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The modification times of the files a reload reads.
    fn stamps(&self) -> Vec<Option<SystemTime>> {
        let pki = PkiDir::new(&self.pki_dir);
        [
            pki.revocation_list_path(),
            pki.relay_cert_path(),
            pki.relay_key_path(),
        ]
        .iter()
        .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .collect()
    }

    /// Whether a file changed since the last read.
    pub fn changed_on_disk(&self) -> bool {
        self.stamps() != *self.seen_lock()
    }

    /// When the next revocation set for later falls due, as of the list on disk.
    pub fn next_due(&self) -> Option<time::OffsetDateTime> {
        PkiDir::new(&self.pki_dir)
            .next_revocation_due()
            .ok()
            .flatten()
    }

    /// Re-reads the revocation list (swapped into the verifier) and the
    /// relay's certificate (put in place if it changed). What cannot be
    /// read leaves the old in force, and is tried again at the next look.
    pub fn reload(&self) -> Reloaded {
        let stamps = self.stamps();
        let pki = PkiDir::new(&self.pki_dir);
        let mut complete = true;
        let revoked = match pki.revoked_fingerprints() {
            Ok(revoked) => {
                self.revocations.replace(revoked.clone());
                Some(revoked)
            }
            Err(e) => {
                warn!(
                    error = %passage_shared::error_chain(&e),
                    "cannot read the revocation list; the previous one stays in force"
                );
                complete = false;
                None
            }
        };
        complete &= self.reload_certificate(&pki);
        if complete {
            *self.seen_lock() = stamps;
        }
        Reloaded {
            revoked,
            next_due: self.next_due(),
        }
    }

    /// Puts a renewed relay certificate in place; whether the files could be read.
    fn reload_certificate(&self, pki: &PkiDir) -> bool {
        let identity = match pki.load_relay_identity() {
            Ok(identity) => identity,
            Err(e) => {
                warn!(
                    error = %passage_shared::error_chain(&e),
                    "cannot read the relay certificate; the previous one stays in use"
                );
                return false;
            }
        };
        let Some(leaf) = identity.chain.first().cloned() else {
            return false;
        };
        if self.certificate.leaf().as_ref() == Some(&leaf) {
            return true;
        }
        match self.certificate.replace(identity.chain, identity.key) {
            Ok(()) => {
                self.expiry.replace(&leaf);
                info!(
                    expires = %day_of(self.expiry.not_after()),
                    "relay certificate renewed: new handshakes get the new one"
                );
                true
            }
            Err(e) => {
                // A key and certificate from two renewals (caught between
                // the renames): the next look finds them matched.
                warn!(
                    error = %e,
                    "the relay certificate and key do not match; the previous pair stays in use"
                );
                false
            }
        }
    }
}
