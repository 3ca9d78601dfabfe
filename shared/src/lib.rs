//! What both ends of passage share: the wire protocol (frames and their
//! codec), header mapping, the PKI, TLS and QUIC configuration, the client
//! bundle format and the OpenAI-shaped error body.
//!
//! The request path is app → client → [`frame`] → relay → upstream; this
//! crate owns everything on that path that both programs must agree on.

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
