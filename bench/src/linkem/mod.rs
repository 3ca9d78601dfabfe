//! A packet-level link emulator (netem is not available here): two network
//! namespaces, each with a TUN device, and a userspace forwarder that
//! carries every IP packet, TCP and UDP alike, from one TUN to the other
//! with a fixed one-way delay and independent random loss per direction.
//! It generalises [`crate::impair`], which only carries UDP datagrams.
//!
//! The namespaces are named after this process (`pbench-PID-N-near`,
//! `pbench-PID-N-far`); their addresses ([`NEAR_ADDR`], [`FAR_ADDR`], in
//! the benchmark range 198.18.0.0/15) exist only inside them and route
//! nowhere else. Dropping the [`Link`] kills what runs in them and deletes
//! them; a watchdog process does the same if this process dies without
//! dropping it (a panic that aborts, SIGKILL, Ctrl-C). Needs root.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::impair::Impairment;
use crate::stats::percentile;

/// The near end's address (the client's side), inside its namespace only.
pub const NEAR_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The far end's address (the relay's side), inside its namespace only.
pub const FAR_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// MTU of both TUN devices.
pub const MTU: usize = 1500;
/// Name of the TUN device inside each namespace.
const TUN_NAME: &str = "plink0";
/// Packets in flight per direction; beyond this the queue drops, as a
/// router's would (far above what the scenarios put in flight).
const QUEUE: usize = 1 << 16;
/// Longest the watchdog waits for this process to die (it then cleans up anyway).
const WATCHDOG_LIMIT_S: u32 = 6 * 3600;

/// Why the emulator cannot run here, or `None` when it can (root, a TUN
/// device and the `ip` program).
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces and TUN devices)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if crate::stack::find_program("ip").is_none() {
        return Some("the ip program is missing (apt-get install iproute2)".into());
    }
    None
}

/// Impairment of each direction of the link.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// Packets from the near end (client) to the far end (relay).
    pub near_to_far: Impairment,
    /// Packets from the far end to the near end.
    pub far_to_near: Impairment,
}

impl LinkConfig {
    /// The same impairment both ways: round trip `rtt`, loss `loss` per direction.
    pub fn symmetric(rtt: Duration, loss: f64) -> LinkConfig {
        let each = Impairment {
            one_way_delay: rtt / 2,
            loss,
        };
        LinkConfig {
            near_to_far: each,
            far_to_near: each,
        }
    }
}

/// What one direction of the forwarder has seen.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectionCounts {
    /// Packets read from the sending TUN.
    pub packets: u64,
    /// Packets dropped by the emulated loss.
    pub lost: u64,
    /// Packets dropped because the delay queue was full (beyond the
    /// emulated loss; the figures are only clean when this is 0).
    pub overflow: u64,
}

#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    lost: AtomicU64,
    overflow: AtomicU64,
}

impl Counters {
    fn read(&self) -> DirectionCounts {
        DirectionCounts {
            packets: self.packets.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            overflow: self.overflow.load(Ordering::Relaxed),
        }
    }
}

/// A network namespace created by a [`Link`], deleted by it.
struct Namespace {
    name: String,
}

impl Namespace {
    fn add(name: String) -> anyhow::Result<Namespace> {
        ip(&["netns", "add", &name])?;
        Ok(Namespace { name })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Kills every process still running in namespace `name` (by pid, from `ip netns pids`).
fn kill_all_in(name: &str) {
    let Ok(output) = std::process::Command::new(ip_program())
        .args(["netns", "pids", name])
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|pid| *pid > 1)
    {
        // SAFETY: kill has no memory preconditions; the pid came from the namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The ip program (iproute2), found on PATH or in the sbin directories.
fn ip_program() -> std::path::PathBuf {
    crate::stack::find_program("ip").unwrap_or_else(|| "ip".into())
}

/// Runs `ip ARGS`, failing with its error output.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = std::process::Command::new(ip_program())
        .args(args)
        .output()
        .context("running ip")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Two namespaces joined by the emulated link; everything is removed on drop.
pub struct Link {
    /// Name of the near end's namespace (run the client here).
    pub near: String,
    /// Name of the far end's namespace (run the relay and upstream here).
    pub far: String,
    config: Arc<Mutex<LinkConfig>>,
    counters: Arc<[Counters; 2]>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    watchdog: Option<std::process::Child>,
    // Declared last: dropped after the tasks have been aborted.
    namespaces: Vec<Namespace>,
}

/// Links made by this process so far (keeps namespace names unique).
static LINKS: AtomicU32 = AtomicU32::new(0);

impl Link {
    /// Creates both namespaces and their TUN devices and starts forwarding
    /// with `config`. Fails (removing what it made) without root.
    pub async fn start(config: LinkConfig) -> anyhow::Result<Link> {
        if let Some(reason) = unavailable_reason() {
            bail!("the link emulator cannot run: {reason}");
        }
        let pid = std::process::id();
        let serial = LINKS.fetch_add(1, Ordering::Relaxed);
        let near = format!("pbench-{pid}-{serial}-near");
        let far = format!("pbench-{pid}-{serial}-far");
        // If the second fails, the first is dropped, and so deleted.
        let namespaces = vec![Namespace::add(near.clone())?, Namespace::add(far.clone())?];
        let watchdog = start_watchdog(pid, &[&near, &far])
            .map_err(|e| {
                eprintln!("passage-bench: no link watchdog ({e:#}); cleanup relies on drop")
            })
            .ok();
        let mut link = Link {
            near: near.clone(),
            far: far.clone(),
            config: Arc::new(Mutex::new(config)),
            counters: Arc::new([Counters::default(), Counters::default()]),
            tasks: Vec::new(),
            watchdog,
            namespaces,
        };
        let near_tun = tun_in(&near).await?;
        let far_tun = tun_in(&far).await?;
        for (ns, local, peer) in [(&near, NEAR_ADDR, FAR_ADDR), (&far, FAR_ADDR, NEAR_ADDR)] {
            let mtu = MTU.to_string();
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", TUN_NAME, "mtu", &mtu, "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{local}/32"),
                "peer",
                &format!("{peer}/32"),
                "dev",
                TUN_NAME,
            ])?;
        }
        let near_tun = Arc::new(register(near_tun).context("registering the near TUN")?);
        let far_tun = Arc::new(register(far_tun).context("registering the far TUN")?);
        for (index, from, to) in [(0, &near_tun, &far_tun), (1, &far_tun, &near_tun)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
            link.tasks.push(tokio::spawn(read_side(
                from.clone(),
                tx,
                link.config.clone(),
                link.counters.clone(),
                index,
            )));
            let to = to.clone();
            std::thread::Builder::new()
                .name("linkem writer".into())
                .spawn(move || write_side(&to, rx))
                .context("starting a link writer thread")?;
        }
        Ok(link)
    }

    /// Changes the impairment from the next packet on.
    pub fn set_config(&self, config: LinkConfig) {
        if let Ok(mut current) = self.config.lock() {
            *current = config;
        }
    }

    /// Counts so far: (near → far, far → near).
    pub fn counts(&self) -> (DirectionCounts, DirectionCounts) {
        (self.counters[0].read(), self.counters[1].read())
    }

    /// Sends `count` UDP probes `spacing` apart from the near end to an
    /// echo at the far end and times their round trips.
    pub async fn probe(&self, count: usize, spacing: Duration) -> anyhow::Result<ProbeResult> {
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        // The echo ends when told, or at the latest when every probe has had its time.
        let limit = spacing * count as u32 + Duration::from_secs(10);
        let far = self.far.clone();
        let echo =
            tokio::spawn(
                async move { in_netns(&far, move || echo(port_tx, stop_rx, limit)).await },
            );
        let port = tokio::time::timeout(Duration::from_secs(10), port_rx)
            .await
            .context("the echo did not start")?
            .context("the echo failed to start")?;
        let result = in_netns(&self.near, move || {
            send_probes(SocketAddr::from((FAR_ADDR, port)), count, spacing)
        })
        .await;
        let _ = stop_tx.send(());
        echo.await.context("echo task")??;
        result
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // The namespaces go now (fields drop after this body); the watchdog
        // is then no longer needed. It sleeps in its own process group.
        for namespace in self.namespaces.drain(..) {
            drop(namespace);
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            if let Ok(pgid) = i32::try_from(watchdog.id()) {
                // SAFETY: kill has no memory preconditions; the group is the watchdog's own.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let _ = watchdog.wait();
        }
    }
}

/// A shell in its own process group that, once process `pid` is gone (or
/// after [`WATCHDOG_LIMIT_S`]), kills what runs in `namespaces` and deletes them.
fn start_watchdog(pid: u32, namespaces: &[&str]) -> anyhow::Result<std::process::Child> {
    let script = format!(
        "i=0; while [ $i -lt {WATCHDOG_LIMIT_S} ] && kill -0 {pid} 2>/dev/null; do sleep 1; i=$((i+1)); done; \
         for ns in {}; do ip netns pids $ns 2>/dev/null | xargs -r kill -9; ip netns del $ns 2>/dev/null; done",
        namespaces.join(" ")
    );
    let ip_dir = ip_program()
        .parent()
        .map(|dir| dir.display().to_string())
        .unwrap_or_default();
    let path = std::env::var("PATH").unwrap_or_default();
    std::process::Command::new("sh")
        .args(["-c", &script])
        .env("PATH", format!("{ip_dir}:{path}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the link watchdog")
}

/// Registers an owned descriptor with the runtime's reactor.
fn register(fd: OwnedFd) -> anyhow::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd stays open, and its descriptor unchanged, for as
    // long as the AsyncFd that owns it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Opens a TUN device named [`TUN_NAME`] inside namespace `ns` (a device
/// is created in the namespace of the thread that asks for it), non-blocking.
async fn tun_in(ns: &str) -> anyhow::Result<OwnedFd> {
    in_netns(ns, || async { open_tun(TUN_NAME) })
        .await
        .with_context(|| format!("creating the TUN device in {ns}"))
}

fn open_tun(name: &str) -> anyhow::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path and plain flags.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    anyhow::ensure!(
        name.len() < libc::IFNAMSIZ,
        "interface name {name} too long"
    );
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    Ok(fd)
}

/// Reads packets from `from`, drops each with the direction's loss
/// probability, and queues the rest with their delivery time.
async fn read_side(
    from: Arc<AsyncFd<OwnedFd>>,
    queue: mpsc::Sender<(Instant, Vec<u8>)>,
    config: Arc<Mutex<LinkConfig>>,
    counters: Arc<[Counters; 2]>,
    index: usize,
) {
    let counters = &counters[index];
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok(mut guard) = from.readable().await else {
            return;
        };
        let read = guard.try_io(|fd| {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        let n = match read {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        };
        counters.packets.fetch_add(1, Ordering::Relaxed);
        let impairment = match config.lock() {
            Ok(config) => {
                if index == 0 {
                    config.near_to_far
                } else {
                    config.far_to_near
                }
            }
            Err(_) => return,
        };
        if fastrand::f64() < impairment.loss {
            counters.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let deadline = Instant::now() + impairment.one_way_delay;
        if queue.try_send((deadline, buf[..n].to_vec())).is_err() {
            counters.overflow.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Writes each queued packet to `to` at its delivery time (the delay is
/// fixed per direction, so the queue is in deadline order). It runs on a
/// thread of its own and sleeps with the kernel's precision (tens of µs),
/// where the runtime's timer would round each delay up to the next
/// millisecond; it ends when the reading side is gone.
fn write_side(to: &AsyncFd<OwnedFd>, mut queue: mpsc::Receiver<(Instant, Vec<u8>)>) {
    while let Some((deadline, packet)) = queue.blocking_recv() {
        let now = Instant::now();
        if deadline > now {
            std::thread::sleep(deadline - now);
        }
        // A TUN write does not block; at most a few retries if it says so.
        for _ in 0..16 {
            // SAFETY: packet is valid for reads of its length.
            let n = unsafe { libc::write(to.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
            if n >= 0 {
                break;
            }
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(50)),
                _ => break,
            }
        }
    }
}

/// Runs `make()`'s future on a new thread inside network namespace `ns`
/// (sockets it opens live there), on a runtime of its own; the future must
/// bound its own time.
pub async fn in_netns<T, F, Fut>(ns: &str, make: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("netns {ns}"))
        .spawn(move || {
            let run = || -> anyhow::Result<T> {
                let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                // SAFETY: setns on this thread only, with an open namespace file.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("entering {path}"));
                }
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("a runtime for the namespace thread")?
                    .block_on(make())
            };
            let _ = tx.send(run());
        })
        .context("starting a namespace thread")?;
    rx.await
        .context("the namespace thread ended without a result")?
}

/// A `Command` for `program`, run inside namespace `ns` if given (with `ip netns exec`,
/// which execs it: the child's pid is the program's own).
pub fn command_in(ns: Option<&str>, program: &Path) -> tokio::process::Command {
    match ns {
        Some(ns) => {
            let mut command = tokio::process::Command::new(ip_program());
            command.args(["netns", "exec", ns]).arg(program);
            command
        }
        None => tokio::process::Command::new(program),
    }
}

/// Round trips of UDP probes across the link.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    /// Probes sent.
    pub sent: usize,
    /// Probes whose echo came back.
    pub received: usize,
    /// Median round trip, ms.
    pub rtt_p50_ms: f64,
    /// 99th percentile round trip, ms.
    pub rtt_p99_ms: f64,
    /// Shortest round trip, ms.
    pub rtt_min_ms: f64,
}

impl ProbeResult {
    /// The share of probes lost (either way), 0–1.
    pub fn lost_share(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        1.0 - self.received as f64 / self.sent as f64
    }
}

/// A UDP echo on the far address: reports its port, answers until stopped or `limit`.
async fn echo(
    port: tokio::sync::oneshot::Sender<u16>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    limit: Duration,
) -> anyhow::Result<()> {
    let socket = tokio::net::UdpSocket::bind((FAR_ADDR, 0))
        .await
        .context("binding the echo")?;
    let _ = port.send(socket.local_addr()?.port());
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            received = socket.recv_from(&mut buf) => {
                let (n, from) = received.context("echo receive")?;
                let _ = socket.send_to(&buf[..n], from).await;
            }
        }
    }
}

/// Sends `count` numbered probes to `to`, `spacing` apart, and collects the echoes.
async fn send_probes(
    to: SocketAddr,
    count: usize,
    spacing: Duration,
) -> anyhow::Result<ProbeResult> {
    let socket = Arc::new(
        tokio::net::UdpSocket::bind((NEAR_ADDR, 0))
            .await
            .context("binding the prober")?,
    );
    socket.connect(to).await?;
    let origin = tokio::time::Instant::now();
    let sender = {
        let socket = socket.clone();
        async move {
            let mut sent_at = Vec::with_capacity(count);
            let mut tick = tokio::time::interval(spacing.max(Duration::from_micros(100)));
            for seq in 0..count as u64 {
                tick.tick().await;
                sent_at.push(origin.elapsed());
                socket.send(&seq.to_be_bytes()).await?;
            }
            anyhow::Ok(sent_at)
        }
    };
    let receiver = {
        let socket = socket.clone();
        async move {
            let mut arrivals: Vec<(u64, Duration)> = Vec::with_capacity(count);
            let mut buf = [0u8; 64];
            // Until every probe is back, or 3 s after the last one could have been sent.
            let deadline = origin + spacing * count as u32 + Duration::from_secs(3);
            while arrivals.len() < count {
                match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                    Ok(Ok(8)) => {
                        let seq = u64::from_be_bytes(buf[..8].try_into()?);
                        arrivals.push((seq, origin.elapsed()));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e).context("prober receive"),
                    Err(_) => break,
                }
            }
            anyhow::Ok(arrivals)
        }
    };
    let (sent_at, arrivals) = tokio::try_join!(sender, receiver)?;
    let rtts: Vec<f64> = arrivals
        .iter()
        .filter_map(|(seq, at)| {
            let sent = sent_at.get(usize::try_from(*seq).ok()?)?;
            Some(at.saturating_sub(*sent).as_secs_f64() * 1000.0)
        })
        .collect();
    Ok(ProbeResult {
        sent: count,
        received: rtts.len(),
        rtt_p50_ms: percentile(&rtts, 50.0),
        rtt_p99_ms: percentile(&rtts, 99.0),
        rtt_min_ms: rtts.iter().copied().fold(f64::INFINITY, f64::min),
    })
}

#[cfg(test)]
mod tests;
