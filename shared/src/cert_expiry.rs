//! A running program's own certificate's expiry: the figure `/healthz` and
//! the metrics show, and a WARN in the log once a day from
//! [`RENEW_WITHIN_DAYS`] before the certificate expires (an ERROR once it
//! has). The relay replaces the figure when it loads a renewed certificate.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use tracing::{error, warn};

use crate::pki::day_of;

/// Days before expiry from which a certificate is reported as due for renewal.
pub const RENEW_WITHIN_DAYS: i64 = 14;
/// How often the expiry is looked at; a warning is logged at most once a day.
const LOOK_EVERY: Duration = Duration::from_secs(3600);
/// Least time between two warnings.
const WARN_EVERY: Duration = Duration::from_secs(24 * 3600);

/// When a certificate expires, shared by everything that reports it.
#[derive(Debug, Clone)]
pub struct CertificateExpiry {
    /// Unix seconds of `notAfter`.
    not_after: Arc<AtomicI64>,
}

impl CertificateExpiry {
    /// The expiry of the DER certificate `der` (`None` if it cannot be read).
    pub fn of(der: &[u8]) -> Option<CertificateExpiry> {
        let until = crate::pki::certificate_not_after(der)?;
        Some(CertificateExpiry {
            not_after: Arc::new(AtomicI64::new(until.unix_timestamp())),
        })
    }

    /// Puts a renewed certificate's expiry in place.
    pub fn replace(&self, der: &[u8]) {
        if let Some(until) = crate::pki::certificate_not_after(der) {
            self.not_after
                .store(until.unix_timestamp(), Ordering::Relaxed);
        }
    }

    /// When it expires.
    pub fn not_after(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.not_after.load(Ordering::Relaxed))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// Seconds until it expires (negative once it has).
    pub fn seconds_left(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed) - OffsetDateTime::now_utc().unix_timestamp()
    }

    /// Whole days until it expires (negative once it has).
    pub fn days_left(&self) -> i64 {
        self.seconds_left() / 86_400
    }

    /// Whether it has expired.
    pub fn expired(&self) -> bool {
        self.seconds_left() <= 0
    }

    /// `valid until YYYY-MM-DD (N days)`, as the doctors show it.
    pub fn describe(&self) -> String {
        format!(
            "valid until {} ({} days)",
            day_of(self.not_after()),
            self.days_left()
        )
    }

    /// The `/healthz` fields: the expiry date and the seconds left.
    pub fn health_fields(&self, body: &mut serde_json::Value) {
        body["certificate_expires"] = day_of(self.not_after()).into();
        body["certificate_expires_in_seconds"] = self.seconds_left().into();
    }

    /// Logs now and then once a day while `what` is within
    /// [`RENEW_WITHIN_DAYS`] of expiry or past it, with `hint` on what to
    /// do; runs until the task is dropped.
    pub async fn warn_while_due(self, what: &'static str, hint: &'static str) {
        let mut last_warning: Option<tokio::time::Instant> = None;
        loop {
            let left = self.seconds_left();
            let due = left < RENEW_WITHIN_DAYS * 86_400;
            let quiet = last_warning.is_some_and(|at| at.elapsed() < WARN_EVERY);
            if due && !quiet {
                let expires = day_of(self.not_after());
                if left <= 0 {
                    error!(certificate = what, %expires, hint, "certificate expired: peers refuse it");
                } else {
                    warn!(
                        certificate = what,
                        %expires,
                        days_left = left / 86_400,
                        hint,
                        "certificate expires soon"
                    );
                }
                last_warning = Some(tokio::time::Instant::now());
            }
            if !due {
                last_warning = None;
            }
            tokio::time::sleep(LOOK_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_is_read_and_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = crate::pki::PkiDir::new(dir.path().join("pki"));
        pki.init(&[]).expect("init");
        let short = pki
            .issue_client("a", &["localhost:4433".into()], None, 3)
            .expect("issue");
        let long = pki
            .issue_client("a", &["localhost:4433".into()], None, 30)
            .expect("issue");
        let der = |pem: &str| crate::pki::parse_cert(pem, "cert").expect("pem").to_vec();
        let expiry = CertificateExpiry::of(&der(&short.cert)).expect("expiry");
        let left = expiry.seconds_left();
        assert!((2 * 86_400..=3 * 86_400).contains(&left), "{left}");
        expiry.replace(&der(&long.cert));
        assert!(expiry.seconds_left() > 29 * 86_400);
        let mut body = serde_json::json!({});
        expiry.health_fields(&mut body);
        assert!(
            body["certificate_expires"]
                .as_str()
                .is_some_and(|d| d.len() == 10)
        );
    }
}
