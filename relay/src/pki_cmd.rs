//! The PKI commands of `passage-relay`: `init` makes the CA and relay
//! certificate, `issue` writes one client bundle.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use passage_shared::pki::{PkiDir, write_new_file};

/// `passage-relay init`: makes the CA and the relay certificate in `dir`.
pub fn init(dir: &Path, hosts: &[String]) -> anyhow::Result<()> {
    let pki = PkiDir::new(dir);
    pki.init(hosts)
        .with_context(|| format!("initialising the PKI in {}", dir.display()))?;
    let names = if hosts.is_empty() {
        passage_shared::pki::DEFAULT_RELAY_HOSTS.join(", ")
    } else {
        hosts.join(", ")
    };
    println!(
        "created the CA and the relay certificate (for {names}) in {}",
        dir.display()
    );
    println!(
        "next: passage-relay issue --dir {} --name NAME --relay HOST:PORT",
        dir.display()
    );
    Ok(())
}

/// `passage-relay issue`: signs a client certificate and writes its bundle.
pub fn issue(
    dir: &Path,
    name: &str,
    relays: &[String],
    server_name: Option<&str>,
    days: i64,
    out: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    if relays.is_empty() {
        bail!("at least one --relay HOST:PORT is needed");
    }
    for relay in relays {
        check_relay_address(relay)?;
    }
    if days <= 0 {
        bail!("--days must be positive");
    }
    let pki = PkiDir::new(dir);
    let bundle = pki
        .issue_client(name, relays, server_name, days)
        .with_context(|| format!("issuing a certificate for {name:?} from {}", dir.display()))?;
    let out = out.unwrap_or_else(|| pki.bundle_path(name));
    let text = bundle.to_toml().context("encoding the bundle")?;
    write_new_file(&out, text.as_bytes(), 0o600)
        .with_context(|| format!("writing the bundle for {name:?}"))?;
    println!(
        "wrote the bundle for {name:?} to {} (mode 0600)",
        out.display()
    );
    println!("copy it to the client machine and run: passage-client run --bundle FILE");
    Ok(out)
}

/// `HOST:PORT` with a port number; IPv6 hosts in brackets.
pub fn check_relay_address(address: &str) -> anyhow::Result<()> {
    let (host, port) = address
        .rsplit_once(':')
        .with_context(|| format!("relay address {address:?} must be HOST:PORT"))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("relay address {address:?} has no valid port"))?;
    if host.is_empty() || (host.contains(':') && !(host.starts_with('[') && host.ends_with(']'))) {
        bail!("relay address {address:?}: put IPv6 hosts in brackets, e.g. [::1]:4433");
    }
    Ok(())
}
