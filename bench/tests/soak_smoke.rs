//! A seconds-long soak (`passage-soak` with few requests), so CI notices
//! when passage leaks streams or tasks, or hangs a request, across app
//! cancellations and a relay restart. The full soak is `scripts/soak.sh`.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_short_soak_ends_with_nothing_hung_or_left_open() {
    let soak = PathBuf::from(env!("CARGO_BIN_EXE_passage-soak"));
    let bin_dir = soak.parent().expect("target directory").to_owned();
    for program in ["passage-relay", "passage-client", "passage-mock-upstream"] {
        assert!(
            bin_dir.join(program).is_file(),
            "{program} is not built in {}: run `cargo test --workspace` first",
            bin_dir.display()
        );
    }
    let output = Command::new(&soak)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(["--seconds", "8", "--concurrency", "50"])
        .output()
        .expect("passage-soak runs");
    let report = String::from_utf8_lossy(&output.stdout);
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}{errors}");
    assert!(report.contains("result: pass"), "{report}");
}
