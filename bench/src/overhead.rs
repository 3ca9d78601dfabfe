//! Scenario 1, request overhead: wrk drives a fixed chat completion POST
//! straight at the upstream (`direct`), through an nginx reverse proxy
//! (`nginx`, the classic single hop), through a stunnel pair (two hops with
//! mutual TLS 1.3 between them, passage's shape without its streams),
//! through two bare forwarders (the floor of two hops) and through passage
//! (`passage`), at 1 connection (latency) and 32 connections (throughput).
//! Variants take turns within each round so they share the machine's noise.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::Command;

use crate::report::{Section, fixed};
use crate::stack::{
    Proc, TICKS_PER_SECOND, cpu_ticks, find_program, free_port, idle_share, machine_ticks,
    process_tree, send_signal, wait_listening,
};
use crate::stats::median;
use crate::stunnel::StunnelPair;
use crate::{Bench, Settings};

/// Index of each variant in the scenario's list.
const DIRECT: usize = 0;
const NGINX: usize = 1;
const STUNNEL: usize = 2;
const HOPS: usize = 3;
const PASSAGE: usize = 4;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct WrkRun {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
}

const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#;

/// Writes the wrk script that POSTs the fixed chat completion; returns its path.
pub fn wrk_script(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("post.lua");
    std::fs::write(
        &path,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{BODY}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"Authorization\"] = \"Bearer sk-bench\"\n"
        ),
    )?;
    Ok(path)
}

/// Runs wrk with one thread against `url`; fails if any request failed.
pub async fn wrk(
    script: &Path,
    url: &str,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<WrkRun> {
    let outcome = wrk_outcome(script, url, connections, duration).await?;
    match outcome.failures {
        Some(failures) => bail!("wrk saw failed requests: {failures}"),
        None => Ok(outcome.run),
    }
}

/// What one wrk run measured, and whether it saw failures.
#[derive(Debug, Clone)]
pub struct WrkOutcome {
    /// The figures (they include any failed requests).
    pub run: WrkRun,
    /// wrk's lines about failed requests (non-2xx answers, socket errors), if any.
    pub failures: Option<String>,
}

/// Runs wrk with one thread against `url`, reporting failed requests
/// beside the figures instead of refusing the run.
pub async fn wrk_outcome(
    script: &Path,
    url: &str,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<WrkOutcome> {
    let wrk = find_program("wrk").context("wrk is not installed (apt-get install wrk)")?;
    let output = Command::new(wrk)
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{}s", duration.as_secs()),
        ])
        .args(["--latency", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    parse_wrk_outcome(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

/// Reads requests/s and the 50th/99th latency percentiles from wrk's output;
/// refuses runs with errors or non-2xx answers.
pub fn parse_wrk(text: &str) -> anyhow::Result<WrkRun> {
    let outcome = parse_wrk_outcome(text)?;
    match outcome.failures {
        Some(failures) => bail!("wrk saw failed requests: {failures}"),
        None => Ok(outcome.run),
    }
}

/// Reads requests/s and the 50th/99th latency percentiles from wrk's
/// output, and its lines about failed requests or socket errors.
pub fn parse_wrk_outcome(text: &str) -> anyhow::Result<WrkOutcome> {
    let failures: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Non-2xx or 3xx responses") || l.starts_with("Socket errors"))
        .collect();
    let percentile = |p: &str| -> anyhow::Result<f64> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(p))
            .with_context(|| format!("no {p} latency line"))?;
        parse_duration_us(line.split_whitespace().nth(1).context("no value")?)
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .context("no Requests/sec line")?
        .trim()
        .parse()?;
    Ok(WrkOutcome {
        run: WrkRun {
            rps,
            p50_us: percentile("50%")?,
            p99_us: percentile("99%")?,
        },
        failures: (!failures.is_empty()).then(|| failures.join("; ")),
    })
}

fn parse_duration_us(value: &str) -> anyhow::Result<f64> {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .context("no unit")?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse()?;
    Ok(match unit {
        "us" => number,
        "ms" => number * 1e3,
        "s" => number * 1e6,
        "m" => number * 60e6,
        other => bail!("unknown unit {other}"),
    })
}

/// An nginx reverse proxy in front of the upstream, as commonly deployed
/// for this: keepalive to the upstream, no response or request buffering.
pub struct Nginx {
    proc: Proc,
    /// Its base URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    /// Kills the workers before the master (which `Proc` kills next): nginx
    /// workers outlive a killed master and would keep the port and memory.
    /// The master is stopped first, so it cannot start new workers.
    fn drop(&mut self) {
        let Ok(master) = self.proc.pid() else {
            return;
        };
        let _ = send_signal("STOP", &[master]);
        let workers: Vec<u32> = process_tree(master)
            .into_iter()
            .filter(|pid| *pid != master)
            .collect();
        if !workers.is_empty() {
            let _ = send_signal("KILL", &workers);
        }
    }
}

impl Nginx {
    /// Starts nginx on a free port in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Nginx> {
        let nginx = find_program("nginx")
            .context("nginx is not installed (apt-get install nginx-light)")?;
        let dir = tempfile::tempdir()?;
        let port = free_port(false)?;
        let root = dir.path().display();
        let config = format!(
            "worker_processes auto;\ndaemon off;\npid {root}/nginx.pid;\nerror_log {root}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n\
             fastcgi_temp_path {root}/fastcgi;\n  uwsgi_temp_path {root}/uwsgi;\n  scgi_temp_path {root}/scgi;\n\
             upstream mock {{ server {upstream}; keepalive 64; }}\n\
             server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://mock;\n\
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
             proxy_request_buffering off;\n    }}\n  }}\n}}\n"
        );
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config)?;
        let proc = Proc::spawn(
            "nginx",
            Command::new(nginx)
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&config_path)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        wait_listening("nginx", port).await?;
        Ok(Nginx {
            proc,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        })
    }
}

/// The processes that stand between wrk and the upstream in variant `index`.
fn proxy_pids(bench: &Bench, nginx: &Nginx, stunnel: &StunnelPair, index: usize) -> Vec<u32> {
    match index {
        NGINX => nginx.proc.pid().map(process_tree).unwrap_or_default(),
        STUNNEL => stunnel.pids(),
        HOPS => [&bench.hops.near, &bench.hops.far]
            .iter()
            .filter_map(|p| p.pid().ok())
            .collect(),
        PASSAGE => [&bench.tunnel.client, &bench.tunnel.relay]
            .iter()
            .filter_map(|p| p.pid().ok())
            .collect(),
        _ => Vec::new(),
    }
}

fn total_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|pid| cpu_ticks(*pid).ok()).sum()
}

/// Runs the scenario.
pub async fn run(bench: &Bench, settings: &Settings) -> anyhow::Result<Section> {
    let scratch = tempfile::tempdir()?;
    let script = wrk_script(scratch.path())?;
    let nginx = Nginx::start(bench.upstream.addr).await?;
    let stunnel = StunnelPair::start(&bench.bin_dir, bench.upstream.addr).await?;
    let path = "/v1/chat/completions";
    let variants = [
        ("direct", format!("{}{path}", bench.upstream.url)),
        ("nginx", format!("{}{path}", nginx.url)),
        ("stunnel pair", format!("{}{path}", stunnel.url)),
        ("two hops (floor)", format!("{}{path}", bench.hops.url)),
        ("passage", format!("{}{path}", bench.tunnel.url)),
    ];
    let urls = variants.each_ref().map(|(_, url)| url.as_str());
    let measured = measure(&script, &urls, settings, |index| {
        proxy_pids(bench, &nginx, &stunnel, index)
    })
    .await?;
    let mut section = Section {
        title: "1. Request overhead (wrk, POST chat completion)".into(),
        method: method(settings),
        ..Section::default()
    };
    section.table = measured.table(&variants.map(|(name, _)| name));
    measured.add_notes(&mut section);
    measured.add_targets(&mut section);
    Ok(section)
}

/// What every round measured, per variant (indexed like the scenario's list).
struct Measured {
    /// Each wrk run with its connection count.
    runs: Vec<Vec<(u32, WrkRun)>>,
    /// Proxy CPU per request at 1 connection, µs.
    cpu_us: Vec<Vec<f64>>,
    /// Proxy CPU per request at 32 connections, µs.
    cpu_us_32: Vec<Vec<f64>>,
    /// The machine's idle share during the 32-connection run, %.
    idle_32: Vec<Vec<f64>>,
}

/// Warms every variant, then runs `settings.rounds` rounds in which the
/// variants take turns at 1 and at 32 connections, counting the CPU of the
/// processes `pids(index)` names for each.
async fn measure(
    script: &Path,
    urls: &[&str],
    settings: &Settings,
    pids: impl Fn(usize) -> Vec<u32>,
) -> anyhow::Result<Measured> {
    let duration = settings.wrk_duration;
    // Warm every path (pools, QUIC stream credit) before measuring.
    for url in urls {
        wrk(script, url, 4, Duration::from_secs(1)).await?;
    }
    let mut measured = Measured {
        runs: vec![Vec::new(); urls.len()],
        cpu_us: vec![Vec::new(); urls.len()],
        cpu_us_32: vec![Vec::new(); urls.len()],
        idle_32: vec![Vec::new(); urls.len()],
    };
    for _ in 0..settings.rounds {
        for connections in [1u32, 32] {
            for (index, url) in urls.iter().enumerate() {
                let proxies = pids(index);
                let ticks_before = total_ticks(&proxies);
                let machine_before = machine_ticks()?;
                let run = wrk(script, url, connections, duration).await?;
                let idle = idle_share(machine_before, machine_ticks()?);
                // CPU the proxy hop(s) spent per request; at one connection
                // this is time on the request's path.
                let ticks = total_ticks(&proxies).saturating_sub(ticks_before) as f64;
                let requests = run.rps * duration.as_secs_f64();
                let per_request = ticks / TICKS_PER_SECOND * 1e6 / requests.max(1.0);
                if connections == 1 {
                    measured.cpu_us[index].push(per_request);
                } else {
                    measured.cpu_us_32[index].push(per_request);
                    measured.idle_32[index].push(idle * 100.0);
                }
                measured.runs[index].push((connections, run));
            }
        }
    }
    Ok(measured)
}

/// The section's method paragraph.
fn method(settings: &Settings) -> String {
    format!(
        "wrk 1 thread, {}s per run, {} rounds; in each round the five variants run back to back \
         at 1 connection and at 32 connections; figures are medians over rounds. The upstream \
         (passage-mock-upstream) answers a fixed chat completion at once. nginx: `worker_processes \
         auto`, `keepalive 64` to the upstream, `proxy_buffering off`, `proxy_request_buffering off`. \
         stunnel pair: two Debian `stunnel4` processes in a chain, TLS 1.3 between them with \
         client certificates (identities from `passage-relay init` and `issue`), `TCP_NODELAY` \
         on every socket; each app connection is one TLS connection and one upstream \
         connection, kept alive like wrk's. \
         two hops (floor): two `passage-hop` processes in a chain (accept, connect, copy bytes \
         both ways; no TLS, HTTP or framing), the least that passage's two processes on the \
         path can cost here. passage: the binaries under test with default settings (log level info, to a file). \
         Proxy CPU per request: user + system time of the proxy processes (this nginx's master \
         and workers; the two stunnels; the two hops; passage-client + passage-relay) during a run, divided by \
         the requests served: a guide to the work each hop adds per request, including work \
         off the request's critical path (acknowledgements, logging). Machine idle: the share \
         of all cores' time that `/proc/stat` counts as idle during the 32-connection run.",
        settings.wrk_duration.as_secs(),
        settings.rounds
    )
}

impl Measured {
    /// Median over rounds of `pick` for variant `index` at `connections`.
    fn med(&self, index: usize, connections: u32, pick: fn(&WrkRun) -> f64) -> f64 {
        let samples: Vec<f64> = self.runs[index]
            .iter()
            .filter(|(c, _)| *c == connections)
            .map(|(_, run)| pick(run))
            .collect();
        median(&samples)
    }

    /// Median latency at 1 connection that variant `index` adds over direct, µs.
    fn added(&self, index: usize) -> f64 {
        self.med(index, 1, |r| r.p50_us) - self.med(DIRECT, 1, |r| r.p50_us)
    }

    /// Median latency at 1 connection that passage adds above the two-hop floor, µs.
    fn above_floor(&self) -> f64 {
        self.added(PASSAGE) - self.added(HOPS)
    }

    /// passage's requests per second over variant `of`'s at `connections`.
    fn ratio(&self, connections: u32, of: usize) -> f64 {
        self.med(PASSAGE, connections, |r| r.rps) / self.med(of, connections, |r| r.rps)
    }

    /// The table: a header, then one row per variant named in `names`.
    fn table(&self, names: &[&str]) -> Vec<Vec<String>> {
        let mut table = vec![
            [
                "variant",
                "p50 @1 conn (µs)",
                "p99 @1 conn (µs)",
                "proxy CPU per request @1 conn (µs)",
                "req/s @1 conn",
                "req/s @32 conns",
                "@32 vs direct",
                "proxy CPU per request @32 conns (µs)",
                "machine idle @32 conns",
            ]
            .map(String::from)
            .to_vec(),
        ];
        let direct_rps = self.med(DIRECT, 32, |r| r.rps);
        // Direct has no proxy, so no proxy CPU.
        let proxy_cpu = |samples: &[f64], index: usize| {
            if index == DIRECT {
                "–".to_owned()
            } else {
                fixed(median(samples), 0)
            }
        };
        for (index, name) in names.iter().enumerate() {
            table.push(vec![
                (*name).to_owned(),
                fixed(self.med(index, 1, |r| r.p50_us), 0),
                fixed(self.med(index, 1, |r| r.p99_us), 0),
                proxy_cpu(&self.cpu_us[index], index),
                fixed(self.med(index, 1, |r| r.rps), 0),
                fixed(self.med(index, 32, |r| r.rps), 0),
                fixed(self.med(index, 32, |r| r.rps) / direct_rps, 2),
                proxy_cpu(&self.cpu_us_32[index], index),
                format!("{:.0}%", median(&self.idle_32[index])),
            ]);
        }
        table
    }

    /// The remarks below the table: ratios, where latency and CPU stand,
    /// and the hand measurements behind the runtime defaults.
    fn add_notes(&self, section: &mut Section) {
        let (above_floor, cpu_1) = (self.above_floor(), median(&self.cpu_us[PASSAGE]));
        section.notes.push(format!(
            "passage ÷ stunnel pair: {:.2}× the requests per second at 1 connection, {:.2}× at 32; \
             passage ÷ nginx: {:.2}× at 1 connection, {:.2}× at 32.",
            self.ratio(1, STUNNEL),
            self.ratio(32, STUNNEL),
            self.ratio(1, NGINX),
            self.ratio(32, NGINX),
        ));
        section.notes.push(format!(
            "At 1 connection passage adds {:.0} µs at the median over direct (nginx {:.0} µs, the \
             stunnel pair {:.0} µs, the two-hop floor {:.0} µs): {above_floor:.0} µs above the \
             floor. Its two processes use {cpu_1:.0} µs of CPU per request against {:.0} µs for \
             the stunnel pair and {:.0} µs for the two bare forwarders. Where each µs goes, by \
             program and by kind of work, is in section 7 (`scripts/request_cost.sh`).",
            self.added(PASSAGE),
            self.added(NGINX),
            self.added(STUNNEL),
            self.added(HOPS),
            median(&self.cpu_us[STUNNEL]),
            median(&self.cpu_us[HOPS]),
        ));
        section.notes.push(format!(
            "At 32 connections the machine was {:.0}% idle during passage's run: wrk, the two \
             programs and the upstream take turns on two cores, so throughput there follows the \
             CPU every process on the path spends per request (passage {:.0} µs, nginx {:.0} µs, \
             the stunnel pair {:.0} µs).",
            median(&self.idle_32[PASSAGE]),
            median(&self.cpu_us_32[PASSAGE]),
            median(&self.cpu_us_32[NGINX]),
            median(&self.cpu_us_32[STUNNEL]),
        ));
        // Hand measurements behind defaults in shared/src/process.rs, kept
        // here so a regenerated report still carries them.
        section.notes.push(
            "Runtime and logging (measured by hand with passage-bench on a 2-core machine, not in \
             this run): one runtime thread per program (`--threads 1`, the default) gave about 1.3× \
             the request throughput and ~40 µs less latency than tokio's default multi-threaded \
             runtime; a background log writer thread (tracing-appender) cost more per request than \
             the synchronous write itself."
                .to_owned(),
        );
    }

    /// The scenario's targets, each with what this run measured.
    fn add_targets(&self, section: &mut Section) {
        let (above_floor, cpu_1) = (self.above_floor(), median(&self.cpu_us[PASSAGE]));
        section.target(
            "req/s @1 conn vs stunnel pair",
            format!("{:.2}×", self.ratio(1, STUNNEL)),
            "≥ 1.0×",
            self.ratio(1, STUNNEL) >= 1.0,
        );
        section.target(
            "added p50 @1 conn above the two-hop floor",
            format!(
                "{above_floor:.0} µs (passage {:.0} µs, floor {:.0} µs over direct)",
                self.added(PASSAGE),
                self.added(HOPS)
            ),
            "≤ 60 µs",
            above_floor <= 60.0,
        );
        section.target(
            "proxy CPU per request @1 conn",
            format!("{cpu_1:.0} µs"),
            "≤ 175 µs",
            cpu_1 <= 175.0,
        );
        section.target(
            "req/s @32 conns vs stunnel pair",
            format!("{:.2}×", self.ratio(32, STUNNEL)),
            "≥ 2.5×",
            self.ratio(32, STUNNEL) >= 2.5,
        );
        section.target(
            "req/s @32 conns vs nginx",
            format!("{:.3}×", self.ratio(32, NGINX)),
            "≥ 0.8×",
            self.ratio(32, NGINX) >= 0.8,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 1 connections\n\
            \x20 Latency Distribution\n     50%   57.00us\n     75%   61.00us\n     90%   66.00us\n\
            \x20    99%    1.04ms\n  80642 requests in 5.00s, 23.15MB read\nRequests/sec:  16127.41\n";
        let run = parse_wrk(text).expect("parses");
        assert_eq!(run.p50_us, 57.0);
        assert_eq!(run.p99_us, 1040.0);
        assert_eq!(run.rps, 16127.41);
        let failing = format!("{text}  Non-2xx or 3xx responses: 3\n");
        assert!(parse_wrk(&failing).is_err());
        let outcome = parse_wrk_outcome(&failing).expect("parses");
        assert_eq!(outcome.run.rps, 16127.41);
        assert_eq!(
            outcome.failures.as_deref(),
            Some("Non-2xx or 3xx responses: 3")
        );
    }

    #[test]
    fn idle_share_is_the_idle_part_of_the_interval() {
        assert_eq!(idle_share((100, 1000), (150, 1200)), 0.25);
        assert_eq!(idle_share((100, 1000), (100, 1000)), 0.0);
        let (idle, all) = machine_ticks().expect("reads /proc/stat");
        assert!(idle <= all && all > 0);
    }
}
