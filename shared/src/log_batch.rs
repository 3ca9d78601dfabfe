//! Log lines to stderr in batches. A line at info or below waits in memory
//! for at most [`FLUSH_DELAY`], so a busy program writes the lines of many
//! requests with one syscall instead of one each; a warning or an error
//! goes out at once, after every line before it.
//!
//! Measured with `scripts/request_cost.sh` at one connection: a write per
//! usage line cost the relay about one syscall and a few µs per request.
//! A background writer thread (tracing-appender) costs more, because every
//! line wakes that thread. What SIGKILL can lose is the last
//! [`FLUSH_DELAY`] of info lines; a panic, a normal exit and SIGTERM
//! lose nothing (the panic hook and [`LogFlush`] write what waits).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Longest time an info line waits before it is written.
pub const FLUSH_DELAY: Duration = Duration::from_millis(50);

/// Bytes that are written at once, however young.
const FLUSH_AT: usize = 64 * 1024;

/// The batching stderr writer given to the log subscriber.
#[derive(Clone, Default)]
pub struct BatchedStderr(Arc<Batch>);

/// Lines waiting to be written, and whether a flush is on its way.
#[derive(Default)]
struct Batch {
    pending: Mutex<Vec<u8>>,
    flush_scheduled: AtomicBool,
}

impl Batch {
    fn pending(&self) -> MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes what waits; the lock is held while writing, so lines keep
    /// their order whoever flushes.
    fn flush(&self) {
        write_out(&mut self.pending());
    }

    /// Makes sure a flush comes within [`FLUSH_DELAY`].
    fn schedule(self: &Arc<Self>) {
        if self.flush_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let due = DueFlush(self.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(FLUSH_DELAY).await;
                    drop(due);
                });
            }
            // No runtime here (start-up, shutdown): write now.
            Err(_) => drop(due),
        }
    }
}

/// A scheduled flush; it happens when this is dropped, whether its task ran
/// to the end or the runtime dropped it unfinished.
struct DueFlush(Arc<Batch>);

impl Drop for DueFlush {
    fn drop(&mut self) {
        self.0.flush_scheduled.store(false, Ordering::Release);
        self.0.flush();
    }
}

fn write_out(pending: &mut Vec<u8>) {
    if pending.is_empty() {
        return;
    }
    // Nowhere to report a failed log write: the line is dropped.
    let _ = io::stderr().lock().write_all(pending);
    pending.clear();
}

impl BatchedStderr {
    /// Writes every waiting line now.
    pub fn flush(&self) {
        self.0.flush();
    }
}

/// Writes one formatted line into the batch.
pub struct BatchWriter<'a> {
    batch: &'a Arc<Batch>,
    /// Written at once (a warning or an error, or a line of unknown level).
    urgent: bool,
}

impl Write for BatchWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut pending = self.batch.pending();
        pending.extend_from_slice(buf);
        if self.urgent || pending.len() >= FLUSH_AT {
            write_out(&mut pending);
            return Ok(buf.len());
        }
        drop(pending);
        self.batch.schedule();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = BatchWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        BatchWriter {
            batch: &self.0,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        BatchWriter {
            batch: &self.0,
            // tracing orders levels by verbosity: WARN and ERROR are the least.
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

/// Writes the waiting log lines when dropped: hold it for the life of the
/// program (in `main`).
#[must_use = "the last log lines are written when this is dropped"]
pub struct LogFlush(pub(crate) Option<BatchedStderr>);

impl Drop for LogFlush {
    fn drop(&mut self) {
        if let Some(writer) = &self.0 {
            writer.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(batch: &BatchedStderr) -> BatchWriter<'_> {
        BatchWriter {
            batch: &batch.0,
            urgent: false,
        }
    }

    #[test]
    fn info_lines_wait_and_warnings_push_them_out_in_order() {
        let batch = BatchedStderr::default();
        // Outside a runtime a line cannot wait: it is written at once.
        info(&batch).write_all(b"").unwrap();
        assert!(batch.0.pending().is_empty());

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            info(&batch).write_all(b"one\n").unwrap();
            info(&batch).write_all(b"two\n").unwrap();
            assert_eq!(&*batch.0.pending(), b"one\ntwo\n");
            assert!(batch.0.flush_scheduled.load(Ordering::Acquire));
            // A warning writes everything that waits, then itself.
            batch.make_writer().write_all(b"warn\n").unwrap();
            assert!(batch.0.pending().is_empty());
            // The scheduled flush finds nothing and lets the next line schedule again.
            tokio::time::sleep(FLUSH_DELAY * 2).await;
            assert!(!batch.0.flush_scheduled.load(Ordering::Acquire));
            info(&batch).write_all(b"three\n").unwrap();
            assert!(batch.0.flush_scheduled.load(Ordering::Acquire));
            tokio::time::sleep(FLUSH_DELAY * 2).await;
            assert!(batch.0.pending().is_empty());
        });
    }

    #[test]
    fn a_runtime_dropped_with_a_flush_pending_still_writes() {
        let batch = BatchedStderr::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async { info(&batch).write_all(b"last\n").unwrap() });
        assert!(!batch.0.pending().is_empty());
        drop(runtime);
        assert!(batch.0.pending().is_empty());
        assert!(!batch.0.flush_scheduled.load(Ordering::Acquire));
    }
}
