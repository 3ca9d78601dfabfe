//! The stunnel pair baseline: two `stunnel4` processes in a chain, the near
//! one taking plain HTTP and carrying it over TLS 1.3 with a client
//! certificate to the far one, which checks it and connects to the upstream.
//! The same shape as passage (two extra processes, mutual TLS between
//! them), with a byte pipe instead of per-request streams; its identities
//! come from `passage-relay init` and `issue`, so both pay for the same
//! kind of keys.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::process::Command;

use crate::stack::{Proc, find_program, free_port, wait_listening};

/// A running stunnel pair in front of an upstream.
pub struct StunnelPair {
    /// The near stunnel (plain in, TLS out).
    pub near: Proc,
    /// The far stunnel (TLS in, plain out to the upstream).
    pub far: Proc,
    /// The near stunnel's base URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

/// The parts of a client bundle stunnel needs.
#[derive(serde::Deserialize)]
struct BundlePems {
    ca_cert: String,
    cert: String,
    key: String,
}

impl StunnelPair {
    /// Makes a PKI with `passage-relay` from `bin_dir` and starts the pair
    /// in front of `upstream`.
    pub async fn start(bin_dir: &Path, upstream: SocketAddr) -> anyhow::Result<StunnelPair> {
        let stunnel = find_program("stunnel4")
            .or_else(|| find_program("stunnel"))
            .context("stunnel is not installed (apt-get install stunnel4)")?;
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        let relay = bin_dir.join("passage-relay");
        let pki = root.join("pki");
        let bundle = root.join("bundle.toml");
        for args in [
            vec!["init".into(), "--dir".into(), pki.display().to_string()],
            vec![
                "issue".into(),
                "--dir".into(),
                pki.display().to_string(),
                "--name".into(),
                "stunnel".into(),
                "--relay".into(),
                "127.0.0.1:1".into(),
                "--out".into(),
                bundle.display().to_string(),
            ],
        ] {
            let status = Command::new(&relay)
                .args(&args)
                .stdout(Stdio::null())
                .status()
                .await
                .with_context(|| format!("running {}", relay.display()))?;
            if !status.success() {
                bail!("passage-relay {} failed: {status}", args[0]);
            }
        }
        let pems: BundlePems = toml::from_str(&std::fs::read_to_string(&bundle)?)
            .context("reading the client bundle")?;
        std::fs::write(root.join("client.crt"), pems.cert)?;
        std::fs::write(root.join("client.key"), pems.key)?;
        std::fs::write(root.join("ca.crt"), pems.ca_cert)?;

        let far_port = free_port(false)?;
        let near_port = free_port(false)?;
        let common = "foreground = yes\npid =\ndebug = 3\n\
                      socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
                      sslVersionMin = TLSv1.3\nverifyChain = yes\n";
        let ca = root.join("ca.crt");
        let far = format!(
            "{common}output = {log}\n[far]\naccept = 127.0.0.1:{far_port}\nconnect = {upstream}\n\
             cert = {cert}\nkey = {key}\nCAfile = {ca}\nrequireCert = yes\n",
            log = root.join("far.log").display(),
            cert = pki.join("relay.crt").display(),
            key = pki.join("relay.key").display(),
            ca = ca.display(),
        );
        let near = format!(
            "{common}output = {log}\n[near]\nclient = yes\naccept = 127.0.0.1:{near_port}\n\
             connect = 127.0.0.1:{far_port}\ncert = {cert}\nkey = {key}\nCAfile = {ca}\n",
            log = root.join("near.log").display(),
            cert = root.join("client.crt").display(),
            key = root.join("client.key").display(),
            ca = ca.display(),
        );
        let start = |name: &'static str, config: String| -> anyhow::Result<Proc> {
            let path = root.join(format!("{name}.conf"));
            std::fs::write(&path, config)?;
            Proc::spawn(
                name,
                Command::new(&stunnel)
                    .arg(&path)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
        };
        let far = start("stunnel (far)", far)?;
        let near = start("stunnel (near)", near)?;
        wait_listening("stunnel (far)", far_port).await?;
        wait_listening("stunnel (near)", near_port).await?;
        Ok(StunnelPair {
            near,
            far,
            url: format!("http://127.0.0.1:{near_port}"),
            _dir: dir,
        })
    }

    /// The two stunnel processes.
    pub fn pids(&self) -> Vec<u32> {
        [&self.near, &self.far]
            .iter()
            .filter_map(|p| p.pid().ok())
            .collect()
    }
}
