//! Where the relay keeps what outlives one request: the rate, token and
//! concurrency counts, and the usage ledger. Two backends behind the one
//! [`StateStore`] trait: [`Embedded`] (this process's memory and a SQLite
//! file, the default) and [`redis::RedisState`] (one Redis
//! shared by every relay of a team, so a client's limits hold across them).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use passage_shared::error_body::ApiError;

use crate::answer_cache::{CacheKey, CachedAnswer, MemoryCache};
use crate::ledger::{LedgerEntry, LedgerError, SqliteLedger};
use crate::limits::{Limits, LocalAdmission};
use crate::policy::Applied;

pub mod redis;

/// Longest a request waits on the state store, over all its calls; past
/// it the store counts as unavailable for that request.
pub const STORE_WAIT: Duration = Duration::from_millis(250);

/// What a store does when the shared backend cannot be reached in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FailMode {
    /// Serve under this relay's own counts (the default), and say so.
    #[default]
    Open,
    /// Refuse with 503 `state_unavailable`.
    Closed,
}

/// Which backend keeps the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Limits in memory; the ledger in `DIR/usage.sqlite3`.
    Embedded {
        /// The relay's data directory.
        data_dir: PathBuf,
        /// Whether the directory was asked for (`--data-dir`): then a
        /// ledger that cannot be written there stops the start; the
        /// default directory (the PKI's) may be read-only, and then the
        /// relay runs without a ledger and says so.
        required: bool,
    },
    /// Everything in the Redis at this `redis://` or `rediss://` URL.
    Redis {
        /// The URL, password and all (never logged whole).
        url: String,
    },
}

/// The state settings of a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// Where the state lives.
    pub backend: Backend,
    /// What happens while a shared backend is unreachable.
    pub fail: FailMode,
    /// Most bytes the response cache holds (0: no cache).
    pub cache_bytes: u64,
    /// Whether finished requests go into the usage ledger.
    pub ledger: bool,
}

/// The response cache's default size: 256 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// A request admitted under its client's limits: holds its concurrency
/// slot until settled or dropped.
#[derive(Debug)]
pub enum Admission {
    /// Counted by this relay alone.
    Local(LocalAdmission),
    /// Counted in the shared store.
    Shared(redis::SharedAdmission),
}

impl Admission {
    /// Counts the request's `tokens` and frees its concurrency slot.
    pub async fn settle(self, tokens: u64) {
        match self {
            Admission::Local(local) => local.record_tokens(tokens),
            Admission::Shared(shared) => shared.settle(tokens),
        }
    }
}

/// How a store is doing, for the status line, metrics and health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    /// Working as configured.
    Ok,
    /// Serving, but not as configured (e.g. on local counts while the
    /// shared store is unreachable): why.
    Degraded(String),
}

/// The relay's state backend.
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Admits a request of `client` under `applied`'s limits, or returns
    /// the refusal (429, or 503 when the store must be reached and is not).
    fn admit<'a>(
        &'a self,
        client: &'a Arc<str>,
        applied: &'a Applied,
    ) -> BoxFuture<'a, Result<Admission, ApiError>>;

    /// Puts a finished request in the usage ledger; never waits.
    fn record(&self, entry: LedgerEntry);

    /// The answer cached under `key`, if any; a store that is down or slow
    /// counts as a miss.
    fn cache_get<'a>(&'a self, key: &'a CacheKey) -> BoxFuture<'a, Option<Arc<CachedAnswer>>>;

    /// Keeps `answer` under `key` for its time to live (within
    /// [`STORE_WAIT`]; a store that is down or slow keeps nothing).
    fn cache_put(&self, key: CacheKey, answer: CachedAnswer) -> BoxFuture<'_, ()>;

    /// Writes out everything queued; called once, when the relay stops.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// How the store is doing.
    fn health(&self) -> StoreHealth;

    /// The backend's name: `embedded` or `redis`.
    fn backend(&self) -> &'static str;

    /// Its failures and losses since the relay started.
    fn counts(&self) -> StoreCounts;
}

/// What went wrong with a store since the relay started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Calls that failed or did not answer in time.
    pub failures: u64,
    /// Ledger entries lost.
    pub ledger_dropped: u64,
}

/// Opens the store `config` names: creates the data directory's ledger, or
/// connects to Redis (which need not be up yet: it is retried).
pub fn open(config: &StateConfig) -> Result<Arc<dyn StateStore>, StateError> {
    match &config.backend {
        Backend::Embedded { data_dir, required } => {
            match Embedded::open(data_dir, config.cache_bytes, config.ledger) {
                Ok(store) => Ok(Arc::new(store)),
                Err(e) if !required => {
                    tracing::warn!(error = %e, "no usage ledger: its default directory (the PKI directory) cannot be written; set --data-dir");
                    Ok(Arc::new(Embedded::open(
                        data_dir,
                        config.cache_bytes,
                        false,
                    )?))
                }
                Err(e) => Err(e),
            }
        }
        Backend::Redis { url } => Ok(Arc::new(redis::RedisState::open(
            url,
            config.fail,
            config.cache_bytes,
            config.ledger,
        )?)),
    }
}

/// Why the state store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The embedded ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The data directory could not be made.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The Redis URL is not one.
    #[error("--state: {0}")]
    RedisUrl(String),
}

/// The default backend: this relay's memory and a SQLite ledger.
#[derive(Debug)]
pub struct Embedded {
    limits: Limits,
    ledger: Option<Arc<SqliteLedger>>,
    cache: MemoryCache,
}

impl Embedded {
    /// Opens the ledger in `data_dir` (made if missing, mode 0700) unless
    /// `ledger` is off, with a cache of at most `cache_bytes`.
    pub fn open(
        data_dir: &std::path::Path,
        cache_bytes: u64,
        ledger: bool,
    ) -> Result<Embedded, StateError> {
        let ledger = match ledger {
            true => {
                make_private_dir(data_dir)?;
                let file = data_dir.join(crate::ledger::LEDGER_FILE);
                Some(Arc::new(SqliteLedger::open(&file)?))
            }
            false => None,
        };
        Ok(Embedded {
            limits: Limits::default(),
            ledger,
            cache: MemoryCache::new(cache_bytes),
        })
    }
}

/// Makes `dir` (and its parents) if missing; new ones are private.
fn make_private_dir(dir: &std::path::Path) -> Result<(), StateError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateError::DataDir {
            path: dir.to_owned(),
            source,
        })
}

impl StateStore for Embedded {
    fn admit<'a>(
        &'a self,
        client: &'a Arc<str>,
        applied: &'a Applied,
    ) -> BoxFuture<'a, Result<Admission, ApiError>> {
        let admitted = self.limits.admit(client, applied).map(Admission::Local);
        Box::pin(std::future::ready(admitted))
    }

    fn record(&self, entry: LedgerEntry) {
        if let Some(ledger) = &self.ledger {
            ledger.record(entry);
        }
    }

    fn cache_get<'a>(&'a self, key: &'a CacheKey) -> BoxFuture<'a, Option<Arc<CachedAnswer>>> {
        Box::pin(std::future::ready(self.cache.get(key)))
    }

    fn cache_put(&self, key: CacheKey, answer: CachedAnswer) -> BoxFuture<'_, ()> {
        self.cache.put(key, answer);
        Box::pin(std::future::ready(()))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // The writer commits on its own thread; wait for it off the
            // runtime's threads.
            if let Some(ledger) = self.ledger.clone() {
                let _ = tokio::task::spawn_blocking(move || ledger.close()).await;
            }
        })
    }

    fn health(&self) -> StoreHealth {
        StoreHealth::Ok
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn counts(&self) -> StoreCounts {
        StoreCounts {
            failures: 0,
            ledger_dropped: self.ledger.as_ref().map_or(0, |l| l.dropped()),
        }
    }
}
