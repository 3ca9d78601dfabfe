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

/// Writes `config` (after `pki = "..."` for a fresh PKI) and runs `serve
/// --config FILE` plus `extra`; returns its one-line error.
fn config_error(config: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki = pki.to_str().expect("utf-8 path");
    assert!(relay(&["init", "--dir", pki]).status.success());
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        format!("pki = \"{pki}\"\nlisten = \"127.0.0.1:0\"\n{config}"),
    )
    .expect("write config");
    let mut args = vec!["serve", "--config", file.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    one_line_error(&relay(&args))
}

#[test]
fn a_config_file_sets_flags_including_required_ones() {
    // The key variable named in the file is unset: the error proves the
    // file (and its pki) was read.
    let error = config_error("api_key_env = \"PASSAGE_TEST_UNSET_KEY\"\n", &[]);
    assert!(
        error.contains("--api-key-env PASSAGE_TEST_UNSET_KEY"),
        "{error}"
    );
}

#[test]
fn the_command_line_wins_over_the_config_file() {
    let error = config_error(
        "upstream = \"http://127.0.0.1:1\"\n",
        &["--upstream", "ftp://example"],
    );
    assert!(error.contains("http or https"), "{error}");
}

#[test]
fn unknown_keys_and_bad_values_in_the_config_file_are_named() {
    let error = config_error("idle_timout = 5\n", &[]);
    assert!(error.contains("unknown key `idle_timout`"), "{error}");
    let error = config_error("idle_timeout = \"soon\"\n", &[]);
    assert!(
        error.contains("`idle_timeout`: invalid value 'soon'"),
        "{error}"
    );
}

#[test]
fn bad_client_tables_are_named() {
    let error = config_error("[clients.alice]\nallow_path = [\"/v1/\"]\n", &[]);
    assert!(error.contains("line 4"), "{error}");
    assert!(error.contains("unknown field `allow_path`"), "{error}");
    let error = config_error("[clients.alice]\nallow_paths = [\"v1/\"]\n", &[]);
    assert!(
        error.contains("`clients.alice.allow_paths`: each prefix must start with '/'"),
        "{error}"
    );
    let error = config_error("[unlisted_clients]\nrequests_per_minute = 0\n", &[]);
    assert!(error.contains("`requests_per_minute = 0`"), "{error}");
    let error = config_error("clients = 3\n", &[]);
    assert!(error.contains("unknown key `clients`"), "{error}");
}

#[test]
fn list_shows_issued_clients_and_revoke_marks_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki = pki.to_str().expect("utf-8 path");
    assert!(relay(&["init", "--dir", pki]).status.success());
    for name in ["alice", "bob"] {
        let issued = relay(&[
            "issue",
            "--dir",
            pki,
            "--name",
            name,
            "--relay",
            "localhost:4433",
        ]);
        assert!(issued.status.success(), "{issued:?}");
    }
    let listing = |args: &[&str]| {
        let output = relay(args);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let before = listing(&["list", "--dir", pki]);
    let line = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
            .to_owned()
    };
    assert!(line(&before, "alice").ends_with("valid"), "{before}");

    let revoked = listing(&["revoke", "--dir", pki, "--name", "alice"]);
    assert!(revoked.contains("SIGHUP"), "{revoked}");
    let after = listing(&["list", "--dir", pki]);
    assert!(line(&after, "alice").ends_with("revoked"), "{after}");
    assert!(line(&after, "bob").ends_with("valid"), "{after}");

    let error = one_line_error(&relay(&["revoke", "--dir", pki, "--name", "carol"]));
    assert!(error.contains("no certificate of that name"), "{error}");
}

#[test]
fn the_example_config_file_is_valid() {
    // Everything in the example parses (flags and client tables); the
    // relay then stops only because its PKI directory does not exist.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/relay.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_passage-relay"))
        .args([
            "serve",
            "--config",
            example,
            "--pki",
            "/nonexistent/passage-pki",
        ])
        .env("OPENAI_API_KEY", "sk-example-not-used")
        .output()
        .expect("passage-relay runs");
    let error = one_line_error(&output);
    assert!(error.contains("/nonexistent/passage-pki"), "{error}");
}

#[test]
fn a_private_key_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().to_str().expect("utf-8 path");
    assert!(relay(&["init", "--dir", pki]).status.success());
    for key in ["relay.key", "ca.key"] {
        let path = dir.path().join(key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = if key == "relay.key" {
            one_line_error(&relay(&["serve", "--pki", pki, "--listen", "127.0.0.1:0"]))
        } else {
            one_line_error(&relay(&[
                "issue",
                "--dir",
                pki,
                "--name",
                "a",
                "--relay",
                "127.0.0.1:1",
            ]))
        };
        assert!(error.contains(key) && error.contains("mode 644"), "{error}");
        assert!(error.contains("chmod 600"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
}
