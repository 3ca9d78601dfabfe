//! Pacing of connection attempts (capped backoff with jitter) and what the
//! failed attempts said, per transport.

use std::time::Duration;

use passage_shared::transport::TransportKind;

use crate::connect::NO_REPLY;

/// Capped exponential backoff with jitter: each step is drawn from the
/// upper half of the current delay, which doubles up to the cap.
#[derive(Debug)]
pub(super) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = (self.current * 2).min(self.max);
        delay.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    pub(super) fn reset(&mut self) {
        self.current = self.min;
    }
}

/// What the failed attempts of one transport said.
#[derive(Debug, Default)]
struct TransportErrors {
    last: Option<String>,
    /// Consecutive attempts that got no reply at all.
    no_reply: u32,
}

/// What the failed attempts to reach one relay said, per transport.
#[derive(Debug, Default)]
pub(super) struct AttemptErrors {
    quic: TransportErrors,
    tcp: TransportErrors,
}

impl AttemptErrors {
    pub(super) fn record(&mut self, kind: TransportKind, error: String) {
        let errors = match kind {
            TransportKind::Quic => &mut self.quic,
            TransportKind::Tcp => &mut self.tcp,
        };
        if error == NO_REPLY {
            errors.no_reply += 1;
        } else {
            errors.no_reply = 0;
        }
        errors.last = Some(error);
    }

    /// One line naming each transport tried and what it got.
    pub(super) fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(last) = &self.quic.last {
            parts.push(match self.quic.no_reply {
                0 => format!("QUIC: {last}"),
                1 => "QUIC: no reply to a handshake — UDP may be blocked".to_owned(),
                n => format!("QUIC: no reply to {n} handshakes — UDP may be blocked"),
            });
        }
        if let Some(last) = &self.tcp.last {
            parts.push(format!("TCP: {last}"));
        }
        parts.join("; ")
    }
}
