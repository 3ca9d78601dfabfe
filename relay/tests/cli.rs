//! The relay's command line as an operator meets it: PKI commands that
//! refuse to clobber, and one clear line for bad configuration.

use std::process::{Command, Output};

fn relay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_passage-relay"))
        .args(args)
        .output()
        .expect("passage-relay runs")
}

fn one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one clear line, got: {stderr}");
    assert!(stderr.starts_with("passage-relay: "), "{stderr}");
    stderr
}

#[test]
fn init_refuses_to_overwrite_an_existing_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki = pki.to_str().expect("utf-8 path");
    assert!(relay(&["init", "--dir", pki]).status.success());
    let error = one_line_error(&relay(&["init", "--dir", pki]));
    assert!(error.contains("already exists"), "{error}");
}

#[test]
fn issue_without_a_pki_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nothing-here");
    let error = one_line_error(&relay(&[
        "issue",
        "--dir",
        missing.to_str().expect("utf-8 path"),
        "--name",
        "x",
        "--relay",
        "127.0.0.1:4433",
    ]));
    assert!(error.contains("relay certificate"), "{error}");
}

/// Runs `serve` on a fresh PKI with `extra` arguments; returns its one-line error.
fn serve_error(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().to_str().expect("utf-8 path");
    assert!(relay(&["init", "--dir", pki]).status.success());
    let mut args = vec!["serve", "--pki", pki, "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    one_line_error(&relay(&args))
}

#[test]
fn serve_with_a_bad_upstream_fails_with_one_line() {
    let error = serve_error(&["--upstream", "ftp://example"]);
    assert!(error.contains("http or https"), "{error}");
}

#[test]
fn serve_with_an_unset_key_variable_fails_with_one_line() {
    let error = serve_error(&["--api-key-env", "PASSAGE_TEST_SURELY_UNSET_VARIABLE"]);
    assert!(
        error.contains("PASSAGE_TEST_SURELY_UNSET_VARIABLE"),
        "{error}"
    );
}
