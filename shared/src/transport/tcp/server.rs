//! The relay's side of a TCP tunnel connection: accepting TLS, setting up
//! HTTP/2, waiting for the client's control stream, and handing out the
//! request streams it opens.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h2::Reason;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

use super::connection::{ConnectionState, keep_alive};
use super::socket::{ByteCounts, CountedTcp, counter_handle, tune_socket};
use super::stream::{H2Recv, H2Send, RecvState, SharedSend, lock};
use super::stream_error::{StreamError, code_for};
use super::{
    CONTROL_PATH, CONTROL_WAIT, MAX_FRAME_SIZE, MAX_HEADER_LIST, PENDING_ACCEPT_RESETS,
    STREAM_PATH, windows,
};
use crate::transport::{Ended, TransportTuning};

/// The relay's TLS acceptor side of a new TCP connection: tunes the socket
/// and runs the handshake, whose verifier checks the client certificate.
pub async fn accept_tls(
    tcp: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    tuning: &TransportTuning,
) -> io::Result<AcceptedTls> {
    tune_socket(&tcp, tuning);
    let counters = counter_handle(&tcp);
    let (io, counts) = CountedTcp::new(tcp);
    let tls = acceptor.accept(io).await?;
    Ok(AcceptedTls {
        tls,
        counts,
        counters,
    })
}

/// A TCP connection whose TLS handshake the relay has accepted.
pub struct AcceptedTls {
    /// The TLS stream.
    pub tls: tokio_rustls::server::TlsStream<CountedTcp>,
    counts: Arc<ByteCounts>,
    counters: Option<std::os::fd::OwnedFd>,
}

/// The client's certificate (DER) on a finished TLS connection; empty if absent.
pub fn peer_leaf(tls: &tokio_rustls::server::TlsStream<CountedTcp>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain: &[CertificateDer<'static>]| chain.first())
        .map(|leaf| leaf.to_vec())
        .unwrap_or_default()
}

/// A handle that ends a connection from elsewhere (a revocation).
#[derive(Debug, Clone)]
pub struct Closer(Arc<ConnectionState>);

impl Closer {
    /// Ends the connection now with `reason`.
    pub fn close(&self, reason: &str) {
        self.0.close(reason.to_owned());
    }
}

/// The relay's end of one TCP tunnel connection.
pub struct ServerConnection {
    connection: h2::server::Connection<tokio_rustls::server::TlsStream<CountedTcp>, Bytes>,
    /// The relay's side of the client's control stream (the keep-alive
    /// task sends heartbeats on it while this holds it).
    control: SharedSend,
    state: Arc<ConnectionState>,
    /// Set once the client reset its control stream, with its code.
    leaving: Option<Option<u64>>,
    /// Streams already read off the connection, not yet handed out.
    ready: std::collections::VecDeque<AcceptedStream>,
}

/// A request stream as h2 hands it over.
type AcceptedStream = (
    http::Request<h2::RecvStream>,
    h2::server::SendResponse<Bytes>,
);

impl ServerConnection {
    /// Sets up HTTP/2 on a verified TLS connection and waits for the
    /// client's control stream; `max_streams` request streams may be open
    /// at once.
    pub async fn handshake(
        accepted: AcceptedTls,
        remote: SocketAddr,
        tuning: TransportTuning,
        max_streams: u32,
    ) -> Result<ServerConnection, StreamError> {
        let AcceptedTls {
            tls,
            counts,
            counters,
        } = accepted;
        let (stream_window, connection_window) = windows(&tuning);
        let mut connection = h2::server::Builder::new()
            .initial_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST)
            // One more for the control stream.
            .max_concurrent_streams(max_streams.saturating_add(1))
            .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(None)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(StreamError::from_h2)?;
        let first = tokio::time::timeout(CONTROL_WAIT, connection.accept())
            .await
            .map_err(|_| StreamError::Other("no control stream in time".to_owned()))?;
        let (request, mut respond) = match first {
            Some(Ok(accepted)) => accepted,
            Some(Err(e)) => return Err(StreamError::from_h2(e)),
            None => {
                return Err(StreamError::ConnectionLost(
                    "closed before its control stream".to_owned(),
                ));
            }
        };
        if request.uri().path() != CONTROL_PATH {
            respond.send_reset(Reason::PROTOCOL_ERROR);
            return Err(StreamError::Other(format!(
                "expected the control stream, got {}",
                request.uri().path()
            )));
        }
        let control = respond
            .send_response(http::Response::new(()), false)
            .map_err(StreamError::from_h2)?;
        let control = Arc::new(Mutex::new(control));
        let state = ConnectionState::new(remote, counts, counters);
        if let Some(ping_pong) = connection.ping_pong() {
            let heartbeat = Arc::downgrade(&control);
            tokio::spawn(keep_alive(ping_pong, heartbeat, state.clone(), tuning));
        }
        Ok(ServerConnection {
            connection,
            control,
            state,
            leaving: None,
            ready: std::collections::VecDeque::new(),
        })
    }

    /// Sends one encoded control message (welcome, go-away; see
    /// [`crate::control`]) on the client's control stream. They are a few
    /// bytes, so they skip flow control and never wait.
    pub fn send_control(&mut self, encoded: Bytes) -> Result<(), h2::Error> {
        lock(&self.control).send_data(encoded, false)
    }

    /// The next request stream, answered at once with the `200` head that
    /// tells the client the relay has it. Drives the connection while it
    /// waits; `Err` once the connection is over.
    pub async fn accept_stream(&mut self) -> Result<(H2Send, H2Recv), Ended> {
        loop {
            // Streams read in one go are handed out before the connection
            // is driven again, so their heads leave in one write when it
            // is (one segment for a burst, not one per stream), and still
            // before any of their handlers has run.
            if let Some(accepted) = self.ready.pop_front() {
                match answer(accepted) {
                    Some(stream) => return Ok(stream),
                    None => continue,
                }
            }
            let (connection, control) = (&mut self.connection, &self.control);
            let next = tokio::select! {
                _ = self.state.closed.cancelled() => {
                    return Err(Ended::failed(self.state.reason().unwrap_or_default()));
                }
                reset = std::future::poll_fn(|cx| lock(control).poll_reset(cx)), if self.leaving.is_none() => {
                    // The client is leaving this connection; its streams in
                    // flight still need the connection driven to the end.
                    self.leaving = Some(reset.ok().map(code_for));
                    continue;
                }
                next = connection.accept() => next,
            };
            match next {
                Some(Ok(accepted)) => {
                    self.ready.push_back(accepted);
                    while let Some(Some(Ok(more))) =
                        futures_util::FutureExt::now_or_never(self.connection.accept())
                    {
                        self.ready.push_back(more);
                    }
                }
                Some(Err(e)) => return Err(Ended::failed(e.to_string())),
                None => {
                    // The client said goodbye: let its last streams finish.
                    // Its control stream's reset may have come in the same
                    // read as its goodbye: look once more for its code.
                    if self.leaving.is_none() {
                        let control = &self.control;
                        let reset = std::future::poll_fn(|cx| lock(control).poll_reset(cx));
                        if let Some(reset) = futures_util::FutureExt::now_or_never(reset) {
                            self.leaving = Some(reset.ok().map(code_for));
                        }
                    }
                    tokio::select! {
                        _ = self.state.closed.cancelled() => {}
                        _ = std::future::poll_fn(|cx| self.connection.poll_closed(cx)) => {}
                    }
                    return Err(Ended {
                        reason: "closed by the client".to_owned(),
                        code: self.leaving.flatten(),
                    });
                }
            }
        }
    }

    /// A handle that ends this connection from elsewhere.
    pub fn closer(&self) -> Closer {
        Closer(self.state.clone())
    }
}

/// Answers an accepted request stream with the `200` head that tells the
/// client the relay has it; `None` for a stream that is not a request
/// stream (reset) or that went away.
fn answer((request, mut respond): AcceptedStream) -> Option<(H2Send, H2Recv)> {
    if request.uri().path() != STREAM_PATH {
        respond.send_reset(Reason::PROTOCOL_ERROR);
        return None;
    }
    let send = respond.send_response(http::Response::new(()), false).ok()?;
    let stream = Arc::new(Mutex::new(send));
    let recv = H2Recv {
        state: RecvState::Open(request.into_body()),
        pending: Bytes::new(),
        stream: stream.clone(),
        head_arrived: None,
        cancel_on_drop: false,
        ended: false,
    };
    Some((H2Send::new(stream, None), recv))
}

impl Drop for ServerConnection {
    fn drop(&mut self) {
        // Stops its keep-alive task and lets go of the counter handle.
        self.state.close("connection ended".to_owned());
    }
}
