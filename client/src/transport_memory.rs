//! Which transport last worked for each relay, kept in a small JSON file
//! (`--state-file`), so that a client restarted on a network that blocks
//! UDP starts TCP at once instead of paying QUIC's head start again.
//!
//! The file is a convenience: one that cannot be read or written changes
//! nothing but that head start, and is only logged at debug level.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use passage_shared::transport::TransportKind;
use tracing::debug;

/// The remembered transport of each relay, by address.
#[derive(Debug, Default)]
pub struct TransportMemory {
    path: Option<PathBuf>,
    known: Mutex<BTreeMap<String, String>>,
}

impl TransportMemory {
    /// Reads `path` (nothing remembered if absent or unreadable); `None`
    /// keeps the memory in this process only.
    pub fn load(path: Option<PathBuf>) -> TransportMemory {
        let known = path
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        TransportMemory {
            path,
            known: Mutex::new(known),
        }
    }

    /// The transport that last worked for `relay`, if known.
    pub fn get(&self, relay: &str) -> Option<TransportKind> {
        match self.lock().get(relay).map(String::as_str) {
            Some("quic") => Some(TransportKind::Quic),
            Some("tcp") => Some(TransportKind::Tcp),
            _ => None,
        }
    }

    /// Records that `kind` worked for `relay`; writes the file when that changed it.
    pub fn remember(&self, relay: &str, kind: TransportKind) {
        let snapshot = {
            let mut known = self.lock();
            if known.get(relay).map(String::as_str) == Some(kind.name()) {
                return;
            }
            known.insert(relay.to_owned(), kind.name().to_owned());
            known.clone()
        };
        let Some(path) = &self.path else { return };
        if let Err(e) = write_atomically(path, &snapshot) {
            debug!(path = %path.display(), error = %e, "cannot record the transport that worked");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes `known` to a temporary file beside `path`, then renames it over
/// `path`, so a reader never sees half a file.
fn write_atomically(
    path: &std::path::Path,
    known: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_vec_pretty(known).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

/// Where the client keeps its state by default: `$XDG_STATE_HOME`, else
/// `~/.local/state`, under `passage-client/transports.json`.
pub fn default_state_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state"))
        })?;
    Some(base.join("passage-client").join("transports.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_transport_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/transports.json");
        let memory = TransportMemory::load(Some(path.clone()));
        assert_eq!(memory.get("relay:4433"), None);
        memory.remember("relay:4433", TransportKind::Tcp);
        memory.remember("other:4433", TransportKind::Quic);
        let again = TransportMemory::load(Some(path));
        assert_eq!(again.get("relay:4433"), Some(TransportKind::Tcp));
        assert_eq!(again.get("other:4433"), Some(TransportKind::Quic));
    }

    #[test]
    fn an_unreadable_file_remembers_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("transports.json");
        std::fs::write(&path, b"not json").expect("write");
        assert_eq!(TransportMemory::load(Some(path)).get("relay:4433"), None);
    }
}
