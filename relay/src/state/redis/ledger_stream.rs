//! The usage ledger as a Redis stream: written in batches off the request
//! path, and read back for `passage-relay usage`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use super::store_link::Shared;
use super::{
    BATCH_MAX, LEDGER_RETENTION_MS, LEDGER_STREAM, PENDING_MAX, PROBE_INTERVAL, client_for,
};
use crate::ledger::{BATCH_WINDOW, LedgerEntry};
use crate::state::STORE_WAIT;
use crate::usage_totals::{Grouping, UsageRow, totals};

/// Appends ledger entries to the stream in batches: what arrived in each
/// [`BATCH_WINDOW`] goes in one pipeline. Entries
/// that could not be written wait (up to [`PENDING_MAX`]) and go with the
/// next batch; at close, what is queued gets written, or counted as lost.
pub(super) async fn write_ledger(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<LedgerEntry>,
    dropped: Arc<AtomicU64>,
    closing: tokio_util::sync::CancellationToken,
) {
    let mut pending: VecDeque<LedgerEntry> = VecDeque::new();
    loop {
        let closed = gather(&mut queue, &mut pending, &closing).await;
        let mut written = write_pending(&shared, &mut pending).await;
        if closed {
            if !written {
                // One more try: the store may have been slow only once.
                written = write_pending(&shared, &mut pending).await;
            }
            if !written {
                dropped.fetch_add(pending.len() as u64, Ordering::Relaxed);
            }
            return;
        }
        while pending.len() > PENDING_MAX {
            pending.pop_front();
            dropped.fetch_add(1, Ordering::Relaxed);
        }
        if !written {
            tokio::select! {
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
                () = closing.cancelled() => {}
            }
        }
    }
}

/// Waits [`BATCH_WINDOW`] (or for the close), then takes what is queued:
/// requests never wake the writer. True once the ledger is closing.
pub(super) async fn gather(
    queue: &mut mpsc::Receiver<LedgerEntry>,
    pending: &mut VecDeque<LedgerEntry>,
    closing: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(BATCH_WINDOW) => {}
        () = closing.cancelled() => {}
    }
    loop {
        match queue.try_recv() {
            Ok(entry) => pending.push_back(entry),
            Err(mpsc::error::TryRecvError::Empty) => return closing.is_cancelled(),
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
}

/// Writes the pending entries, a pipeline of at most [`BATCH_MAX`] at a
/// time; true when none is left.
pub(super) async fn write_pending(
    shared: &Arc<Shared>,
    pending: &mut VecDeque<LedgerEntry>,
) -> bool {
    while !pending.is_empty() {
        let count = pending.len().min(BATCH_MAX);
        let oldest = LedgerEntry::now_ms() - LEDGER_RETENTION_MS;
        let mut pipe = redis::pipe();
        for entry in pending.iter().take(count) {
            let Ok(text) = serde_json::to_string(entry) else {
                continue;
            };
            pipe.cmd("XADD")
                .arg(LEDGER_STREAM)
                .arg("MINID")
                .arg("~")
                .arg(oldest)
                .arg("*")
                .arg("e")
                .arg(text)
                .ignore();
        }
        let mut connection = shared.connection.clone();
        let run = pipe.query_async::<()>(&mut connection);
        match tokio::time::timeout(STORE_WAIT * 4, run).await {
            Ok(Ok(())) => {
                pending.drain(..count);
            }
            Ok(Err(e)) => {
                shared.background_failed(&e);
                return false;
            }
            Err(_) => {
                shared.note_failure();
                return false;
            }
        }
    }
    true
}

/// Totals of the ledger stream at `url` since `since_ms`, for
/// `passage-relay usage`.
pub async fn read_totals(
    url: &str,
    since_ms: i64,
    grouping: Grouping,
) -> Result<Vec<UsageRow>, String> {
    let client = client_for(url).map_err(|e| e.to_string())?;
    let connect = client.get_multiplexed_async_connection();
    let mut connection = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => return Err(format!("cannot reach the state store: {e}")),
        Err(_) => return Err("cannot reach the state store: no answer within 5 s".to_owned()),
    };
    let mut entries = Vec::new();
    let mut from = format!("{since_ms}-0");
    loop {
        let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(LEDGER_STREAM)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut connection)
            .await
            .map_err(|e| format!("reading {LEDGER_STREAM}: {e}"))?;
        let Some(last) = page.ids.last().map(|id| id.id.clone()) else {
            break;
        };
        entries.extend(page.ids.iter().filter_map(|id| {
            id.get::<String>("e")
                .and_then(|text| serde_json::from_str::<LedgerEntry>(&text).ok())
        }));
        // The next page starts just after this one's last id.
        from = format!("({last}");
    }
    Ok(totals(&entries, grouping))
}
