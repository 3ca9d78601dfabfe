//! Client certificates issued and revoked: the record `issue` keeps in the
//! PKI directory, the revocation list `revoke` appends to, and the set of
//! revoked certificates the relay checks every handshake against.
//!
//! ```text
//! DIR/issued/NAME-FINGERPRINT.crt   every client certificate issued (public)
//! DIR/revoked.toml                  [[revoked]] name, fingerprint, revoked_at
//! ```
//!
//! A certificate is named by its SHA-256 fingerprint (of its DER bytes).
//! `revoked_at` (UTC, `YYYY-MM-DDTHH:MM:SSZ`) is when the revocation takes
//! effect: `renew` sets it a grace period ahead, so the old certificate
//! keeps working while the new bundle reaches its client.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pki::{
    PkiDir, PkiError, certificate_common_name, certificate_not_after, day_of, parse_cert,
    write_new_file,
};

/// A certificate's SHA-256 fingerprint.
pub type Fingerprint = [u8; 32];

/// The fingerprint of a DER certificate.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    Sha256::digest(der).into()
}

fn hex(fingerprint: &Fingerprint) -> String {
    fingerprint.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Fingerprint> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// One issued client certificate as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The client's name (the certificate's common name).
    pub name: String,
    /// Its fingerprint, hex.
    pub fingerprint: String,
    /// Its expiry, `YYYY-MM-DD` (UTC).
    pub not_after: String,
    /// Whether it has expired.
    pub expired: bool,
    /// Whether it is revoked now.
    pub revoked: bool,
    /// When a revocation set for later takes effect, `YYYY-MM-DD HH:MM` UTC.
    pub revoked_from: Option<String>,
    /// Why the file could not be read, if it could not (the rest is empty then).
    pub problem: Option<String>,
}

/// One entry of `revoked.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoked {
    name: String,
    fingerprint: String,
    revoked_at: String,
}

/// The whole of `revoked.toml`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevocationList {
    #[serde(default)]
    revoked: Vec<Revoked>,
}

impl PkiDir {
    /// Where issued client certificates are recorded.
    pub fn issued_dir(&self) -> PathBuf {
        self.root().join("issued")
    }

    /// The revocation list.
    pub fn revocation_list_path(&self) -> PathBuf {
        self.root().join("revoked.toml")
    }

    /// Records an issued client certificate (PEM) so it can be listed and revoked.
    pub fn record_issued(&self, name: &str, cert_pem: &str) -> Result<PathBuf, PkiError> {
        let der = parse_cert(cert_pem, "the issued certificate")?;
        let short = &hex(&fingerprint(&der))[..16];
        let path = self.issued_dir().join(format!("{name}-{short}.crt"));
        write_new_file(&path, cert_pem.as_bytes(), 0o644)?;
        Ok(path)
    }

    /// Every client certificate this directory knows, sorted by name then
    /// expiry: those recorded in `issued/`, and those in bundles under
    /// `clients/` (bundles issued before certificates were recorded). A
    /// file that cannot be read is listed with its problem, not fatal.
    pub fn issued(&self) -> Result<Vec<IssuedCert>, PkiError> {
        let revoked = self.revoked_fingerprints()?;
        let pending = self.pending_revocations()?;
        let now = time::OffsetDateTime::now_utc();
        let mut seen = HashSet::new();
        let mut issued = Vec::new();
        let sources = files_with_extension(&self.issued_dir(), "crt")?
            .into_iter()
            .map(|path| (path, false))
            .chain(
                files_with_extension(&self.root().join("clients"), "toml")?
                    .into_iter()
                    .map(|path| (path, true)),
            );
        for (path, is_bundle) in sources {
            match read_certificate(&path, is_bundle) {
                Ok(der) => {
                    let print = fingerprint(&der);
                    if !seen.insert(print) {
                        continue;
                    }
                    let not_after = certificate_not_after(&der);
                    issued.push(IssuedCert {
                        name: certificate_common_name(&der).unwrap_or_else(|| "?".to_owned()),
                        fingerprint: hex(&print),
                        not_after: not_after.map_or_else(|| "?".to_owned(), day_of),
                        expired: not_after.is_some_and(|t| t < now),
                        revoked: revoked.contains(&print),
                        revoked_from: pending
                            .iter()
                            .filter(|(p, _)| *p == print)
                            .map(|(_, at)| *at)
                            .min()
                            .map(|at| {
                                format!("{} {:02}:{:02}", day_of(at), at.hour(), at.minute())
                            }),
                        problem: None,
                    });
                }
                Err(problem) => issued.push(IssuedCert {
                    name: path.display().to_string(),
                    fingerprint: String::new(),
                    not_after: String::new(),
                    expired: false,
                    revoked: false,
                    revoked_from: None,
                    problem: Some(problem),
                }),
            }
        }
        issued.sort_by(|a, b| (&a.name, &a.not_after).cmp(&(&b.name, &b.not_after)));
        Ok(issued)
    }

    /// Revokes every recorded certificate of client `name` not revoked yet;
    /// returns how many were added to the list.
    pub fn revoke(&self, name: &str) -> Result<usize, PkiError> {
        self.revoke_from(name, time::OffsetDateTime::now_utc())
    }

    /// Revokes every recorded certificate of client `name` not revoked yet
    /// as of `from` (now, or later for a grace period); returns how many
    /// were added to the list.
    pub fn revoke_from(&self, name: &str, from: time::OffsetDateTime) -> Result<usize, PkiError> {
        let issued = self.issued()?;
        if !issued.iter().any(|cert| cert.name == name) {
            return Err(PkiError::InvalidName {
                what: "client",
                value: name.to_owned(),
                why: "no certificate of that name was issued from this PKI directory",
            });
        }
        // One revoke at a time: the list is read, extended and replaced.
        let _lock = ListLock::take(&self.revocation_list_path().with_extension("toml.lock"))?;
        let mut list = self.revocation_list()?;
        let stamp = stamp(from);
        let mut added = 0;
        for cert in issued
            .iter()
            .filter(|c| c.name == name && !c.revoked && c.problem.is_none())
        {
            list.revoked.push(Revoked {
                name: name.to_owned(),
                fingerprint: cert.fingerprint.clone(),
                revoked_at: stamp.clone(),
            });
            added += 1;
        }
        if added > 0 {
            let path = self.revocation_list_path();
            let text = toml::to_string(&list).map_err(|e| PkiError::Crypto {
                context: format!("writing {}", path.display()),
                message: e.to_string(),
            })?;
            // Write a new file beside it and rename: a reader never sees
            // half a list. Under the lock, a leftover new file is stale.
            let fresh = path.with_extension("toml.new");
            let _ = fs::remove_file(&fresh);
            write_new_file(&fresh, text.as_bytes(), 0o644)?;
            fs::rename(&fresh, &path).map_err(|source| PkiError::Io {
                path: path.clone(),
                source,
            })?;
            fs::File::open(self.root())
                .and_then(|dir| dir.sync_all())
                .map_err(|source| PkiError::Io {
                    path: self.root().to_owned(),
                    source,
                })?;
        }
        Ok(added)
    }

    /// Revocations on the list that take effect later, with when.
    pub fn pending_revocations(
        &self,
    ) -> Result<Vec<(Fingerprint, time::OffsetDateTime)>, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        Ok(self
            .revocation_list()?
            .revoked
            .iter()
            .filter_map(|entry| {
                let at = parse_stamp(&entry.revoked_at)?;
                (at > now).then_some((from_hex(&entry.fingerprint)?, at))
            })
            .collect())
    }

    /// When the next revocation set for later takes effect, if any.
    pub fn next_revocation_due(&self) -> Result<Option<time::OffsetDateTime>, PkiError> {
        Ok(self
            .pending_revocations()?
            .into_iter()
            .map(|(_, at)| at)
            .min())
    }

    /// The fingerprints revoked now (none if there is no list): entries
    /// whose time has come, and any whose time cannot be read.
    pub fn revoked_fingerprints(&self) -> Result<HashSet<Fingerprint>, PkiError> {
        let path = self.revocation_list_path();
        let now = time::OffsetDateTime::now_utc();
        self.revocation_list()?
            .revoked
            .iter()
            .filter(|entry| parse_stamp(&entry.revoked_at).is_none_or(|at| at <= now))
            .map(|entry| {
                from_hex(&entry.fingerprint).ok_or_else(|| PkiError::Crypto {
                    context: format!("reading {}", path.display()),
                    message: format!("{:?} is not a SHA-256 fingerprint", entry.fingerprint),
                })
            })
            .collect()
    }

    fn revocation_list(&self) -> Result<RevocationList, PkiError> {
        let path = self.revocation_list_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RevocationList::default());
            }
            Err(source) => return Err(PkiError::Io { path, source }),
        };
        toml::from_str(&text).map_err(|e| PkiError::Crypto {
            context: format!("reading {}", path.display()),
            message: e.message().to_owned(),
        })
    }
}

/// A time as `revoked.toml` keeps it: `YYYY-MM-DDTHH:MM:SSZ`, UTC.
fn stamp(at: time::OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// Reads a [`stamp`].
fn parse_stamp(text: &str) -> Option<time::OffsetDateTime> {
    let (date, clock) = text.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.splitn(3, '-').map(str::parse::<u32>);
    let mut clock = clock.splitn(3, ':').map(str::parse::<u8>);
    let (year, month, day) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let (hour, minute, second) = (
        clock.next()?.ok()?,
        clock.next()?.ok()?,
        clock.next()?.ok()?,
    );
    let date = time::Date::from_calendar_date(
        i32::try_from(year).ok()?,
        time::Month::try_from(u8::try_from(month).ok()?).ok()?,
        u8::try_from(day).ok()?,
    )
    .ok()?;
    let clock = time::Time::from_hms(hour, minute, second).ok()?;
    Some(time::PrimitiveDateTime::new(date, clock).assume_utc())
}

/// The files in `dir` ending in `.extension` (none if `dir` does not exist).
fn files_with_extension(dir: &Path, extension: &str) -> Result<Vec<PathBuf>, PkiError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PkiError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    Ok(entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|ext| ext == extension))
        .collect())
}

/// The DER certificate in a recorded PEM file or a bundle.
fn read_certificate(path: &Path, is_bundle: bool) -> Result<Vec<u8>, String> {
    let pem = if is_bundle {
        crate::bundle::Bundle::load(path)
            .map_err(|e| crate::error_chain(&e))?
            .cert
    } else {
        fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?
    };
    parse_cert(&pem, "the certificate")
        .map(|der| der.to_vec())
        .map_err(|e| crate::error_chain(&e))
}

/// An exclusive lock on the revocation list, held while it is rewritten:
/// a lock file made with `create_new`, removed when dropped.
struct ListLock(PathBuf);

impl ListLock {
    fn take(path: &Path) -> Result<ListLock, PkiError> {
        write_new_file(path, std::process::id().to_string().as_bytes(), 0o600).map_err(
            |e| match e {
                PkiError::Exists(_) => PkiError::InvalidName {
                    what: "revocation list lock",
                    value: path.display().to_string(),
                    why: "another revoke is running (remove the file if none is)",
                },
                other => other,
            },
        )?;
        Ok(ListLock(path.to_owned()))
    }
}

impl Drop for ListLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The set of revoked certificates a running relay checks, shared with
/// its TLS verifier and replaced whole on reload.
#[derive(Debug, Clone, Default)]
pub struct Revocations(Arc<RwLock<HashSet<Fingerprint>>>);

impl Revocations {
    /// A set holding `revoked`.
    pub fn new(revoked: HashSet<Fingerprint>) -> Revocations {
        Revocations(Arc::new(RwLock::new(revoked)))
    }

    /// Whether the DER certificate `der` is revoked.
    pub fn is_revoked(&self, der: &[u8]) -> bool {
        let print = fingerprint(der);
        match self.0.read() {
            Ok(set) => set.contains(&print),
            Err(poisoned) => poisoned.into_inner().contains(&print),
        }
    }

    /// Replaces the set; returns how many certificates it now holds.
    pub fn replace(&self, revoked: HashSet<Fingerprint>) -> usize {
        let len = revoked.len();
        match self.0.write() {
            Ok(mut set) => *set = revoked,
            Err(poisoned) => *poisoned.into_inner() = revoked,
        }
        len
    }
}

/// Reads the PKI directory's revocation list at `dir`.
pub fn load_revocations(dir: &Path) -> Result<HashSet<Fingerprint>, PkiError> {
    PkiDir::new(dir).revoked_fingerprints()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_list_revoke_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init(&[]).expect("init");
        for name in ["alice", "bob"] {
            let bundle = pki
                .issue_client(name, &["127.0.0.1:4433".into()], None, 30)
                .expect("issue");
            pki.record_issued(name, &bundle.cert).expect("record");
        }
        let listed = pki.issued().expect("list");
        assert_eq!(
            listed.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["alice", "bob"]
        );
        assert!(listed.iter().all(|c| !c.revoked && !c.expired));

        assert_eq!(pki.revoke("alice").expect("revoke"), 1);
        assert_eq!(pki.revoke("alice").expect("again"), 0, "already revoked");
        assert!(pki.revoke("carol").is_err(), "never issued");
        let listed = pki.issued().expect("list");
        assert!(listed[0].revoked && !listed[1].revoked);

        let revocations = Revocations::new(pki.revoked_fingerprints().expect("load"));
        let alice = pki.issued_dir();
        let alice_pem = fs::read_dir(&alice)
            .expect("issued dir")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("alice-"))
            })
            .expect("alice's certificate");
        let der = parse_cert(&fs::read_to_string(alice_pem).expect("read"), "alice").expect("pem");
        assert!(revocations.is_revoked(&der));
    }

    #[test]
    fn bundles_without_a_record_count_and_bad_files_do_not_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init(&[]).expect("init");
        // Issued before certificates were recorded: only its bundle exists.
        let carol = pki
            .issue_client("carol", &["127.0.0.1:4433".into()], None, 30)
            .expect("issue");
        write_new_file(
            &pki.bundle_path("carol"),
            carol.to_toml().expect("toml").as_bytes(),
            0o600,
        )
        .expect("bundle");
        write_new_file(
            &pki.issued_dir().join("broken.crt"),
            b"not a certificate",
            0o644,
        )
        .expect("garbage");

        let listed = pki.issued().expect("list");
        assert!(
            listed
                .iter()
                .any(|c| c.name == "carol" && c.problem.is_none())
        );
        assert!(listed.iter().any(|c| c.problem.is_some()), "{listed:?}");
        assert_eq!(pki.revoke("carol").expect("revoke"), 1);
        let der = parse_cert(&carol.cert, "carol").expect("pem");
        assert!(Revocations::new(pki.revoked_fingerprints().expect("load")).is_revoked(&der));
    }

    #[test]
    fn fingerprints_round_trip_through_hex() {
        let print = fingerprint(b"certificate");
        assert_eq!(from_hex(&hex(&print)), Some(print));
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn a_revocation_set_for_later_waits_for_its_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init(&[]).expect("init");
        let bundle = pki
            .issue_client("alice", &["localhost:4433".into()], None, 30)
            .expect("issue");
        pki.record_issued("alice", &bundle.cert).expect("record");
        let later = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
        assert_eq!(pki.revoke_from("alice", later).expect("revoke"), 1);
        assert!(pki.revoked_fingerprints().expect("load").is_empty());
        let due = pki.next_revocation_due().expect("load").expect("pending");
        assert!(
            (due - later).abs() < time::Duration::seconds(1),
            "{due} {later}"
        );
        let listed = pki.issued().expect("list");
        assert!(
            !listed[0].revoked && listed[0].revoked_from.is_some(),
            "{listed:?}"
        );
        // Revoked now as well: the earlier time wins.
        assert_eq!(pki.revoke("alice").expect("revoke"), 1);
        assert_eq!(pki.revoked_fingerprints().expect("load").len(), 1);
        assert_eq!(
            parse_stamp(&stamp(later)).map(|t| t.unix_timestamp()),
            Some(later.unix_timestamp())
        );
        assert_eq!(parse_stamp("2026-13-01T00:00:00Z"), None);
    }
}
