//! What configures the upstream and can be wrong with it: the relay's API
//! key, and why a configured upstream URL, key or TLS setup is unusable.
//! Both the upstream client and the key ring use them.

/// The upstream API key held by the relay; never printed.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key read from the environment.
    pub fn new(key: String) -> Self {
        ApiKey(key)
    }

    /// The key itself, for the one place that builds its header.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Why the upstream base URL or key is unusable.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    /// The URL is not `http(s)://host[:port][/base]`.
    #[error("upstream URL {url:?} is not usable: {why}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The API key cannot be an HTTP header value.
    #[error("the API key contains characters not allowed in an HTTP header")]
    BadKey,
    /// TLS for the upstream could not be set up.
    #[error("upstream TLS: {0}")]
    Tls(#[from] rustls::Error),
}
