//! The network of the test bed: two namespaces joined by a veth pair, their
//! addresses, the nftables table that imposes each scenario, and a teardown
//! that runs on every exit path (also from the watchdog thread).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Prefix of every name the test bed creates (namespaces, interfaces, table).
const PREFIX: &str = "phn";

/// The client's address on the veth pair.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The address the client moves to in the address-change scenario.
pub const MOVED_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The relay's address on the veth pair.
pub const RELAY_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Prefix length of the veth subnet (198.18.0.0/29, inside the benchmark range).
const PREFIX_LEN: u8 = 29;

/// What the client namespace's nftables table does to the veth traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impairment {
    /// Nothing: the table is removed.
    None,
    /// Every UDP packet dropped, both ways.
    BlockUdp,
    /// Every TCP packet dropped, both ways.
    BlockTcp,
    /// This percentage of all packets dropped at random, each way.
    Loss(u8),
}

/// The names of one run's namespaces, interfaces and table (all carry the pid).
#[derive(Debug, Clone)]
pub struct Names {
    /// The client's network namespace.
    pub client_ns: String,
    /// The relay's network namespace.
    pub relay_ns: String,
    /// The client's end of the veth pair.
    pub client_if: String,
    /// The relay's end of the veth pair.
    pub relay_if: String,
    /// The nftables table (family `inet`) in the client namespace.
    pub table: String,
}

impl Names {
    /// The names for the run of process `pid` (interface names stay under 16 bytes).
    pub fn for_pid(pid: u32) -> Names {
        Names {
            client_ns: format!("{PREFIX}-c-{pid}"),
            relay_ns: format!("{PREFIX}-r-{pid}"),
            client_if: format!("{PREFIX}c{pid}"),
            relay_if: format!("{PREFIX}r{pid}"),
            table: format!("{PREFIX}_{pid}"),
        }
    }
}

/// The two namespaces and what lives in them; [`TestBed::teardown`] removes it all.
pub struct TestBed {
    /// The names this run uses.
    pub names: Names,
    ip: PathBuf,
    nft: PathBuf,
    torn_down: AtomicBool,
    /// The namespace the main thread came from, while it is in the client's.
    home: Mutex<Option<File>>,
}

impl TestBed {
    /// A test bed for this process; nothing exists until [`TestBed::create`].
    pub fn new(ip: PathBuf, nft: PathBuf) -> TestBed {
        TestBed {
            names: Names::for_pid(std::process::id()),
            ip,
            nft,
            torn_down: AtomicBool::new(false),
            home: Mutex::new(None),
        }
    }

    /// The `ip` program.
    pub fn ip(&self) -> &Path {
        &self.ip
    }

    /// Creates the namespaces, the veth pair between them and their addresses.
    pub fn create(&self) -> anyhow::Result<()> {
        let n = &self.names;
        self.ip_cmd(&["netns", "add", &n.client_ns])?;
        self.ip_cmd(&["netns", "add", &n.relay_ns])?;
        // Both ends are created inside the namespaces, so deleting them
        // removes the pair; nothing is ever added to the caller's namespace.
        self.ip_cmd(&[
            "link",
            "add",
            &n.client_if,
            "netns",
            &n.client_ns,
            "type",
            "veth",
            "peer",
            "name",
            &n.relay_if,
            "netns",
            &n.relay_ns,
        ])?;
        for (ns, interface, addr) in [
            (&n.client_ns, &n.client_if, CLIENT_ADDR),
            (&n.relay_ns, &n.relay_if, RELAY_ADDR),
        ] {
            self.ip_cmd(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/{PREFIX_LEN}"),
                "dev",
                interface,
            ])?;
            // One packet per buffer: without it, the stack hands nftables
            // (and the peer) batches of up to 64 KiB (TSO, UDP GSO), and
            // random loss would drop whole batches instead of packets.
            self.ip_cmd(&[
                "-n",
                ns,
                "link",
                "set",
                "dev",
                interface,
                "gso_max_segs",
                "1",
            ])?;
            self.ip_cmd(&["-n", ns, "link", "set", "lo", "up"])?;
            self.ip_cmd(&["-n", ns, "link", "set", interface, "up"])?;
        }
        // When the client's first address goes, its second one takes over
        // instead of going with it (the address-change scenario).
        self.ip_cmd(&[
            "netns",
            "exec",
            &n.client_ns,
            "sh",
            "-c",
            &format!(
                "echo 1 > /proc/sys/net/ipv4/conf/{}/promote_secondaries",
                n.client_if
            ),
        ])?;
        self.wait_for_carrier(Duration::from_secs(5))
    }

    fn wait_for_carrier(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let n = &self.names;
        loop {
            let client = self.ip_output(&["-n", &n.client_ns, "link", "show", &n.client_if])?;
            let relay = self.ip_output(&["-n", &n.relay_ns, "link", "show", &n.relay_if])?;
            if client.contains("LOWER_UP") && relay.contains("LOWER_UP") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the veth pair did not come up within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Moves the calling thread into the client namespace (so its sockets
    /// reach the client on 127.0.0.1), remembering where it came from.
    pub fn enter_client_namespace(&self) -> anyhow::Result<()> {
        let home =
            File::open("/proc/thread-self/ns/net").context("opening this thread's namespace")?;
        let path = format!("/run/netns/{}", self.names.client_ns);
        let target = File::open(&path).with_context(|| format!("opening {path}"))?;
        rustix::thread::move_into_link_name_space(
            target.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("entering namespace {}", self.names.client_ns))?;
        *self.home.lock().unwrap_or_else(|e| e.into_inner()) = Some(home);
        Ok(())
    }

    /// Moves the calling thread to the namespace the entering thread came
    /// from (for another thread, that is where it already is).
    pub fn leave_client_namespace(&self) -> anyhow::Result<()> {
        let home = self.home.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(home) = home {
            rustix::thread::move_into_link_name_space(
                home.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .context("returning to the original namespace")?;
        }
        Ok(())
    }

    /// Puts `impairment` in force, replacing the previous one. Blocks drop
    /// both ways in the client namespace; random loss drops on arrival in
    /// each namespace, where packets come one by one (see [`TestBed::create`]).
    pub fn impose(&self, impairment: Impairment) -> anyhow::Result<()> {
        let n = &self.names;
        let (c, r) = (&n.client_if, &n.relay_if);
        let (client_in, client_out, relay_in) = match impairment {
            Impairment::None => (Vec::new(), Vec::new(), Vec::new()),
            Impairment::BlockUdp => (
                vec![format!("iifname \"{c}\" meta l4proto udp counter drop")],
                vec![format!("oifname \"{c}\" meta l4proto udp counter drop")],
                Vec::new(),
            ),
            Impairment::BlockTcp => (
                vec![format!("iifname \"{c}\" meta l4proto tcp counter drop")],
                vec![format!("oifname \"{c}\" meta l4proto tcp counter drop")],
                Vec::new(),
            ),
            Impairment::Loss(percent) => {
                let lossy = |iface: &str| {
                    vec![
                        format!("iifname \"{iface}\" counter comment \"seen\""),
                        format!(
                            "iifname \"{iface}\" numgen random mod 100 < {percent} counter drop"
                        ),
                    ]
                };
                (lossy(c), Vec::new(), lossy(r))
            }
        };
        self.nft_table(&n.client_ns, &client_in, &client_out)
            .and_then(|()| self.nft_table(&n.relay_ns, &relay_in, &[]))
            .with_context(|| format!("imposing {impairment:?}"))
    }

    /// Replaces this run's table in namespace `ns` with one holding these
    /// input and output rules (no table when there are none), in one
    /// nftables transaction.
    fn nft_table(&self, ns: &str, input: &[String], output: &[String]) -> anyhow::Result<()> {
        let table = &self.names.table;
        // Declaring the table first makes the delete valid when it is absent.
        let mut script = format!("table inet {table}\ndelete table inet {table}\n");
        if !input.is_empty() || !output.is_empty() {
            let chain = |hook: &str, rules: &[String]| {
                let mut chain = format!(
                    "chain {hook} {{\ntype filter hook {hook} priority 0; policy accept;\n"
                );
                for rule in rules {
                    chain.push_str(rule);
                    chain.push('\n');
                }
                chain.push_str("}\n");
                chain
            };
            script.push_str(&format!(
                "table inet {table} {{\n{}{}}}\n",
                chain("input", input),
                chain("output", output)
            ));
        }
        self.nft_script(ns, &script)
    }

    /// Packets the current rules have (seen, dropped) so far, both namespaces
    /// together; `seen` counts only where random loss applies.
    pub fn packet_counts(&self) -> (u64, u64) {
        let n = &self.names;
        let (mut seen, mut dropped) = (0, 0);
        for ns in [&n.client_ns, &n.relay_ns] {
            let nft = self.nft.to_string_lossy();
            let Ok(listing) =
                self.ip_output(&["netns", "exec", ns, &nft, "list", "table", "inet", &n.table])
            else {
                continue;
            };
            for line in listing.lines() {
                // Each rule lists `counter packets N bytes M`.
                let words: Vec<&str> = line.split_whitespace().collect();
                let Some(count) = words
                    .windows(2)
                    .find(|pair| pair[0] == "packets")
                    .and_then(|pair| pair[1].parse::<u64>().ok())
                else {
                    continue;
                };
                if line.contains("comment \"seen\"") {
                    seen += count;
                } else {
                    dropped += count;
                }
            }
        }
        (seen, dropped)
    }

    fn nft_script(&self, ns: &str, script: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = Command::new(&self.ip)
            .args(["netns", "exec", ns])
            .arg(&self.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())
            .context("writing the nft script")?;
        let output = child.wait_with_output().context("running nft")?;
        if !output.status.success() {
            bail!(
                "nft refused the rules: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Gives the client `to` in place of `from` (add, then remove: the
    /// kernel then sends from `to`).
    pub fn move_client_address(&self, from: Ipv4Addr, to: Ipv4Addr) -> anyhow::Result<()> {
        self.client_addr("add", to)?;
        self.client_addr("del", from)
    }

    /// `ip addr add|del ADDR dev IF` on the client's interface.
    fn client_addr(&self, verb: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
        let n = &self.names;
        self.ip_cmd(&[
            "-n",
            &n.client_ns,
            "addr",
            verb,
            &format!("{addr}/{PREFIX_LEN}"),
            "dev",
            &n.client_if,
        ])
    }

    /// Gives the client back its first address, and only that one.
    pub fn reset_client_address(&self) -> anyhow::Result<()> {
        let n = &self.names;
        self.ip_cmd(&[
            "-4",
            "-n",
            &n.client_ns,
            "addr",
            "flush",
            "dev",
            &n.client_if,
        ])?;
        self.client_addr("add", CLIENT_ADDR)
    }

    /// Removes everything: kills what runs in the namespaces, drops the
    /// table and deletes the namespaces (with them the veth pair). Runs once;
    /// later calls do nothing. Never fails: problems are printed.
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        // Commands started from inside the client namespace (on a panic the
        // main thread is still there) would count as processes in it.
        if let Err(e) = self.leave_client_namespace() {
            note!("hostile-net: {e:#}");
        }
        let n = &self.names;
        for ns in [&n.client_ns, &n.relay_ns] {
            let _ = self.nft_table(ns, &[], &[]);
            remove_namespace(&self.ip, ns);
        }
    }

    fn ip_cmd(&self, args: &[&str]) -> anyhow::Result<()> {
        self.ip_output(args).map(drop)
    }

    fn ip_output(&self, args: &[&str]) -> anyhow::Result<String> {
        ip_output(&self.ip, args)
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn ip_output(ip: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Kills every process in namespace `ns` (but this one), then deletes it.
fn remove_namespace(ip: &Path, ns: &str) {
    let own = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids: Vec<u32> = match ip_output(ip, &["netns", "pids", ns]) {
            Ok(out) => out
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|&p| p != own)
                .collect(),
            Err(_) => Vec::new(),
        };
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            note!("hostile-net: processes {pids:?} in {ns} survived SIGKILL");
            break;
        }
        for pid in pids {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(e) = ip_output(ip, &["netns", "del", ns])
        && Path::new("/run/netns").join(ns).exists()
    {
        note!("hostile-net: could not delete namespace {ns}: {e:#}");
    }
}

/// Removes namespaces left by earlier runs that died without cleaning up
/// (SIGKILL): ours by name, whose process is gone.
pub fn remove_stale(ip: &Path) {
    let Ok(list) = ip_output(ip, &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(&format!("{PREFIX}-c-"))
            .or_else(|| name.strip_prefix(&format!("{PREFIX}-r-")))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if pid == std::process::id() || comm.starts_with("passage-hostile") {
            continue;
        }
        note!("hostile-net: removing {name}, left by a run that died (pid {pid})");
        remove_namespace(ip, name);
    }
}
