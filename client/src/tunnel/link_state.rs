//! What the tunnel publishes about each relay's link: its state, its
//! connection's liveness, and the choice of a connection for new requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::connect::Connection;

/// When a connection last heard from its relay.
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    /// Milliseconds after `started` of the last sign of life.
    heard_at_ms: AtomicU64,
}

impl Liveness {
    pub(super) fn new() -> Liveness {
        Liveness {
            started: Instant::now(),
            heard_at_ms: AtomicU64::new(0),
        }
    }

    pub(super) fn heard_now(&self) {
        self.heard_at_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long nothing has arrived from the relay.
    pub fn silent_for(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(
            self.heard_at_ms.load(Ordering::Relaxed),
        ))
    }
}

/// Where the link to one relay stands.
#[derive(Debug, Clone)]
pub enum LinkState {
    /// No usable connection; the link is (re)connecting.
    Connecting {
        /// Why the last attempts or connection failed.
        last_error: Option<String>,
    },
    /// Connected; new requests may use it.
    Up {
        /// The live connection.
        connection: Connection,
        /// This client's number for the connection.
        id: u64,
        /// When it last heard from the relay.
        liveness: Arc<Liveness>,
    },
    /// The client is shutting down.
    Stopped,
}

/// One relay and the state of its link.
#[derive(Debug, Clone)]
pub struct RelayLink {
    /// The relay's address as configured.
    pub address: String,
    /// Its link's state.
    pub state: LinkState,
    /// Connections this link has established so far (reconnects: all but the first).
    pub established: u64,
    /// Times the link came up on TCP while `auto` would have preferred QUIC.
    pub fallbacks: u64,
    /// QUIC probes made while on TCP, and how many of them succeeded.
    pub probes: u64,
    /// QUIC probes that succeeded (the link then moved to QUIC).
    pub probes_succeeded: u64,
}

impl RelayLink {
    /// The connection new requests may use: up, and not closed since.
    pub fn usable(&self) -> Option<(&Connection, u64)> {
        match &self.state {
            LinkState::Up { connection, id, .. } if connection.close_reason().is_none() => {
                Some((connection, *id))
            }
            _ => None,
        }
    }

    /// How long the usable connection has been silent, if there is one.
    pub fn silent_for(&self) -> Option<Duration> {
        match &self.state {
            LinkState::Up { liveness, .. } if self.usable().is_some() => {
                Some(liveness.silent_for())
            }
            _ => None,
        }
    }
}

/// The first link, in order of preference, with a live connection other
/// than `avoid`; one heard from within `confirm_within` comes before one
/// that has gone quiet (it may be dead and not yet known to be).
pub(super) fn choose(
    links: &[RelayLink],
    avoid: Option<u64>,
    confirm_within: Duration,
) -> Option<(Connection, u64)> {
    let candidates = || {
        links
            .iter()
            .filter_map(|link| link.usable().map(|usable| (link, usable)))
            .filter(|(_, (_, id))| Some(*id) != avoid)
    };
    candidates()
        .find(|(link, _)| link.silent_for().is_some_and(|s| s <= confirm_within))
        .or_else(|| candidates().next())
        .map(|(_, (connection, id))| (connection.clone(), id))
}

/// Each relay's last error ("ADDR: error; ..."), for 503 messages and
/// `/healthz`; `None` when no attempt has failed yet.
pub fn last_errors(links: &[RelayLink]) -> Option<String> {
    let errors: Vec<String> = links
        .iter()
        .filter_map(|link| match &link.state {
            LinkState::Connecting {
                last_error: Some(e),
            } => Some(format!("{}: {e}", link.address)),
            _ => None,
        })
        .collect();
    (!errors.is_empty()).then(|| errors.join("; "))
}
