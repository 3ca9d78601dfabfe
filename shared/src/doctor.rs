//! What `doctor` shows, in both programs: one line per check with a
//! verdict and a hint, as text or JSON, and the relay's answer to a
//! client's doctor (the tunnel marker and the upstream check's report).
//!
//! A client's doctor asks the relay through the tunnel itself: a request
//! head carrying [`DOCTOR_HEADER`] is answered by the relay, never sent
//! upstream. Apps cannot send the marker: the client drops it from their
//! headers like every other tunnel marker.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Request header that marks a doctor's question to the relay; its value
/// is one of [`DOCTOR_ECHO`], [`DOCTOR_UPSTREAM`], [`DOCTOR_UPLOAD`] or
/// `download BYTES` ([`DOCTOR_DOWNLOAD`]).
pub const DOCTOR_HEADER: &str = "passage-doctor";
/// Answered at once with an empty 200: a round trip through the tunnel.
pub const DOCTOR_ECHO: &str = "echo";
/// Answered with the relay's [`UpstreamReport`] as JSON.
pub const DOCTOR_UPSTREAM: &str = "upstream";
/// Answered, once the request body has ended, with its length in bytes
/// as text: an upload whose sender counts its own losses.
pub const DOCTOR_UPLOAD: &str = "upload";
/// Prefix of `download BYTES`: answered with that many bytes (at most
/// [`DOCTOR_MAX_DOWNLOAD`]), for a throughput figure.
pub const DOCTOR_DOWNLOAD: &str = "download";
/// Most bytes a doctor's download may ask for.
pub const DOCTOR_MAX_DOWNLOAD: u64 = 64 << 20;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Works.
    Ok,
    /// Works, with something to look at.
    Warn,
    /// Broken: requests fail because of it.
    Fail,
    /// Not checked (not applicable, or an earlier failure decides it).
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        }
    }
}

/// One check: what it looked at, what it found, and what to do about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// The hop or part checked (e.g. `quic`, `certificate`, `upstream`).
    pub name: String,
    /// Its verdict.
    pub verdict: Verdict,
    /// What was found, in a few words.
    pub detail: String,
    /// What to do, for a warning or a failure.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hint: Option<String>,
}

impl Check {
    /// A check that passed.
    pub fn ok(name: &str, detail: impl Into<String>) -> Check {
        Check::new(name, Verdict::Ok, detail, None)
    }

    /// A check with a warning and what to do about it.
    pub fn warn(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Verdict::Warn, detail, Some(hint.into()))
    }

    /// A check that failed and what to do about it.
    pub fn fail(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Verdict::Fail, detail, Some(hint.into()))
    }

    /// A check not made, and why.
    pub fn skip(name: &str, why: impl Into<String>) -> Check {
        Check::new(name, Verdict::Skip, why, None)
    }

    fn new(name: &str, verdict: Verdict, detail: impl Into<String>, hint: Option<String>) -> Check {
        Check {
            name: name.to_owned(),
            verdict,
            detail: detail.into(),
            hint,
        }
    }
}

/// A doctor's whole finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Whether a request would work (no check failed).
    pub ok: bool,
    /// The first check that failed, by name.
    pub first_failure: Option<String>,
    /// Every check, in the order made.
    pub checks: Vec<Check>,
}

impl Report {
    /// The report of `checks`.
    pub fn new(checks: Vec<Check>) -> Report {
        let first_failure = checks
            .iter()
            .find(|c| c.verdict == Verdict::Fail)
            .map(|c| c.name.clone());
        Report {
            ok: first_failure.is_none(),
            first_failure,
            checks,
        }
    }

    /// One line per check, then the conclusion.
    pub fn text(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for check in &self.checks {
            let _ = writeln!(
                out,
                "{:<4}  {:<width$}  {}",
                check.verdict.label(),
                check.name,
                check.detail
            );
            if let Some(hint) = &check.hint {
                let _ = writeln!(out, "      {:<width$}  hint: {hint}", "");
            }
        }
        match &self.first_failure {
            None => out.push_str("verdict: ok, requests should work\n"),
            Some(name) => {
                let _ = writeln!(out, "verdict: FAIL, first failing check: {name}");
            }
        }
        out
    }

    /// The report as one JSON object.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// The relay's verdict on one of its upstream keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyVerdict {
    /// The upstream accepted it.
    Accepted,
    /// The upstream refused it (401 or 403).
    Rejected,
    /// Accepted, but rate-limited or out of quota now (429).
    Limited,
    /// The upstream answered something else.
    Unexpected,
}

/// How the upstream answered one of the relay's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCheck {
    /// Which key, counted from 1 in the order configured (never the key).
    pub key: usize,
    /// The upstream's HTTP status.
    pub status: u16,
    /// The verdict.
    pub verdict: KeyVerdict,
    /// The upstream's error message, if it gave one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
}

/// The relay's check of its upstream: reached or not, and each key's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamReport {
    /// The upstream base URL.
    pub upstream: String,
    /// Whether the upstream answered at all.
    pub reachable: bool,
    /// Milliseconds of the first check's round trip.
    pub latency_ms: f64,
    /// Why it was not reached.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// The status of a check without a key, when the relay holds none
    /// (apps bring their own keys then).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub keyless_status: Option<u16>,
    /// One entry per relay key.
    pub keys: Vec<KeyCheck>,
}

impl UpstreamReport {
    /// The report as one check named `upstream`.
    pub fn check(&self) -> Check {
        const NAME: &str = "upstream";
        if !self.reachable {
            return Check::fail(
                NAME,
                format!(
                    "the relay cannot reach {}: {}",
                    self.upstream,
                    self.error
                        .as_deref()
                        .map(|e| e
                            .split_once(&format!("{}: ", self.upstream))
                            .map_or(e, |(_, rest)| rest))
                        .unwrap_or("no answer")
                ),
                "check the relay's DNS, firewall and --upstream (curl the upstream from the relay's machine)",
            );
        }
        let reached = format!("{} answered in {:.0} ms", self.upstream, self.latency_ms);
        if self.keys.is_empty() {
            return Check::ok(
                NAME,
                format!(
                    "{reached} (HTTP {}); the relay holds no key: apps' own keys go upstream",
                    self.keyless_status.unwrap_or(0)
                ),
            );
        }
        let count = |verdict| self.keys.iter().filter(|k| k.verdict == verdict).count();
        let (rejected, limited, odd) = (
            count(KeyVerdict::Rejected),
            count(KeyVerdict::Limited),
            count(KeyVerdict::Unexpected),
        );
        let total = self.keys.len();
        let first_problem = self
            .keys
            .iter()
            .find(|k| k.verdict != KeyVerdict::Accepted)
            .map(|k| {
                format!(
                    "key {} of {total}: HTTP {}{}",
                    k.key,
                    k.status,
                    k.message
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                )
            })
            .unwrap_or_default();
        if rejected == total {
            Check::fail(
                NAME,
                format!("{reached}; it rejected the relay's key: {first_problem}"),
                "put a valid key in the variable the relay's --api-key-env names, then restart the relay",
            )
        } else if rejected + limited + odd > 0 {
            Check::warn(
                NAME,
                format!(
                    "{reached}; {} of {total} keys accepted; {first_problem}",
                    total - rejected - limited - odd
                ),
                "a rejected key rests and requests use the others; replace it; a limited key is out of quota or rate-limited",
            )
        } else {
            Check::ok(
                NAME,
                format!("{reached}; the relay's key is accepted ({total} of {total})"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_named_and_the_text_shows_hints() {
        let report = Report::new(vec![
            Check::ok("bundle", "laptop"),
            Check::warn("quic", "no reply", "UDP may be blocked"),
            Check::fail("tcp", "refused", "start the relay"),
            Check::fail("upstream", "unreachable", "later"),
        ]);
        assert!(!report.ok);
        assert_eq!(report.first_failure.as_deref(), Some("tcp"));
        let text = report.text();
        assert!(text.contains("FAIL  tcp       refused"), "{text}");
        assert!(text.contains("hint: start the relay"), "{text}");
        assert!(text.ends_with("first failing check: tcp\n"), "{text}");
        let back: Report = serde_json::from_str(&report.json()).expect("json");
        assert_eq!(back, report);
    }

    #[test]
    fn key_verdicts_decide_the_upstream_check() {
        let key = |key, verdict| KeyCheck {
            key,
            status: 200,
            verdict,
            message: None,
        };
        let mut report = UpstreamReport {
            upstream: "https://api.example".into(),
            reachable: true,
            latency_ms: 12.0,
            error: None,
            keyless_status: None,
            keys: vec![key(1, KeyVerdict::Accepted), key(2, KeyVerdict::Rejected)],
        };
        assert_eq!(report.check().verdict, Verdict::Warn);
        report.keys.remove(0);
        assert_eq!(report.check().verdict, Verdict::Fail);
        report.keys.clear();
        report.keyless_status = Some(401);
        assert_eq!(report.check().verdict, Verdict::Ok);
        report.reachable = false;
        assert_eq!(report.check().verdict, Verdict::Fail);
    }
}
