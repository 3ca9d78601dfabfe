//! What both ends of passage share: the wire protocol (frames and their
//! codec), header mapping, the PKI, TLS and QUIC configuration, the client
//! bundle format and the OpenAI-shaped error body.
//!
//! The request path is app → client → [`frame`] → relay → upstream; this
//! crate owns everything on that path that both programs must agree on.
//! Its modules, by concern:
//!
//! - the wire: [`frame`] (frames and their codec), [`http_map`] (headers
//!   in frames), [`body`] (a stream's body frames as an HTTP body),
//!   [`websocket`] (WebSocket messages in frames), [`error_body`] (the
//!   OpenAI-shaped error);
//! - the transports: [`transport`] (stream halves over QUIC and over TLS on
//!   TCP) and [`control`] (the relay's welcome and go-away on them);
//! - trust: [`pki`] (the private CA), [`revocation`], [`bundle`] (the
//!   client's one file), [`private_file`], [`tls`], [`cert_expiry`];
//! - the programs around it: [`process`] (start-up, logging, runtime,
//!   signals), [`config_file`] (`--config`), [`metrics_http`] (`/metrics`,
//!   `/healthz`), [`doctor`] (the doctor's report), [`loopback_host`],
//!   [`allocator`].

#![warn(missing_docs)]

pub mod allocator;
pub mod body;
pub mod bundle;
pub mod cert_expiry;
pub mod config_file;
pub mod control;
pub mod doctor;
pub mod error_body;
pub mod frame;
pub mod http_map;
pub mod loopback_host;
pub mod metrics_http;
pub mod pki;
pub mod private_file;
pub mod process;
pub mod revocation;
pub mod tls;
pub mod transport;
pub mod websocket;

/// An error and its sources, joined with ": " (what `anyhow`'s `{:#}`
/// prints), for messages built from typed errors.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
