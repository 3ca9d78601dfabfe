//! The processes under test: the mock upstream, and passage-relay plus
//! passage-client as a user runs them (the same binaries and defaults),
//! each a child process so its memory can be read on its own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::linkem::command_in;

/// A child process killed when dropped.
pub struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    /// Starts `command` as a child killed on drop.
    pub fn spawn(name: &'static str, command: &mut Command) -> anyhow::Result<Proc> {
        let child = command
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc { child, name })
    }

    /// The process id.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .id()
            .with_context(|| format!("{} has exited", self.name))
    }

    /// Resident memory now, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        proc_status_kib(self.pid()?, "VmRSS")
    }

    /// Peak resident memory since start or the last [`Proc::reset_peak`], KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        proc_status_kib(self.pid()?, "VmHWM")
    }

    /// CPU time used so far (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> anyhow::Result<u64> {
        cpu_ticks(self.pid()?)
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {limit:?}", self.name))?
            .with_context(|| format!("waiting for {}", self.name))
    }

    /// Resets the peak-RSS mark (Linux `clear_refs` 5).
    pub fn reset_peak(&self) -> anyhow::Result<()> {
        let path = format!("/proc/{}/clear_refs", self.pid()?);
        std::fs::write(&path, "5").with_context(|| format!("writing {path}"))
    }
}

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// CPU time (user + system) of process `pid` so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed stat")?
        .1
        .split_whitespace()
        .collect();
    let field =
        |i: usize| -> anyhow::Result<u64> { Ok(fields.get(i).context("short stat")?.parse()?) };
    // utime and stime are fields 14 and 15 of stat; here 11 and 12.
    Ok(field(11)? + field(12)?)
}

/// `pid` and its direct children (nginx's master and its workers).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

/// Sends `signal` (a name such as `TERM`) to `pids` with the kill program.
pub fn send_signal(signal: &str, pids: &[u32]) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(u32::to_string))
        .status()
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -{signal} {pids:?} failed");
    Ok(())
}

/// The machine's CPU time so far from `/proc/stat`, in ticks: (idle, all).
/// Idle counts `idle` and `iowait`; all counts the first eight states
/// (`guest` time is already inside `user`).
pub fn machine_ticks() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|line| line.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("malformed cpu line in /proc/stat")?;
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok((idle, ticks.iter().sum()))
}

/// The share of the machine's CPU time that was idle between two
/// [`machine_ticks`] readings, from 0 to 1.
pub fn idle_share(before: (u64, u64), after: (u64, u64)) -> f64 {
    let all = after.1.saturating_sub(before.1);
    if all == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 / all as f64
}

/// Clock ticks per second of `/proc/PID/stat` times (USER_HZ, 100 on Linux).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// A free port on 127.0.0.1 (bound and released, so a small race remains).
pub fn free_port(udp: bool) -> anyhow::Result<u16> {
    if !udp {
        return Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port());
    }
    // A relay serves QUIC and TCP on the same port: both must be free.
    for _ in 0..100 {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP on 127.0.0.1")
}

/// A port free on 127.0.0.1 for both UDP and TCP (the relay serves both
/// on one port number), bound and released, so a small race remains.
pub fn free_port_pair() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP in 100 tries")
}

/// The mock upstream process.
pub struct Upstream {
    /// Its process.
    pub proc: Proc,
    /// Its base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its address.
    pub addr: SocketAddr,
}

impl Upstream {
    /// Starts `passage-mock-upstream` from `bin_dir`.
    pub async fn start(bin_dir: &Path) -> anyhow::Result<Upstream> {
        Upstream::start_in(bin_dir, None).await
    }

    /// Starts `passage-mock-upstream` inside network namespace `netns`
    /// (its loopback there), or in this one.
    pub async fn start_in(bin_dir: &Path, netns: Option<&str>) -> anyhow::Result<Upstream> {
        Upstream::start_with(bin_dir, netns, &[]).await
    }

    /// Starts `passage-mock-upstream` with `args` (e.g. `--h2-streams N`).
    pub async fn start_with(
        bin_dir: &Path,
        netns: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<Upstream> {
        let mut command = command_in(netns, &bin_dir.join("passage-mock-upstream"));
        command
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut proc = Proc::spawn("the mock upstream", &mut command)?;
        let url = first_line(&mut proc, "the mock upstream").await?;
        let addr = url
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("mock upstream address {url:?}"))?;
        Ok(Upstream { proc, url, addr })
    }
}

/// Two `passage-hop` processes in a chain in front of the upstream: the
/// floor for passage's two extra processes (see `src/bin/passage-hop.rs`).
pub struct HopChain {
    /// The hop the load connects to.
    pub near: Proc,
    /// The hop that connects to the upstream.
    pub far: Proc,
    /// The chain's base URL, `http://127.0.0.1:PORT`.
    pub url: String,
}

impl HopChain {
    /// Starts the far hop (forwarding to `upstream`) and the near hop (forwarding to the far one).
    pub async fn start(bin_dir: &Path, upstream: SocketAddr) -> anyhow::Result<HopChain> {
        let (far, far_addr) = start_hop(bin_dir, upstream).await?;
        let (near, near_addr) = start_hop(bin_dir, far_addr).await?;
        Ok(HopChain {
            near,
            far,
            url: format!("http://{near_addr}"),
        })
    }
}

async fn start_hop(bin_dir: &Path, to: SocketAddr) -> anyhow::Result<(Proc, SocketAddr)> {
    let mut command = Command::new(bin_dir.join("passage-hop"));
    command
        .args(["--listen", "127.0.0.1:0", "--to", &to.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut proc = Proc::spawn("passage-hop", &mut command)?;
    let addr = first_line(&mut proc, "passage-hop").await?;
    let addr = addr
        .parse()
        .with_context(|| format!("passage-hop address {addr:?}"))?;
    Ok((proc, addr))
}

/// The first line `proc` prints on its piped stdout (its address).
pub async fn first_line(proc: &mut Proc, name: &str) -> anyhow::Result<String> {
    let stdout = proc
        .child
        .stdout
        .take()
        .with_context(|| format!("{name} stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .with_context(|| format!("{name} did not report its address"))??
        .with_context(|| format!("{name} exited"))
}

/// How to start the tunnel.
#[derive(Debug, Default, Clone)]
pub struct TunnelOptions {
    /// Extra arguments for `passage-relay serve`.
    pub relay_args: Vec<String>,
    /// Extra arguments for `passage-client run`.
    pub client_args: Vec<String>,
    /// Address the client dials instead of the relay's own (an impairment forwarder).
    pub via: Option<SocketAddr>,
    /// Port for the relay, UDP and TCP (default: one free for both).
    pub relay_port: Option<u16>,
    /// Address the relay listens on and the client dials (default 127.0.0.1).
    pub relay_ip: Option<IpAddr>,
    /// Network namespace for passage-relay (default: this one).
    pub relay_netns: Option<String>,
    /// Network namespace for passage-client (default: this one); the
    /// client's URL is then reachable only from inside it.
    pub client_netns: Option<String>,
}

/// passage-relay and passage-client running against an upstream.
pub struct Tunnel {
    /// The relay process.
    pub relay: Proc,
    relay_bin: PathBuf,
    relay_args: Vec<String>,
    relay_netns: Option<String>,
    client_netns: Option<String>,
    relay_log: PathBuf,
    relay_starts: u32,
    /// The client process.
    pub client: Proc,
    /// The client's base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// The client's local address.
    pub addr: SocketAddr,
    /// The relay's UDP address.
    pub relay_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Tunnel {
    /// Makes a PKI, starts both programs, and waits until `/healthz` is 200.
    pub async fn start(
        bin_dir: &Path,
        upstream_url: &str,
        options: &TunnelOptions,
    ) -> anyhow::Result<Tunnel> {
        let dir = tempfile::tempdir()?;
        let pki = dir.path().join("pki");
        let relay_bin = bin_dir.join("passage-relay");
        let relay_port = match options.relay_port {
            Some(port) => port,
            None => free_port_pair()?,
        };
        let relay_ip = options.relay_ip.unwrap_or(Ipv4Addr::LOCALHOST.into());
        let relay_addr = SocketAddr::new(relay_ip, relay_port);
        let dialled = options.via.unwrap_or(relay_addr);
        let bundle = dir.path().join("bench.toml");
        make_identities(&relay_bin, &pki, relay_ip, dialled, &bundle).await?;

        let mut relay_args: Vec<String> = vec![
            "serve".into(),
            "--pki".into(),
            pki.display().to_string(),
            "--listen".into(),
            relay_addr.to_string(),
            "--upstream".into(),
            upstream_url.to_owned(),
        ];
        relay_args.extend(options.relay_args.iter().cloned());
        let relay_log = dir.path().join("relay.log");
        let relay_netns = options.relay_netns.clone();
        let relay = spawn_relay(&relay_bin, relay_netns.as_deref(), &relay_args, &relay_log)?;
        let client_port = free_port(false)?;
        let client_log = std::fs::File::create(dir.path().join("client.log"))?;
        let client = Proc::spawn(
            "passage-client",
            command_in(
                options.client_netns.as_deref(),
                &bin_dir.join("passage-client"),
            )
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            // Remembered transports stay in this tunnel's directory.
            .env("XDG_STATE_HOME", dir.path())
            .args(["--listen", &format!("127.0.0.1:{client_port}")])
            .args(&options.client_args)
            .stdout(Stdio::null())
            .stderr(client_log),
        )?;
        let tunnel = Tunnel {
            relay,
            relay_bin,
            relay_args,
            relay_netns,
            client_netns: options.client_netns.clone(),
            relay_log,
            relay_starts: 1,
            client,
            url: format!("http://127.0.0.1:{client_port}"),
            addr: ([127, 0, 0, 1], client_port).into(),
            relay_addr,
            _dir: dir,
        };
        tunnel.wait_until_up(Duration::from_secs(15)).await?;
        Ok(tunnel)
    }

    async fn wait_until_up(&self, limit: Duration) -> anyhow::Result<()> {
        let url = format!("{}/healthz", self.url);
        let up = match &self.client_netns {
            Some(ns) => crate::linkem::in_netns(ns, move || wait_for_ok(url, limit)).await,
            None => wait_for_ok(url, limit).await,
        };
        up.map_err(|e| {
            let tail = |path: &Path| {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(15)..].join("\n")
            };
            anyhow::anyhow!(
                "{e:#}\nclient log:\n{}\nrelay log:\n{}",
                tail(&self.client_log()),
                tail(&self.relay_log)
            )
        })
    }

    /// The client's network namespace, if it runs in one.
    pub fn client_netns(&self) -> Option<&str> {
        self.client_netns.as_deref()
    }

    /// The current relay process's log file.
    pub fn relay_log(&self) -> &Path {
        &self.relay_log
    }

    /// The client's log file.
    pub fn client_log(&self) -> PathBuf {
        self._dir.path().join("client.log")
    }

    /// Stops the relay with SIGTERM (it drains, then exits), waits up to
    /// `limit` for it to exit, and starts it again on the same address.
    pub async fn restart_relay(&mut self, limit: Duration) -> anyhow::Result<()> {
        let pid = self.relay.pid()?;
        send_signal("TERM", &[pid])?;
        let status = tokio::time::timeout(limit, self.relay.child.wait())
            .await
            .with_context(|| format!("the relay did not exit within {limit:?} of SIGTERM"))??;
        anyhow::ensure!(
            status.success(),
            "the relay exited with {status} after SIGTERM"
        );
        self.relay_starts += 1;
        let log = self
            .relay_log
            .with_file_name(format!("relay-{}.log", self.relay_starts));
        self.relay = spawn_relay(
            &self.relay_bin,
            self.relay_netns.as_deref(),
            &self.relay_args,
            &log,
        )?;
        self.relay_log = log;
        Ok(())
    }

    /// Resident memory of client and relay, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        Ok((self.client.rss_kib()?, self.relay.rss_kib()?))
    }
}

/// Polls `url` until it answers 200, for at most `limit`.
async fn wait_for_ok(url: String, limit: Duration) -> anyhow::Result<()> {
    let client = crate::http::client();
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Ok(response)) =
            tokio::time::timeout(Duration::from_secs(2), crate::http::get(&client, &url)).await
            && response.status() == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the tunnel did not come up within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_relay(
    program: &Path,
    netns: Option<&str>,
    args: &[String],
    log: &Path,
) -> anyhow::Result<Proc> {
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Proc::spawn(
        "passage-relay",
        command_in(netns, program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log),
    )
}

/// Runs `command` to its end; its stderr becomes the error when it fails.
pub async fn run_quiet(command: &mut Command) -> anyhow::Result<()> {
    let output = command.output().await.context("running a PKI command")?;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// Waits up to 5 s for `what` to accept TCP connections on 127.0.0.1:`port`.
pub async fn wait_listening(what: &str, port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("{what} did not start listening on port {port}")
}

/// Finds a program on PATH or in the usual sbin directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Makes a CA and the relay's identity in `pki` (naming `relay_ip` too when
/// it is not loopback) and issues the client bundle `bundle` that dials `dialled`.
async fn make_identities(
    relay_bin: &Path,
    pki: &Path,
    relay_ip: IpAddr,
    dialled: SocketAddr,
    bundle: &Path,
) -> anyhow::Result<()> {
    let mut init = Command::new(relay_bin);
    init.arg("init").arg("--dir").arg(pki);
    if !relay_ip.is_loopback() {
        // The relay's certificate must name the address the client dials.
        for host in [
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            relay_ip.to_string(),
        ] {
            init.arg("--host").arg(host);
        }
    }
    run_quiet(&mut init).await?;
    run_quiet(
        Command::new(relay_bin)
            .args(["issue", "--name", "bench", "--relay", &dialled.to_string()])
            .arg("--dir")
            .arg(pki)
            .arg("--out")
            .arg(bundle),
    )
    .await?;
    Ok(())
}
