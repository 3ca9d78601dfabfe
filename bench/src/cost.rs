//! Scenario 7, per-request cost: runs `scripts/request_cost.py` on the
//! binaries under test (its own tunnels, one per transport) and puts its
//! tables in the report: CPU µs by kind of work, syscalls, context
//! switches, task polls and packets per request, at 1 and 32 connections.
//! With `PASSAGE_COST_BASE` set to the binary directory of another build
//! (the commit before a change), both are measured, alternating, and shown
//! side by side. Needs root (perf, uprobes, nftables): without it the
//! section says it was skipped.

use std::path::Path;

use anyhow::Context;
use tokio::process::Command;

use crate::report::Section;
use crate::{Bench, Settings};

/// The accounting script, in this repository.
fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/request_cost.py")
}

/// Runs the scenario.
pub async fn run(bench: &Bench, settings: &Settings) -> anyhow::Result<Section> {
    let mut section = Section {
        title: "7. Per-request cost: where each µs goes".into(),
        ..Section::default()
    };
    // A hand measurement behind the TCP transport's unreserved budget
    // (shared/src/transport/tcp/stream.rs), kept here so a regenerated
    // report still carries it.
    section.notes.push(
        "TCP transport, by hand with `scripts/request_cost.py` (not in this run): before a \
         stream's first bytes went to h2 without waiting for send capacity (the unreserved \
         budget in `shared/src/transport/tcp/stream.rs`), a small request went out as three \
         TCP segments (head, data, end) and a small answer as three too."
            .to_owned(),
    );
    let out = tempfile::NamedTempFile::new()?;
    let seconds = if settings.quick { 1 } else { 5 };
    let mut command = Command::new("python3");
    command
        .arg(script())
        .arg("--bin-dir")
        .arg(&bench.bin_dir)
        .args(["--seconds", &seconds.to_string()])
        .arg("--out")
        .arg(out.path());
    let base = std::env::var_os("PASSAGE_COST_BASE");
    if let Some(base) = &base {
        command.arg("--base-bin-dir").arg(base);
    }
    let output = command
        .output()
        .await
        .context("running scripts/request_cost.py")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if let Some(skip) = stdout.lines().find(|l| l.contains("SKIP")) {
        section.method = format!("Skipped: {skip}");
        return Ok(section);
    }
    if !output.status.success() {
        section.method = format!(
            "The accounting failed (scripts/request_cost.py exited with {}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        return Ok(section);
    }
    let text = std::fs::read_to_string(out.path())?;
    let (method, tables) = text.split_once('\n').unwrap_or((&text, ""));
    section.method = method.to_owned();
    if base.is_some() {
        section.method.push_str(
            " Before: the build in `PASSAGE_COST_BASE`; after: the binaries under test; \
             the two alternate per transport in one invocation.",
        );
    }
    section.body = tables.to_owned();
    Ok(section)
}
