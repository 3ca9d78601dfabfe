//! A seconds-long run of every benchmark scenario, so CI notices when the
//! suite no longer runs. It checks that each scenario completes and reports;
//! the figures of such a short run on debug builds are not judged.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn every_scenario_runs_in_its_smoke_version() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_passage-bench"));
    let bin_dir = bench.parent().expect("target directory").to_owned();
    for program in [
        "passage-relay",
        "passage-client",
        "passage-mock-upstream",
        "passage-hop",
    ] {
        assert!(
            bin_dir.join(program).is_file(),
            "{program} is not built in {}: run `cargo test --workspace` (or `cargo build --workspace --bins`) first",
            bin_dir.display()
        );
    }
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let status = Command::new(&bench)
        .arg("--quick")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("passage-bench runs");
    assert!(status.success(), "passage-bench --quick failed");
    let report = std::fs::read_to_string(out.path()).expect("report written");
    for heading in [
        "## Targets",
        "## 1. Request overhead",
        "## 2. Streaming",
        "## 3. Bulk transfer",
        "## 4. Many concurrent streams",
        "## 5. Long-haul links",
        "## 6. Transports: QUIC beside TCP",
        "## 7. Per-request cost",
    ] {
        assert!(
            report.contains(heading),
            "missing {heading:?} in:\n{report}"
        );
    }
    assert!(report.contains("| passage |"), "{report}");
}
