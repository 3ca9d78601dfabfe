//! The PKI commands of `passage-relay`: `init` makes the CA and relay
//! certificate, `issue` writes one client bundle, `renew` replaces a
//! client's bundle or the relay's certificate, `revoke` and `list`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use passage_shared::bundle::relay_host;
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
    // The client verifies every relay by this one name, so it must be one
    // the relay certificate carries: catch a mismatch now, not at connect.
    let server_name = server_name.unwrap_or_else(|| relay_host(&relays[0]));
    let names = pki
        .relay_names()
        .with_context(|| format!("reading the relay certificate in {}", dir.display()))?;
    if !names.iter().any(|n| n.eq_ignore_ascii_case(server_name)) {
        bail!(
            "the relay certificate is valid for {} but clients would verify it as {server_name:?}; \
             pass --server-name with one of those names, or re-create the PKI with init --host {server_name}",
            names.join(", ")
        );
    }
    let bundle = pki
        .issue_client(name, relays, Some(server_name), days)
        .with_context(|| format!("issuing a certificate for {name:?} from {}", dir.display()))?;
    let out = out.unwrap_or_else(|| pki.bundle_path(name));
    let text = bundle.to_toml().context("encoding the bundle")?;
    // Recorded first: a certificate that exists can always be revoked.
    pki.record_issued(name, &bundle.cert)
        .with_context(|| format!("recording the certificate of {name:?}"))?;
    write_new_file(&out, text.as_bytes(), 0o600)
        .with_context(|| format!("writing the bundle for {name:?}"))?;
    println!(
        "wrote the bundle for {name:?} to {} (mode 0600)",
        out.display()
    );
    println!("copy it to the client machine and run: passage-client run --bundle FILE");
    Ok(out)
}

/// `passage-relay revoke`: puts every certificate issued to `name` on the
/// revocation list; a running relay applies it within 30 s, or on SIGHUP.
pub fn revoke(dir: &Path, name: &str) -> anyhow::Result<()> {
    let pki = PkiDir::new(dir);
    let added = pki
        .revoke(name)
        .with_context(|| format!("revoking {name:?} in {}", dir.display()))?;
    if added == 0 {
        println!("every certificate of {name:?} was already revoked");
    } else {
        println!(
            "revoked {added} certificate(s) of {name:?} in {}",
            pki.revocation_list_path().display()
        );
        println!(
            "a running relay applies it within 30 s, or at once on SIGHUP (its connections are closed)"
        );
    }
    Ok(())
}

/// `passage-relay renew --name`: a fresh bundle for an existing client
/// (same name, relays and server name, a new key and certificate), written
/// where its bundle was; the client's older certificates are revoked once
/// `grace` has passed, so the old bundle works until the new one is in
/// place. Returns the new bundle's path.
pub fn renew_client(
    dir: &Path,
    name: &str,
    grace: std::time::Duration,
    days: i64,
    out: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    if days <= 0 {
        bail!("--days must be positive");
    }
    let pki = PkiDir::new(dir);
    let out = out.unwrap_or_else(|| pki.bundle_path(name));
    let old = passage_shared::bundle::Bundle::load(&out).with_context(|| {
        format!("reading {name:?}'s bundle (its relays and server name are kept); give --out FILE if it is elsewhere")
    })?;
    if old.name != name {
        bail!(
            "{} is the bundle of {:?}, not {name:?}",
            out.display(),
            old.name
        );
    }
    let bundle = pki
        .issue_client(name, &old.relays, old.server_name.as_deref(), days)
        .with_context(|| format!("issuing a certificate for {name:?} from {}", dir.display()))?;
    let text = bundle.to_toml().context("encoding the bundle")?;
    let mut fresh = out.as_os_str().to_owned();
    fresh.push(".new");
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    write_new_file(&fresh, text.as_bytes(), 0o600)
        .with_context(|| format!("writing the new bundle for {name:?}"))?;
    let grace = time::Duration::try_from(grace).context("--grace is too long")?;
    let from = time::OffsetDateTime::now_utc() + grace;
    // The old certificates first, then the new one on record: the new one
    // is never on the list.
    let revoked = pki
        .revoke_from(name, from)
        .with_context(|| format!("revoking {name:?}'s older certificates"))?;
    pki.record_issued(name, &bundle.cert)
        .with_context(|| format!("recording the certificate of {name:?}"))?;
    std::fs::rename(&fresh, &out).with_context(|| format!("replacing {}", out.display()))?;
    println!(
        "wrote the new bundle for {name:?} to {} (mode 0600)",
        out.display()
    );
    if revoked > 0 {
        println!(
            "its {revoked} older certificate(s) stop working at {} UTC; a running relay applies that by itself",
            from.to_offset(time::UtcOffset::UTC)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        );
    }
    println!("copy it to the client machine and restart passage-client with it before then");
    Ok(out)
}

/// `passage-relay renew --server`: a new relay certificate and key from
/// the same CA for the same names; clients need no change.
pub fn renew_server(dir: &Path, days: i64) -> anyhow::Result<()> {
    if days <= 0 {
        bail!("--days must be positive");
    }
    let pki = PkiDir::new(dir);
    pki.renew_relay(days)
        .with_context(|| format!("renewing the relay certificate in {}", dir.display()))?;
    println!(
        "renewed the relay certificate in {} for {} days (the old one is kept as relay.crt.old)",
        dir.display(),
        days
    );
    println!(
        "a running relay loads it within 30 s, or at once on SIGHUP; connections open now carry on"
    );
    Ok(())
}

/// `passage-relay list`: issued client certificates, their expiry and state.
pub fn list(dir: &Path) -> anyhow::Result<()> {
    let issued = PkiDir::new(dir)
        .issued()
        .with_context(|| format!("reading the issued certificates in {}", dir.display()))?;
    if issued.is_empty() {
        println!("no client certificates issued from {}", dir.display());
        return Ok(());
    }
    let width = issued
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:width$}  {:16}  {:10}  state",
        "name", "fingerprint", "expires"
    );
    for cert in issued {
        if let Some(problem) = &cert.problem {
            println!("{}: unreadable: {problem}", cert.name);
            continue;
        }
        let state = if cert.revoked {
            "revoked".to_owned()
        } else if cert.expired {
            "expired".to_owned()
        } else if let Some(from) = &cert.revoked_from {
            format!("valid, revoked from {from} UTC")
        } else {
            "valid".to_owned()
        };
        println!(
            "{:width$}  {:16}  {:10}  {state}",
            cert.name,
            cert.fingerprint.get(..16).unwrap_or(&cert.fingerprint),
            cert.not_after
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issue_writes_a_private_bundle_naming_the_relay() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), &[]).expect("init");
        let path = issue(
            dir.path(),
            "laptop",
            &["127.0.0.1:4433".into()],
            None,
            30,
            None,
        )
        .expect("issue");
        let mode = std::fs::metadata(&path)
            .expect("bundle")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let bundle = passage_shared::bundle::Bundle::load(&path).expect("loads");
        assert_eq!(bundle.server_name.as_deref(), Some("127.0.0.1"));
        assert_eq!(bundle.relays, ["127.0.0.1:4433"]);
        assert!(
            issue(
                dir.path(),
                "laptop",
                &["127.0.0.1:4433".into()],
                None,
                30,
                None
            )
            .is_err(),
            "an existing bundle is never overwritten"
        );
    }

    #[test]
    fn issue_refuses_a_name_the_relay_certificate_lacks() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), &[]).expect("init");
        let error = issue(
            dir.path(),
            "x",
            &["relay.example:4433".into()],
            None,
            30,
            None,
        )
        .expect_err("mismatch");
        assert!(error.to_string().contains("--server-name"), "{error}");
        issue(
            dir.path(),
            "x",
            &["relay.example:4433".into()],
            Some("localhost"),
            30,
            None,
        )
        .expect("an explicit name the certificate carries");
    }

    #[test]
    fn relay_addresses_need_a_port() {
        check_relay_address("relay.example:4433").expect("plain");
        check_relay_address("[::1]:4433").expect("bracketed IPv6");
        for bad in ["relay.example", "::1:4433", "host:0", ":4433"] {
            assert!(check_relay_address(bad).is_err(), "{bad}");
        }
    }
}
