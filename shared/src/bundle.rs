//! The client bundle: the one TOML file `passage-relay issue` writes and
//! `passage-client run --bundle` reads. It holds everything a client needs:
//! where the relays are, the CA that vouches for them, and the client's own
//! certificate and private key.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::private_file::{PrivateRead, read_private_text};

/// Contents of a client bundle file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// The client's name, as written in its certificate.
    pub name: String,
    /// Relay addresses as `HOST:PORT`, tried in order.
    pub relays: Vec<String>,
    /// TLS server name to verify the relay against; when absent, each
    /// relay address's host is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM of the private CA; the only root the client trusts for the relay.
    pub ca_cert: String,
    /// PEM of the client certificate.
    pub cert: String,
    /// PEM of the client private key.
    pub key: String,
}

/// Why a bundle could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The file could not be read.
    #[error("cannot read bundle {path}")]
    Read {
        /// The bundle path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is readable by others (it holds the client key).
    #[error(
        "bundle {path} is readable by group or others (mode {mode:o}); it holds the client key: run chmod 600 on it"
    )]
    Exposed {
        /// The bundle path.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a valid bundle.
    #[error("bundle {path} is not valid: {message}")]
    Invalid {
        /// The bundle path.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Bundle {
    /// Reads and checks a bundle file.
    pub fn load(path: &Path) -> Result<Bundle, BundleError> {
        let text = read_private_text(path).map_err(|e| match e {
            PrivateRead::Exposed(mode) => BundleError::Exposed {
                path: path.display().to_string(),
                mode,
            },
            PrivateRead::Io(source) => BundleError::Read {
                path: path.display().to_string(),
                source,
            },
        })?;
        let invalid = |message: String| BundleError::Invalid {
            path: path.display().to_string(),
            message,
        };
        let bundle: Bundle = toml::from_str(&text).map_err(|e| invalid(e.message().to_owned()))?;
        if bundle.relays.is_empty() {
            return Err(invalid("it lists no relay address".into()));
        }
        Ok(bundle)
    }

    /// The bundle as TOML text, with a comment saying what it is.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let body = toml::to_string(self)?;
        Ok(format!(
            "# passage client bundle for \"{}\": keep it private (it holds the client key).\n\
             # Use it with: passage-client run --bundle THIS_FILE\n{body}",
            self.name
        ))
    }
}

/// The host part of a `HOST:PORT` relay address, without IPv6 brackets.
pub fn relay_host(address: &str) -> &str {
    address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

impl fmt::Debug for Bundle {
    // The private key never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("name", &self.name)
            .field("relays", &self.relays)
            .field("server_name", &self.server_name)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_host_strips_port_and_brackets() {
        assert_eq!(relay_host("relay.example:4433"), "relay.example");
        assert_eq!(relay_host("[::1]:4433"), "::1");
        assert_eq!(relay_host("10.0.0.1:1"), "10.0.0.1");
    }
}
