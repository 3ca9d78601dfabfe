//! The connections alive, by certificate, so a reload of the PKI can close
//! those whose certificate was revoked; the PKI's reload timing; and the
//! count of clients that have not yet heard the go-away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use passage_shared::frame::close_code;
use passage_shared::revocation::Fingerprint;
use tokio::sync::watch;
use tracing::{info, warn};

use super::connection::Closer;
use crate::pki_watch::PkiWatch;

/// One open client connection: its certificate's fingerprint, the
/// client's name, and how to close it.
pub(super) type LiveEntry = (Fingerprint, Arc<str>, Closer);

/// Open client connections by number, with their certificate's
/// fingerprint, so a reload can close the revoked ones.
#[derive(Debug, Default)]
pub(super) struct Live {
    next: AtomicU64,
    connections: Mutex<HashMap<u64, LiveEntry>>,
}

impl Live {
    /// Records `connection`; it is forgotten when the returned guard drops.
    pub(super) fn register(
        self: &Arc<Self>,
        print: Fingerprint,
        client: Arc<str>,
        connection: Closer,
    ) -> LiveGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (print, client, connection));
        LiveGuard {
            live: self.clone(),
            id,
        }
    }

    /// Closes every open connection whose certificate is now revoked; returns how many.
    pub(super) fn close_revoked(&self, revoked: &std::collections::HashSet<Fingerprint>) -> usize {
        let mut closed = 0;
        for (print, client, connection) in self.lock().values() {
            if revoked.contains(print) {
                warn!(client = %client, "closing a connection: its certificate was revoked");
                connection.close(close_code::REVOKED, "client certificate revoked");
                closed += 1;
            }
        }
        closed
    }

    /// Closes every open connection (the drain timeout has run out).
    pub(super) fn close_all(&self) {
        for (_, _, connection) in self.lock().values() {
            connection.close(0, "relay shutting down");
        }
    }

    /// The registry, even after a panic elsewhere poisoned its lock (it
    /// must keep failing closed, not open).
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LiveEntry>> {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes a connection from [`Live`] when its task ends.
pub(super) struct LiveGuard {
    live: Arc<Live>,
    id: u64,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
    }
}

/// Re-reads the PKI directory ([`PkiWatch::reload`]), closes open
/// connections of certificates now revoked, and returns when to look again
/// for a revocation set for later.
pub(super) fn reload_pki(watch: &PkiWatch, live: &Live) -> Option<tokio::time::Instant> {
    let reloaded = watch.reload();
    if let Some(revoked) = &reloaded.revoked {
        let closed = live.close_revoked(revoked);
        info!(
            revoked = revoked.len(),
            closed_connections = closed,
            "revocation list reloaded"
        );
    }
    due_instant(reloaded.next_due)
}

/// The tokio instant of a wall-clock time (a second late: revocations are
/// stamped to the second).
pub(super) fn due_instant(at: Option<time::OffsetDateTime>) -> Option<tokio::time::Instant> {
    let wait = at? - time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
    Some(tokio::time::Instant::now() + wait)
}

/// Resolves at `due`; never without one.
pub(super) async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One connection that has not yet sent its client the go-away; counted in
/// a shared number the shutdown waits on, until sent or dropped.
pub(super) struct Unannounced(Arc<watch::Sender<usize>>);

impl Unannounced {
    pub(super) fn register(count: &Arc<watch::Sender<usize>>) -> Unannounced {
        count.send_modify(|n| *n += 1);
        Unannounced(count.clone())
    }
}

impl Drop for Unannounced {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}
