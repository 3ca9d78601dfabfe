//! The processes of the test bed, each started in its namespace with `ip
//! netns exec` (mock upstream and relay on the relay side, passage-client on
//! the client side), and what a request's outcome records.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::Command;

use super::app::Client;
use super::bed::{RELAY_ADDR, TestBed};
use crate::http::client;
use crate::stack::{Proc, first_line, run_quiet};

/// The relay's port, UDP (QUIC) and TCP alike.
pub const RELAY_PORT: u16 = 4433;

/// Which transport the client is told to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC first, TCP raced after a head start (the default).
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl Transport {
    /// The flag value, and the name `/healthz` reports.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

/// What the binaries under test can do (read from their `--help`).
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// `passage-client run` takes `--transport`.
    pub client_transport: bool,
    /// `passage-relay serve` serves TCP (it takes `--no-tcp`).
    pub relay_tcp: bool,
    /// `passage-client doctor` exists.
    pub doctor: bool,
}

impl Capabilities {
    /// Reads the capabilities from the binaries in `bin_dir`.
    pub fn detect(bin_dir: &Path) -> anyhow::Result<Capabilities> {
        let help = |program: &str, command: &str| -> anyhow::Result<String> {
            let output = std::process::Command::new(bin_dir.join(program))
                .args([command, "--help"])
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("running {program} {command} --help"))?;
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        };
        Ok(Capabilities {
            client_transport: help("passage-client", "run")?.contains("--transport"),
            relay_tcp: help("passage-relay", "serve")?.contains("--no-tcp"),
            doctor: help("passage-client", "doctor")?.contains("--bundle"),
        })
    }

    /// Whether the client can be told to use `transport`.
    pub fn supports(self, transport: Transport) -> bool {
        match transport {
            Transport::Auto | Transport::Quic => true,
            Transport::Tcp => self.client_transport && self.relay_tcp,
        }
    }
}

/// The PKI, the mock upstream, the relay (when running) and the logs.
pub struct Stack {
    /// The test bed the processes run in.
    pub bed: Arc<TestBed>,
    /// What the binaries can do.
    pub caps: Capabilities,
    bin_dir: PathBuf,
    logs: PathBuf,
    pki: PathBuf,
    bundle: PathBuf,
    upstream_url: String,
    _upstream: Proc,
    relay: Option<Proc>,
    relay_starts: u32,
    client_starts: u16,
}

impl Stack {
    /// Makes the PKI and starts the mock upstream and the relay in the relay
    /// namespace; logs go to `logs`.
    pub async fn start(
        bed: Arc<TestBed>,
        bin_dir: &Path,
        logs: &Path,
        caps: Capabilities,
    ) -> anyhow::Result<Stack> {
        let relay_bin = bin_dir.join("passage-relay");
        let pki = logs.join("pki");
        let bundle = logs.join("client.toml");
        let relay_addr = format!("{RELAY_ADDR}:{RELAY_PORT}");
        run_quiet(
            Command::new(&relay_bin)
                .arg("init")
                .arg("--dir")
                .arg(&pki)
                .args(["--host", &RELAY_ADDR.to_string()]),
        )
        .await
        .context("passage-relay init")?;
        run_quiet(
            Command::new(&relay_bin)
                .args(["issue", "--name", "hostile", "--relay", &relay_addr])
                .arg("--dir")
                .arg(&pki)
                .arg("--out")
                .arg(&bundle),
        )
        .await
        .context("passage-relay issue")?;

        let upstream_log = std::fs::File::create(logs.join("mock-upstream.log"))
            .context("creating the mock upstream's log")?;
        let mut upstream = Proc::spawn(
            "the mock upstream",
            Command::new(bed.ip())
                .args(["netns", "exec", &bed.names.relay_ns])
                .arg(bin_dir.join("passage-mock-upstream"))
                .args(["--listen", "127.0.0.1:0"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(upstream_log),
        )?;
        let upstream_url = first_line(&mut upstream, "the mock upstream").await?;
        let mut stack = Stack {
            bed,
            caps,
            bin_dir: bin_dir.to_owned(),
            logs: logs.to_owned(),
            pki,
            bundle,
            upstream_url,
            _upstream: upstream,
            relay: None,
            relay_starts: 0,
            client_starts: 0,
        };
        stack.start_relay()?;
        Ok(stack)
    }

    /// Creates the log file `name` in the log directory.
    fn log_file(&self, name: &str) -> anyhow::Result<std::fs::File> {
        let path = self.logs.join(name);
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
    }

    /// Starts a relay in the relay namespace (logs to `relay-N.log`).
    pub fn start_relay(&mut self) -> anyhow::Result<()> {
        self.relay_starts += 1;
        let log = self.log_file(&format!("relay-{}.log", self.relay_starts))?;
        let relay = Proc::spawn(
            "passage-relay",
            Command::new(self.bed.ip())
                .args(["netns", "exec", &self.bed.names.relay_ns])
                .arg(self.bin_dir.join("passage-relay"))
                .arg("serve")
                .arg("--pki")
                .arg(&self.pki)
                .args(["--listen", &format!("{RELAY_ADDR}:{RELAY_PORT}")])
                .args(["--upstream", &self.upstream_url])
                .args(["--drain-timeout", "2"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        self.relay = Some(relay);
        Ok(())
    }

    /// Starts the relay unless one is running.
    pub fn ensure_relay(&mut self) -> anyhow::Result<()> {
        if self.relay.is_none() {
            self.start_relay()?;
        }
        Ok(())
    }

    /// Sends the relay `signal` and waits up to `limit` for it to exit.
    pub async fn stop_relay(
        &mut self,
        signal: rustix::process::Signal,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let mut relay = self.relay.take().context("no relay is running")?;
        let pid = relay.pid()?;
        let pid = rustix::process::Pid::from_raw(pid as i32).context("relay pid")?;
        rustix::process::kill_process(pid, signal)
            .with_context(|| format!("signalling the relay ({signal:?})"))?;
        relay.wait_exit(limit).await?;
        Ok(())
    }

    /// Starts passage-client in the client namespace with `transport` (the
    /// flag is left out where the build has none, so `Auto` and `Quic` mean
    /// its only transport, QUIC). Each client gets its own ports and log.
    pub fn start_client(&mut self, transport: Transport) -> anyhow::Result<Client> {
        anyhow::ensure!(
            self.caps.supports(transport),
            "this build's client has no {} transport",
            transport.name()
        );
        self.client_starts += 1;
        let n = self.client_starts;
        let port = 18_700 + n;
        let metrics_port = 19_700 + n;
        let log = self.log_file(&format!("client-{n}-{}.log", transport.name()))?;
        let mut command = Command::new(self.bed.ip());
        command
            .args(["netns", "exec", &self.bed.names.client_ns])
            .arg(self.bin_dir.join("passage-client"))
            .arg("run")
            .arg("--bundle")
            .arg(&self.bundle)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.caps.client_transport {
            // Every scenario starts as a new user would: no remembered
            // transport from the scenario before.
            command.args(["--transport", transport.name(), "--state-file", "none"]);
        }
        let started = Instant::now();
        let proc = Proc::spawn("passage-client", &mut command)?;
        Ok(Client {
            _proc: proc,
            base: format!("http://127.0.0.1:{port}"),
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            http: client(),
            started,
            implied_quic: !self.caps.client_transport,
        })
    }
}

/// What `passage-client doctor --json` found, run in the client namespace.
#[derive(Debug, Clone)]
pub struct DoctorFinding {
    /// Its exit code.
    pub code: i32,
    /// The check it names as the first failure.
    pub first_failure: Option<String>,
    /// Each check's name and verdict, in order.
    pub verdicts: Vec<(String, String)>,
}

impl DoctorFinding {
    /// The verdict of check `name` (empty if there is none).
    pub fn verdict(&self, name: &str) -> &str {
        self.verdicts
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// The verdicts in one line, for the table.
    pub fn summary(&self) -> String {
        let checks: Vec<String> = self
            .verdicts
            .iter()
            .filter(|(name, _)| {
                ["relay", "quic", "tcp", "certificate", "upstream"].contains(&name.as_str())
            })
            .map(|(name, verdict)| format!("{name} {verdict}"))
            .collect();
        format!("exit {}, {}", self.code, checks.join(", "))
    }
}

impl Stack {
    /// Runs `passage-client doctor` on the stack's bundle in the client
    /// namespace, with a 3 s handshake limit.
    pub async fn doctor(&self) -> anyhow::Result<DoctorFinding> {
        let output = tokio::process::Command::new(self.bed.ip())
            .args(["netns", "exec", &self.bed.names.client_ns])
            .arg(self.bin_dir.join("passage-client"))
            .arg("doctor")
            .arg("--bundle")
            .arg(&self.bundle)
            .args(["--json", "--timeout", "3", "--transfer-seconds", "1"])
            .args(["--state-file", "none"])
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("running passage-client doctor")?;
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).with_context(|| {
                format!(
                    "doctor printed no JSON: {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            })?;
        let verdicts = report["checks"]
            .as_array()
            .map(|checks| {
                checks
                    .iter()
                    .map(|c| {
                        (
                            c["name"].as_str().unwrap_or_default().to_owned(),
                            c["verdict"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(DoctorFinding {
            code: output.status.code().unwrap_or(-1),
            first_failure: report["first_failure"].as_str().map(str::to_owned),
            verdicts,
        })
    }
}

/// What `/healthz` said.
#[derive(Debug, Clone)]
pub struct Health {
    /// 200 with `"status": "ok"`.
    pub up: bool,
    /// The transport of the relay in use, when the client reports one.
    pub transport: Option<String>,
}

/// How one request ended, as the app saw it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Whether it was what the scenario wanted (a whole, correct answer).
    pub ok: bool,
    /// The status, if a response head arrived.
    pub status: Option<u16>,
    /// A short description: `200`, `503 tunnel_unavailable`, `stream cut after 3/10: ...`.
    pub detail: String,
    /// When it was sent.
    pub sent: Instant,
    /// When it ended (answer complete, error, or time limit).
    pub ended: Instant,
    /// The client was not listening yet (connection refused).
    pub not_listening: bool,
}

impl Outcome {
    pub(super) fn failed(sent: Instant, status: Option<u16>, detail: String) -> Outcome {
        Outcome {
            ok: false,
            status,
            detail,
            sent,
            ended: Instant::now(),
            not_listening: false,
        }
    }

    /// Seconds from `from` to the end.
    pub fn secs_since(&self, from: Instant) -> f64 {
        self.ended.saturating_duration_since(from).as_secs_f64()
    }
}
