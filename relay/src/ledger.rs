//! The usage ledger: one entry per finished request (who, which model and
//! path, how it ended, tokens, bytes, time), and its embedded store, a
//! SQLite file written by a thread of its own in batches, off the request
//! path.
//!
//! A request only queues its entry (never waits on the disk, never wakes
//! the writer); the writer commits what arrived every [`BATCH_WINDOW`], so
//! a killed relay loses at most that much. Closing the ledger
//! (on SIGTERM, after the drain) commits everything queued.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, params};
use tracing::{error, warn};

pub use crate::usage_totals::LedgerEntry;
use crate::usage_totals::{Grouping, UsageRow};

/// Longest time an entry waits in memory before its batch is committed.
pub const BATCH_WINDOW: Duration = Duration::from_millis(250);
/// Most entries committed in one transaction.
const BATCH_MAX: usize = 2048;
/// Most entries queued for the writer; beyond it entries are dropped (and
/// counted) rather than making requests wait on a stalled disk.
const QUEUE_MAX: usize = 65_536;
/// The file's name in the data directory.
pub const LEDGER_FILE: &str = "usage.sqlite3";

/// Why the ledger could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite refused.
    #[error("usage ledger {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The writer thread could not be started.
    #[error("usage ledger writer: {0}")]
    Thread(std::io::Error),
}

/// What the writer thread is sent.
enum Message {
    Entry(Box<LedgerEntry>),
    /// Commit what is queued, answer, and stop.
    Close(SyncSender<()>),
}

/// The embedded ledger: a queue in front of a SQLite file.
#[derive(Debug)]
pub struct SqliteLedger {
    queue: SyncSender<Message>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Entries dropped because the queue was full.
    dropped: AtomicU64,
    path: PathBuf,
}

/// Opens (creating it if need be) the ledger file at `path`.
fn open_file(path: &Path) -> Result<Connection, LedgerError> {
    let sqlite = |source| LedgerError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let connection = Connection::open(path).map_err(sqlite)?;
    // WAL: the report reads while the relay writes; NORMAL: a committed
    // batch survives the process being killed (not a power cut).
    connection
        .execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS requests (
                 at_ms INTEGER NOT NULL,
                 client TEXT NOT NULL,
                 model TEXT,
                 path TEXT NOT NULL,
                 status INTEGER NOT NULL,
                 outcome TEXT NOT NULL,
                 input_tokens INTEGER NOT NULL,
                 output_tokens INTEGER NOT NULL,
                 bytes_in INTEGER NOT NULL,
                 bytes_out INTEGER NOT NULL,
                 duration_us INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS requests_at ON requests (at_ms);",
        )
        .map_err(sqlite)?;
    Ok(connection)
}

/// SQLite keeps integers signed; counts past `i64::MAX` are clamped.
fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Commits `batch` in one transaction.
fn commit(connection: &mut Connection, batch: &[LedgerEntry]) -> rusqlite::Result<()> {
    let transaction = connection.transaction()?;
    {
        let mut insert = transaction.prepare_cached(
            "INSERT INTO requests (at_ms, client, model, path, status, outcome,
                 input_tokens, output_tokens, bytes_in, bytes_out, duration_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for entry in batch {
            insert.execute(params![
                entry.at_ms,
                entry.client,
                entry.model,
                entry.path,
                entry.status,
                entry.outcome,
                signed(entry.input_tokens),
                signed(entry.output_tokens),
                signed(entry.bytes_in),
                signed(entry.bytes_out),
                signed(entry.duration_us),
            ])?;
        }
    }
    transaction.commit()
}

/// The writer thread: every [`BATCH_WINDOW`] (or when woken by a close)
/// it takes what is queued and commits it in one transaction. Requests
/// never wake it: queueing an entry is a channel send, nothing more.
fn write_batches(mut connection: Connection, queue: Receiver<Message>, path: PathBuf) {
    let mut batch: Vec<LedgerEntry> = Vec::new();
    let mut closing = None;
    let mut open = true;
    while open && closing.is_none() {
        std::thread::park_timeout(BATCH_WINDOW);
        loop {
            match queue.try_recv() {
                Ok(Message::Entry(entry)) => batch.push(*entry),
                Ok(Message::Close(done)) => closing = Some(done),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
            if batch.len() >= BATCH_MAX {
                write(&mut connection, &mut batch, &path);
            }
        }
        write(&mut connection, &mut batch, &path);
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Commits `batch` (if any) and empties it; a failure is logged.
fn write(connection: &mut Connection, batch: &mut Vec<LedgerEntry>, path: &Path) {
    if batch.is_empty() {
        return;
    }
    if let Err(e) = commit(connection, batch) {
        error!(file = %path.display(), entries = batch.len(), error = %e, "usage ledger: a batch could not be written");
    }
    batch.clear();
}

impl SqliteLedger {
    /// Opens the ledger file at `path` and starts its writer.
    pub fn open(path: &Path) -> Result<SqliteLedger, LedgerError> {
        let connection = open_file(path)?;
        let (queue, received) = std::sync::mpsc::sync_channel(QUEUE_MAX);
        let file = path.to_owned();
        let writer = std::thread::Builder::new()
            .name("usage-ledger".into())
            .spawn(move || write_batches(connection, received, file))
            .map_err(LedgerError::Thread)?;
        Ok(SqliteLedger {
            queue,
            writer: Mutex::new(Some(writer)),
            dropped: AtomicU64::new(0),
            path: path.to_owned(),
        })
    }

    /// Queues `entry` for the next batch; never waits.
    pub fn record(&self, entry: LedgerEntry) {
        match self.queue.try_send(Message::Entry(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if self
                    .dropped
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(10_000)
                {
                    warn!(file = %self.path.display(), "usage ledger: the writer is behind; entries are being dropped");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Entries dropped since the start because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Commits everything queued and stops the writer; blocks until done.
    pub fn close(&self) {
        let (done, finished) = std::sync::mpsc::sync_channel(1);
        if self.queue.send(Message::Close(done)).is_ok() {
            if let Some(writer) = &*self.writer.lock().unwrap_or_else(PoisonError::into_inner) {
                writer.thread().unpark();
            }
            let _ = finished.recv();
        }
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}

/// Reads the ledger at `path` (which must exist) for `passage-relay usage`:
/// totals per group for the requests that ended at or after `since_ms`.
pub fn read_totals(
    path: &Path,
    since_ms: i64,
    grouping: Grouping,
) -> Result<Vec<UsageRow>, LedgerError> {
    let sqlite = |source| LedgerError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let connection = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite)?;
    connection
        .busy_timeout(Duration::from_secs(5))
        .map_err(sqlite)?;
    let key = match grouping {
        Grouping::Client => "client",
        Grouping::Model => "COALESCE(model, '-')",
        // The UTC day, as the Redis report counts it too.
        Grouping::Day => "strftime('%Y-%m-%d', at_ms / 1000, 'unixepoch')",
    };
    let query = format!(
        "SELECT {key} AS key, COUNT(*),
             SUM(CASE WHEN status >= 400 OR outcome NOT IN ('complete', 'cache_hit') THEN 1 ELSE 0 END),
             SUM(input_tokens), SUM(output_tokens), SUM(bytes_in), SUM(bytes_out),
             SUM(duration_us)
         FROM requests WHERE at_ms >= ?1 GROUP BY key ORDER BY key"
    );
    let mut statement = connection.prepare(&query).map_err(sqlite)?;
    let rows = statement
        .query_map([since_ms], |row| {
            Ok(UsageRow {
                key: row.get(0)?,
                requests: unsigned(row.get(1)?),
                failed: unsigned(row.get(2)?),
                input_tokens: unsigned(row.get(3)?),
                output_tokens: unsigned(row.get(4)?),
                bytes_in: unsigned(row.get(5)?),
                bytes_out: unsigned(row.get(6)?),
                duration_us: unsigned(row.get(7)?),
            })
        })
        .map_err(sqlite)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sqlite)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(client: &str, model: Option<&str>, at_ms: i64, tokens: (u64, u64)) -> LedgerEntry {
        LedgerEntry {
            at_ms,
            client: client.into(),
            model: model.map(str::to_owned),
            path: "/v1/chat/completions".into(),
            status: 200,
            outcome: "complete".into(),
            input_tokens: tokens.0,
            output_tokens: tokens.1,
            bytes_in: 100,
            bytes_out: 200,
            duration_us: 1500,
        }
    }

    #[test]
    fn entries_are_committed_on_close_and_summed_by_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(LEDGER_FILE);
        let ledger = SqliteLedger::open(&path).expect("open");
        let day = 86_400_000;
        ledger.record(entry("a", Some("m1"), 10 * day, (10, 5)));
        ledger.record(entry("a", Some("m2"), 11 * day, (1, 1)));
        ledger.record(entry("b", None, 11 * day + 5, (2, 3)));
        let mut failed = entry("b", Some("m1"), 11 * day + 6, (0, 0));
        failed.status = 429;
        failed.outcome = "refused".into();
        ledger.record(failed);
        ledger.close();

        let by_client = read_totals(&path, 0, Grouping::Client).expect("read");
        assert_eq!(by_client.len(), 2);
        assert_eq!(
            (
                by_client[0].key.as_str(),
                by_client[0].requests,
                by_client[0].input_tokens,
                by_client[0].output_tokens
            ),
            ("a", 2, 11, 6)
        );
        assert_eq!((by_client[1].requests, by_client[1].failed), (2, 1));
        let by_model = read_totals(&path, 0, Grouping::Model).expect("read");
        let keys: Vec<&str> = by_model.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["-", "m1", "m2"]);
        let by_day = read_totals(&path, 11 * day, Grouping::Day).expect("read");
        assert_eq!(by_day.len(), 1, "the first day is before --since");
        assert_eq!(by_day[0].key, "1970-01-12");
        assert_eq!(by_day[0].requests, 3);
        assert_eq!(by_day[0].bytes_out, 600);
        assert_eq!(by_day[0].duration_us, 4500);
    }

    #[test]
    fn a_batch_is_committed_within_its_window_without_a_close() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(LEDGER_FILE);
        let ledger = SqliteLedger::open(&path).expect("open");
        ledger.record(entry("a", Some("m"), 1, (1, 1)));
        std::thread::sleep(BATCH_WINDOW * 4);
        let rows = read_totals(&path, 0, Grouping::Client).expect("read");
        assert_eq!(rows.len(), 1, "committed while the relay runs on");
        ledger.close();
    }
}
