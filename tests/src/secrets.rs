//! Secret custody across the suite: tests register every upstream key and
//! app Authorization value they use; every log line produced in-process
//! (through [`crate::stack::init_test_logging`]) and every line a real
//! relay process writes is searched for them. A leak is recorded and
//! fails the next test of the binary whose stack, relay or process
//! checks (usually the one that leaked; the message quotes the line).

use std::sync::Mutex;

static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LEAKS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Registers a value that must never appear in any log line.
pub fn register(secret: &str) {
    let mut secrets = lock(&SECRETS);
    if !secrets.iter().any(|s| s == secret) {
        secrets.push(secret.to_owned());
    }
}

/// Records `text` as a leak if it contains a registered secret; returns
/// whether it did.
pub fn scan(text: &str) -> bool {
    let leaked = lock(&SECRETS)
        .iter()
        .any(|secret| text.contains(secret.as_str()));
    if leaked {
        lock(&LEAKS).push(text.to_owned());
    }
    leaked
}

/// Panics (unless the thread already is) if any log line so far held a secret.
pub fn assert_none_leaked() {
    if std::thread::panicking() {
        return;
    }
    // Taken, so one leak fails one test (with the line), not every later one.
    let leaks = std::mem::take(&mut *lock(&LEAKS));
    assert!(
        leaks.is_empty(),
        "a secret appeared in {} log line(s), e.g.: {}",
        leaks.len(),
        leaks[0]
    );
}

/// A `tracing` writer that prints each event as libtest's capture expects
/// and scans it for secrets.
#[derive(Debug, Default)]
pub struct CheckedLine(Vec<u8>);

impl std::io::Write for CheckedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for CheckedLine {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        scan(&text);
        // print! (not eprint!) is what libtest captures per test.
        print!("{text}");
    }
}

/// Makes a [`CheckedLine`] per event.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckedWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CheckedWriter {
    type Writer = CheckedLine;

    fn make_writer(&'a self) -> CheckedLine {
        CheckedLine::default()
    }
}
