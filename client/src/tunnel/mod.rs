//! The tunnel: one connection per configured relay, each kept up by its
//! own link task, and streams for requests handed out over the first
//! healthy one.
//!
//! Relays are listed in order of preference (the bundle's, then `--relay`
//! additions). The client keeps a connection to every one of them, so a
//! standby is already up when the preferred relay dies; new requests go
//! to the first relay in the list whose connection is up and that has not
//! announced a shutdown. Requests that arrive while none is up wait up to
//! the connect wait for one.
//!
//! Transports: with `auto` (the default) a link starts QUIC handshakes; if
//! none has completed after a short head start, it races TLS-over-TCP
//! handshakes beside them and takes whichever completes first. While it
//! runs on TCP it probes QUIC again in the background (after 10 s, then
//! backing off to 60 s) and moves new requests to QUIC once a probe
//! succeeds; requests in flight finish on TCP. A link whose last good
//! connection was TCP (in this process or, through the state file, the
//! previous one) races both at once next time.
//!
//! Reconnecting: a link starts a handshake at once, then another after
//! each backoff step (100 ms doubling to a 1 s cap, each step drawn from
//! its upper half), while earlier attempts are still waiting for an
//! answer; each attempt gives up after the connect timeout and the first
//! to complete wins. A relay that comes back is thus reached within about
//! a second, and a dead one costs a few small packets a second. Attempts
//! that lose the race are closed as abandoned, which the relay logs as
//! routine.
//!
//! Liveness: both transports keep the connection busy with keep-alives,
//! and the link watches what arrives. A connection from which nothing was
//! heard for the silence limit (3 s) is closed as dead, well before the
//! transport's own idle timeout: requests the relay never received are
//! then sent again elsewhere. One silent for longer than the confirmation
//! window (2.5 keep-alives) is not confirmed alive, and `/healthz` says so.
//!
//! The pieces: [`setup`] (targets and timing), [`link_state`] (what each
//! link publishes), [`link`] (the task behind each link), [`retry`]
//! (backoff and attempt errors); this module holds the handle requests use.

mod link;
mod link_state;
mod retry;
mod setup;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use passage_shared::transport::{BoxRecv, BoxSend, RecvHalf};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::connect::{Connection, Dialer, Endpoints};
use link::Link;
use link_state::choose;
pub use link_state::{LinkState, RelayLink, last_errors};
pub use setup::{RelayTarget, TunnelSettings, TunnelSetup};

/// Why no stream could be had.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// No connection came up within the wait.
    #[error("no relay is reachable{}", .last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Unavailable {
        /// Why the last attempts failed, per relay.
        last_error: Option<String>,
    },
    /// All streams of the connection stayed busy.
    #[error("no free tunnel stream within {0:?}")]
    StreamTimeout(Duration),
    /// The connection failed while opening the stream.
    #[error("tunnel connection failed: {0}")]
    Lost(String),
    /// The client is shutting down.
    #[error("passage-client is shutting down")]
    Stopped,
}

/// A stream opened for one request.
pub struct OpenedStream {
    /// The sending half.
    pub send: BoxSend,
    /// The receiving half; counted in [`Tunnel::open_streams`] until dropped.
    pub recv: BoxRecv,
    /// Identifies the connection it runs on (see [`Tunnel::open_stream`]'s `avoid`).
    pub connection_id: u64,
}

/// Handle to the tunnel, cheap to clone; the link tasks run behind it.
#[derive(Debug, Clone)]
pub struct Tunnel {
    links: watch::Receiver<Vec<RelayLink>>,
    settings: TunnelSettings,
    open_streams: Arc<AtomicUsize>,
}

impl Tunnel {
    /// Starts one link task per target, which run until `shutdown` fires;
    /// await the handle to let them close their connections cleanly.
    pub fn start(
        targets: Vec<RelayTarget>,
        setup: TunnelSetup,
        shutdown: CancellationToken,
    ) -> (Tunnel, tokio::task::JoinHandle<()>) {
        let settings = setup.settings;
        let initial = targets
            .iter()
            .map(|target| RelayLink {
                address: target.address.clone(),
                state: LinkState::Connecting { last_error: None },
                established: 0,
                fallbacks: 0,
                probes: 0,
                probes_succeeded: 0,
            })
            .collect();
        let (links_tx, links) = watch::channel(initial);
        let links_tx = Arc::new(links_tx);
        let mut tasks = JoinSet::new();
        for (index, target) in targets.into_iter().enumerate() {
            let link = Link {
                index,
                dialer: Dialer {
                    server_name: target.server_name.clone(),
                    quic: setup.quic.clone(),
                    tls: setup.tls.clone(),
                    tuning: settings.transport,
                    endpoints: Arc::new(Mutex::new(Endpoints::default())),
                },
                target,
                settings,
                links: links_tx.clone(),
                memory: setup.memory.clone(),
            };
            tasks.spawn(link.run(shutdown.clone()));
        }
        let handle = tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
        let tunnel = Tunnel {
            links,
            settings,
            open_streams: Arc::new(AtomicUsize::new(0)),
        };
        (tunnel, handle)
    }

    /// Every relay and the state of its link, in order of preference.
    pub fn links(&self) -> Vec<RelayLink> {
        self.links.borrow().clone()
    }

    /// The tunnel's timing.
    pub fn settings(&self) -> &TunnelSettings {
        &self.settings
    }

    /// Request streams open now (opened and not yet dropped by their response).
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Relaxed)
    }

    /// The connection new requests should use, waiting up to `wait` for
    /// one; `avoid` skips a connection that just failed or refused.
    pub async fn connection(
        &self,
        wait: Duration,
        avoid: Option<u64>,
    ) -> Result<(Connection, u64), TunnelError> {
        let deadline = Instant::now() + wait;
        let mut links = self.links.clone();
        loop {
            {
                let current = links.borrow_and_update();
                if let Some(connection) = choose(&current, avoid, self.settings.confirm_within) {
                    return Ok(connection);
                }
                if current
                    .iter()
                    .all(|l| matches!(l.state, LinkState::Stopped))
                {
                    return Err(TunnelError::Stopped);
                }
            }
            match tokio::time::timeout_at(deadline, links.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(TunnelError::Stopped),
                Err(_) => {
                    return Err(TunnelError::Unavailable {
                        last_error: last_errors(&links.borrow()),
                    });
                }
            }
        }
    }

    /// Opens a stream for one request on the preferred healthy relay,
    /// skipping connection `avoid`. A stream that could not be opened
    /// carried nothing, so one failure, or a connection whose streams all
    /// stayed busy, is retried once on another connection.
    pub async fn open_stream(
        &self,
        wait: Duration,
        mut avoid: Option<u64>,
    ) -> Result<OpenedStream, TunnelError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (connection, id) = self.connection(wait, avoid).await?;
            let opened =
                tokio::time::timeout(self.settings.open_stream_timeout, connection.open_stream())
                    .await;
            match opened {
                Ok(Ok((send, recv))) => {
                    let recv = CountedRecv::new(recv, self.open_streams.clone());
                    return Ok(OpenedStream {
                        send,
                        recv: Box::new(recv),
                        connection_id: id,
                    });
                }
                Ok(Err(e)) if attempt < 2 => {
                    warn!(error = %e, "could not open a stream; retrying on another connection");
                    avoid = Some(id);
                }
                Ok(Err(e)) => return Err(TunnelError::Lost(e)),
                // Every stream of this connection stayed busy: another
                // relay that is up right now may have room.
                Err(_)
                    if attempt < 2
                        && choose(&self.links.borrow(), Some(id), self.settings.confirm_within)
                            .is_some() =>
                {
                    warn!("no free stream on this connection in time; trying another relay");
                    avoid = Some(id);
                }
                Err(_) => {
                    return Err(TunnelError::StreamTimeout(
                        self.settings.open_stream_timeout,
                    ));
                }
            }
        }
    }
}

/// A receiving half counted in the tunnel's open streams while it lives.
struct CountedRecv {
    inner: BoxRecv,
    open_streams: Arc<AtomicUsize>,
}

impl CountedRecv {
    fn new(inner: BoxRecv, open_streams: Arc<AtomicUsize>) -> CountedRecv {
        open_streams.fetch_add(1, Ordering::Relaxed);
        CountedRecv {
            inner,
            open_streams,
        }
    }
}

impl Drop for CountedRecv {
    fn drop(&mut self) {
        self.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl tokio::io::AsyncRead for CountedRecv {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl RecvHalf for CountedRecv {
    fn stop(&mut self, code: u32) {
        self.inner.stop(code);
    }
}
