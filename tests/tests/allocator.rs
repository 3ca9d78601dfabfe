//! Both programs run on jemalloc with passage's options in effect.

#![cfg(not(target_env = "msvc"))]

use passage_tests::relays::program;

/// jemalloc prints the options it runs with when asked for statistics at
/// exit; the options baked into each binary must be among them.
#[test]
fn both_programs_run_on_tuned_jemalloc() {
    for name in ["passage-relay", "passage-client"] {
        let output = std::process::Command::new(program(name))
            .arg("--version")
            .env("_RJEM_MALLOC_CONF", "stats_print:true")
            .output()
            .expect("the program runs");
        assert!(output.status.success(), "{name} --version failed");
        let stats = String::from_utf8_lossy(&output.stderr);
        // jemalloc prints `opt.NAME: VALUE (arenas.NAME: VALUE)` for the
        // decay options; the parenthesis keeps 100 from matching 10000, the
        // default. (muzzy_decay_ms:0 restates jemalloc 5.3's default.)
        for option in ["opt.tcache_max: 1048576", "opt.dirty_decay_ms: 100 ("] {
            assert!(
                stats.contains(option),
                "{name}: {option} missing from:\n{stats}"
            );
        }
    }
}
