//! The client's command line: a missing or broken bundle is one clear line.

use std::process::{Command, Output};

fn client(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_passage-client"))
        .args(args)
        .output()
        .expect("passage-client runs")
}

fn one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one clear line, got: {stderr}");
    assert!(stderr.starts_with("passage-client: "), "{stderr}");
    stderr
}

#[test]
fn a_missing_bundle_is_one_clear_line() {
    let error = one_line_error(&client(&["run", "--bundle", "/nonexistent/bundle.toml"]));
    assert!(
        error.contains("cannot read bundle /nonexistent/bundle.toml"),
        "{error}"
    );
}

#[test]
fn a_malformed_bundle_is_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bundle.toml");
    std::fs::write(&path, "name = \"x\"\nrelays = []\n").expect("write");
    set_mode(&path, 0o600);
    let error = one_line_error(&client(&["run", "--bundle", path.to_str().expect("utf-8")]));
    assert!(error.contains("is not valid"), "{error}");
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn a_bundle_others_can_read_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bundle.toml");
    std::fs::write(&path, "name = \"x\"\nrelays = [\"127.0.0.1:1\"]\n").expect("write");
    for mode in [0o644, 0o640, 0o604] {
        set_mode(&path, mode);
        let error = one_line_error(&client(&["run", "--bundle", path.to_str().expect("utf-8")]));
        assert!(
            error.contains(&format!("mode {mode:o}")) && error.contains("chmod 600"),
            "{error}"
        );
    }
}

#[test]
fn a_keep_alive_longer_than_the_idle_timeout_is_refused() {
    let error = one_line_error(&client(&[
        "run",
        "--bundle",
        "/nonexistent/bundle.toml",
        "--keep-alive",
        "5",
        "--tunnel-idle-timeout",
        "2",
    ]));
    assert!(error.contains("--keep-alive"), "{error}");
}

#[test]
fn the_example_config_file_is_valid() {
    // Every key parses; the client then stops only at the missing bundle.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/client.toml");
    let error = one_line_error(&client(&[
        "run",
        "--config",
        example,
        "--bundle",
        "/nonexistent/bundle.toml",
    ]));
    assert!(
        error.contains("cannot read bundle /nonexistent/bundle.toml"),
        "{error}"
    );
}

#[test]
fn serving_other_machines_needs_the_flag_and_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = passage_shared::pki::PkiDir::new(dir.path().join("pki"));
    pki.init(&[]).expect("PKI init");
    let issued = pki
        .issue_client("a", &["127.0.0.1:1".to_owned()], None, 1)
        .expect("issue");
    let path = dir.path().join("a.toml");
    let text = issued.to_toml().expect("bundle TOML");
    passage_shared::pki::write_new_file(&path, text.as_bytes(), 0o600).expect("write bundle");
    let bundle = path.to_str().expect("utf-8");
    let error = one_line_error(&client(&[
        "run",
        "--bundle",
        bundle,
        "--listen",
        "0.0.0.0:0",
    ]));
    assert!(error.contains("--allow-non-loopback"), "{error}");
    let error = one_line_error(&client(&[
        "run",
        "--bundle",
        bundle,
        "--listen",
        "0.0.0.0:0",
        "--allow-non-loopback",
    ]));
    assert!(error.contains("--access-token-env"), "{error}");
}
