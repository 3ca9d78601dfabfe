//! Whether an HTTP `Host` header names this machine: the DNS-rebinding
//! defence of every endpoint passage serves on loopback.

/// Whether a `Host` value names this machine: `localhost` (or a name
/// under it), an IPv4 loopback address or `[::1]`, with any port.
pub fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, port)) if port.is_empty() || port.starts_with(':') => inside,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        for host in [
            "localhost",
            "localhost:8710",
            "127.0.0.1:8710",
            "127.9.9.9",
            "[::1]:8710",
            "[::1]",
            "app.localhost:1",
            "LOCALHOST.",
        ] {
            assert!(is_loopback_host(host.as_bytes()), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8710",
            "10.0.0.1:8710",
            "[::2]:1",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "[::1]x",
        ] {
            assert!(!is_loopback_host(host.as_bytes()), "{host}");
        }
    }
}
