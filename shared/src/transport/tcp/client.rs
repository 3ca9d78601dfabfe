//! The client's side of a TCP tunnel connection: dialing the relay (TCP,
//! TLS, HTTP/2, the control stream) and opening request streams on it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::connection::{ConnectionState, keep_alive};
use super::socket::{CountedTcp, counter_handle, kernel_counters, tune_socket};
use super::stream::{Delivery, H2Recv, H2Send, RecvState};
use super::stream_error::StreamError;
use super::{CONTROL_PATH, MAX_FRAME_SIZE, MAX_HEADER_LIST, STREAM_PATH, windows};
use crate::transport::TransportTuning;

/// Why a connection to a relay could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection failed.
    #[error("TCP: {0}")]
    Tcp(io::Error),
    /// The server name is not a valid TLS name.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(io::Error),
    /// The HTTP/2 handshake or the control stream failed.
    #[error("HTTP/2: {0}")]
    Http2(StreamError),
}

/// The client's end of one TCP tunnel connection; cheap to clone.
#[derive(Clone)]
pub struct ClientConnection {
    send_request: h2::client::SendRequest<Bytes>,
    state: Arc<ConnectionState>,
    stream_uri: http::Uri,
}

impl std::fmt::Debug for ClientConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConnection")
            .field("remote", &self.state.remote)
            .finish_non_exhaustive()
    }
}

/// The client's control stream: the relay's welcome and go-away arrive on
/// `recv`; `send` stays open while the connection lives.
pub struct ControlStream {
    /// The relay's control frames.
    pub recv: H2Recv,
    /// The client's side, open for the connection's life.
    pub send: H2Send,
}

impl ClientConnection {
    /// Connects to `addr`, verifies the relay as `server_name` with `tls`
    /// (whose ALPN must be [`crate::frame::ALPN_TCP`]), sets up HTTP/2 and
    /// opens the control stream. The relay's welcome is the caller's to read.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
        tuning: TransportTuning,
    ) -> Result<(ClientConnection, ControlStream), ConnectError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| ConnectError::ServerName(server_name.to_owned()))?;
        let started = Instant::now();
        let tcp = TcpStream::connect(addr).await.map_err(ConnectError::Tcp)?;
        // The TCP handshake took one round trip: the first RTT estimate,
        // until the first keep-alive measures it again.
        let first_rtt = started.elapsed();
        tune_socket(&tcp, &tuning);
        let counters = counter_handle(&tcp);
        let (io, counts) = CountedTcp::new(tcp);
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, io)
            .await
            .map_err(ConnectError::Tls)?;
        let (send_request, mut connection) = h2_handshake(tls, &tuning).await?;
        let state = ConnectionState::new(addr, counts, counters);
        state
            .rtt_micros
            .store(first_rtt.as_micros().max(1) as u64, Ordering::Relaxed);
        let ping_pong = connection.ping_pong();
        tokio::spawn(drive(connection, state.clone()));
        let Some((stream_uri, control_uri)) = stream_uris(server_name, addr.port()) else {
            return Err(ConnectError::ServerName(server_name.to_owned()));
        };
        let connection = ClientConnection {
            send_request,
            state,
            stream_uri,
        };
        let (send, recv) = connection
            .open(control_uri)
            .await
            .map_err(ConnectError::Http2)?;
        if let Some(ping_pong) = ping_pong {
            let heartbeat = Arc::downgrade(&send.stream);
            tokio::spawn(keep_alive(
                ping_pong,
                heartbeat,
                connection.state.clone(),
                tuning,
            ));
        }
        Ok((connection, ControlStream { recv, send }))
    }

    /// Opens a request stream, waiting while the relay's stream limit is reached.
    pub async fn open_stream(&self) -> Result<(H2Send, H2Recv), StreamError> {
        self.open(self.stream_uri.clone()).await
    }

    async fn open(&self, uri: http::Uri) -> Result<(H2Send, H2Recv), StreamError> {
        let lost = |e: h2::Error| match self.state.reason() {
            Some(reason) => StreamError::ConnectionLost(reason),
            None => StreamError::from_h2(e),
        };
        let mut send_request = self.send_request.clone().ready().await.map_err(lost)?;
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        let sent_before = self.state.counts.sent.load(Ordering::Relaxed);
        let (response, send) = send_request.send_request(request, false).map_err(lost)?;
        // The stream may wait in h2's queue while the relay's stream limit
        // is reached: it is open once this handle is ready again.
        std::future::poll_fn(|cx| send_request.poll_ready(cx))
            .await
            .map_err(lost)?;
        let stream = Arc::new(Mutex::new(send));
        let head_arrived = Arc::new(AtomicBool::new(false));
        let recv = H2Recv {
            state: RecvState::Waiting(response),
            pending: Bytes::new(),
            stream: stream.clone(),
            head_arrived: Some(head_arrived.clone()),
            cancel_on_drop: true,
            ended: false,
        };
        let send = H2Send::new(
            stream,
            Some(Delivery {
                head_arrived,
                sent_before,
                state: self.state.clone(),
            }),
        );
        Ok((send, recv))
    }

    /// Ends the connection now; streams still open on it fail.
    pub fn close(&self, reason: &str) {
        self.state.close(reason.to_owned());
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        if self.state.closed.is_cancelled() {
            Some(self.state.reason().unwrap_or_default())
        } else {
            None
        }
    }

    /// Resolves when the connection has ended, with the reason.
    pub async fn closed(&self) -> String {
        self.state.closed.cancelled().await;
        self.state.reason().unwrap_or_default()
    }

    /// Round-trip time of the last keep-alive.
    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.state.rtt_micros.load(Ordering::Relaxed))
    }

    /// The relay's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.state.remote
    }

    /// A count that grows whenever data arrives from the relay (TCP
    /// segments, out of order included): the tunnel's sign of life.
    pub fn heard(&self) -> u64 {
        self.state.heard()
    }

    /// Segments this end has sent and of those retransmitted, as the
    /// kernel counts them (none where it does not say, or once closed).
    pub fn sent_and_retransmitted(&self) -> Option<(u64, u64)> {
        let watch = self.state.socket.lock().ok()?;
        let counters = kernel_counters(watch.handle.as_ref()?)?;
        Some((counters.segments_out, counters.retransmitted))
    }
}

/// The client's HTTP/2 handshake on a verified TLS connection, with the
/// windows and limits from the tuning.
async fn h2_handshake(
    tls: tokio_rustls::client::TlsStream<CountedTcp>,
    tuning: &TransportTuning,
) -> Result<ClientDriver, ConnectError> {
    let (stream_window, connection_window) = windows(tuning);
    h2::client::Builder::new()
        .initial_window_size(stream_window)
        .initial_connection_window_size(connection_window)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_local_error_reset_streams(None)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| ConnectError::Http2(StreamError::from_h2(e)))
}

/// What the client's HTTP/2 handshake hands over: the handle that opens
/// streams, and the connection that must be driven for them to move.
type ClientDriver = (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<tokio_rustls::client::TlsStream<CountedTcp>, Bytes>,
);

/// Drives the client's HTTP/2 connection until it ends or `state` is
/// closed, then records why.
async fn drive(
    mut connection: h2::client::Connection<tokio_rustls::client::TlsStream<CountedTcp>, Bytes>,
    state: Arc<ConnectionState>,
) {
    let reason = tokio::select! {
        ended = &mut connection => match ended {
            Ok(()) => "closed by the relay".to_owned(),
            Err(e) => e.to_string(),
        },
        _ = state.closed.cancelled() => String::new(),
    };
    state.close(reason);
    // Dropping the connection fails every stream still open on it.
}

/// The URIs of the request streams and of the control stream on the relay
/// at `server_name:port`; `None` if they do not make a valid URI.
fn stream_uris(server_name: &str, port: u16) -> Option<(http::Uri, http::Uri)> {
    let authority = format!("{server_name}:{port}");
    let uri = |path: &str| {
        http::Uri::builder()
            .scheme("https")
            .authority(authority.as_str())
            .path_and_query(path)
            .build()
            .ok()
    };
    Some((uri(STREAM_PATH)?, uri(CONTROL_PATH)?))
}
