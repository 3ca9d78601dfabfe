//! The response cache, opt-in per client: a successful answer to a
//! repeatable request (a chat completion, an embedding, the model list) is
//! kept for a while and given again to the same request from the same
//! cache scope (the client, unless its rules name a shared scope), without
//! calling the upstream.
//!
//! The key is a SHA-256 of the scope, method, path and query, the headers
//! that select an account or shape the answer (`OpenAI-Organization`,
//! `OpenAI-Project`, `Accept-Encoding`, and the app's `Authorization` when
//! it is what goes upstream) and the body. Only 200 answers are kept, whole: a stream cut short, cancelled or
//! over the size limit is not. A streamed answer (SSE) is kept event by
//! event and replayed with the same event boundaries.
//!
//! Kept in this process's memory (moka, weighed in bytes, each entry with
//! its own time to live) by default, or in Redis with `--state`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use passage_shared::frame::Header;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The request and response header that asks for and reports the cache:
/// `use` or `skip` on a request, `hit` or `miss` on an answer.
pub const CACHE_HEADER: &str = "x-passage-cache";
/// Largest request body of a cached request; larger ones pass uncached.
pub const MAX_CACHED_BODY: u64 = 1024 * 1024;
/// How long an answer is kept unless the client's rules say otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Largest answer kept unless the client's rules say otherwise.
pub const DEFAULT_MAX_ENTRY: usize = 1024 * 1024;
/// Response headers never kept: cookies belong to the one answer.
const UNKEPT_HEADERS: [&str; 3] = ["set-cookie", "content-length", CACHE_HEADER];

/// The digest a request is found by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// The key's hex form (the Redis key's tail).
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// An answer as kept: its status, headers and body pieces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedAnswer {
    /// Always 200 today.
    pub status: u16,
    /// The upstream's headers, less `UNKEPT_HEADERS`.
    pub headers: Vec<Header>,
    /// The body: one piece, or one per SSE event.
    pub pieces: Vec<Bytes>,
    /// How long it is kept from when it was stored.
    pub ttl: Duration,
}

impl CachedAnswer {
    /// Bytes it takes, about: what the size cap counts.
    pub fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len() + 16)
            .sum();
        let body: usize = self.pieces.iter().map(|p| p.len() + 16).sum();
        64 + headers + body
    }
}

/// Whether answers to `method path` may be cached: repeatable reads and
/// generations, never uploads, files, audio, images or sessions.
pub fn cacheable(method: &str, path: &str) -> bool {
    match method {
        "POST" => matches!(
            path,
            "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/embeddings"
                | "/v1/moderations"
                | "/v1/responses"
        ),
        "GET" => path == "/v1/models" || path.starts_with("/v1/models/"),
        _ => false,
    }
}

/// The key of a request in `scope`. With `own_key` (the app's
/// Authorization goes upstream, the relay holds no key) the app's key is
/// part of it: an answer is never given to another key.
pub fn key(
    scope: &str,
    method: &str,
    path_and_query: &str,
    headers: &[Header],
    own_key: bool,
    body: &[u8],
) -> CacheKey {
    let mut digest = Sha256::new();
    // Each part with its length first, so no two requests run together.
    let mut part = |bytes: &[u8]| {
        digest.update((bytes.len() as u64).to_be_bytes());
        digest.update(bytes);
    };
    part(scope.as_bytes());
    part(method.as_bytes());
    part(path_and_query.as_bytes());
    let authorization = if own_key { "authorization" } else { "" };
    for name in [
        "openai-organization",
        "openai-project",
        "accept-encoding",
        authorization,
    ] {
        let value = headers
            .iter()
            .find(|h| !name.is_empty() && h.name.eq_ignore_ascii_case(name))
            .map_or(&[][..], |h| &h.value[..]);
        part(value);
    }
    part(body);
    CacheKey(digest.finalize().into())
}

/// Collects a 200 answer as it streams past, up to a size.
#[derive(Debug)]
pub struct CacheFill {
    /// The key it will be kept under.
    pub key: CacheKey,
    ttl: Duration,
    max: usize,
    headers: Vec<Header>,
    sse: bool,
    body: BytesMut,
    /// Whether it grew past `max` (then it is not kept).
    over: bool,
}

impl CacheFill {
    /// Starts collecting the answer with `headers` (its status is 200).
    pub fn new(key: CacheKey, ttl: Duration, max: usize, headers: &[Header]) -> CacheFill {
        let sse = headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("content-type") && h.value.starts_with(b"text/event-stream")
        });
        CacheFill {
            key,
            ttl,
            max,
            headers: headers
                .iter()
                .filter(|h| {
                    !UNKEPT_HEADERS
                        .iter()
                        .any(|n| h.name.eq_ignore_ascii_case(n))
                })
                .cloned()
                .collect(),
            sse,
            body: BytesMut::new(),
            over: false,
        }
    }

    /// Takes the next body chunk.
    pub fn observe(&mut self, data: &[u8]) {
        if self.over {
            return;
        }
        if self.body.len() + data.len() > self.max {
            self.over = true;
            self.body = BytesMut::new();
            return;
        }
        self.body.extend_from_slice(data);
    }

    /// The answer to keep, unless it grew too large.
    pub fn finish(self) -> Option<CachedAnswer> {
        if self.over {
            return None;
        }
        let body = self.body.freeze();
        let pieces = if self.sse {
            sse_events(&body)
        } else {
            vec![body]
        };
        Some(CachedAnswer {
            status: 200,
            headers: self.headers,
            pieces,
            ttl: self.ttl,
        })
    }
}

/// `body` cut after each blank line that ends an SSE event.
fn sse_events(body: &Bytes) -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut start = 0;
    let mut at = 0;
    while at < body.len() {
        let end = if body[at..].starts_with(b"\n\n") {
            Some(at + 2)
        } else if body[at..].starts_with(b"\r\n\r\n") {
            Some(at + 4)
        } else {
            None
        };
        match end {
            Some(end) => {
                events.push(body.slice(start..end));
                start = end;
                at = end;
            }
            None => at += 1,
        }
    }
    if start < body.len() {
        events.push(body.slice(start..));
    }
    events
}

/// Per-entry time to live for moka.
struct EntryTtl;

impl moka::Expiry<CacheKey, Arc<CachedAnswer>> for EntryTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedAnswer>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The cache in this process's memory, capped in bytes.
#[derive(Clone)]
pub struct MemoryCache {
    entries: moka::sync::Cache<CacheKey, Arc<CachedAnswer>>,
}

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCache")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl MemoryCache {
    /// A cache of at most `capacity` bytes.
    pub fn new(capacity: u64) -> MemoryCache {
        MemoryCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .weigher(|_key, value: &Arc<CachedAnswer>| {
                    u32::try_from(value.size()).unwrap_or(u32::MAX)
                })
                .expire_after(EntryTtl)
                .build(),
        }
    }

    /// The answer kept under `key`, if any.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<CachedAnswer>> {
        self.entries.get(key)
    }

    /// Keeps `answer` under `key`.
    pub fn put(&self, key: CacheKey, answer: CachedAnswer) {
        self.entries.insert(key, Arc::new(answer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, value: &str) -> Header {
        Header {
            name: name.into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    #[test]
    fn keys_differ_by_scope_body_and_account_headers() {
        let base = key("a", "POST", "/v1/chat/completions", &[], false, b"{}");
        assert_eq!(
            base,
            key("a", "POST", "/v1/chat/completions", &[], false, b"{}")
        );
        assert_ne!(
            base,
            key("b", "POST", "/v1/chat/completions", &[], false, b"{}")
        );
        assert_ne!(
            base,
            key("a", "POST", "/v1/chat/completions", &[], false, b"{ }")
        );
        assert_ne!(base, key("a", "POST", "/v1/embeddings", &[], false, b"{}"));
        let project = [header("OpenAI-Project", "p1")];
        assert_ne!(
            base,
            key("a", "POST", "/v1/chat/completions", &project, false, b"{}")
        );
        // Lengths first: moving a byte between parts changes the key.
        assert_ne!(
            key("ab", "", "", &[], false, b""),
            key("a", "b", "", &[], false, b"")
        );
        // The app's own key counts only when it is what goes upstream.
        let keyed = [header("Authorization", "Bearer sk-1")];
        let other = [header("Authorization", "Bearer sk-2")];
        let path = "/v1/chat/completions";
        assert_ne!(
            key("a", "POST", path, &keyed, true, b"{}"),
            key("a", "POST", path, &other, true, b"{}")
        );
        assert_eq!(
            key("a", "POST", path, &keyed, false, b"{}"),
            key("a", "POST", path, &other, false, b"{}")
        );
    }

    #[test]
    fn only_repeatable_endpoints_are_cacheable() {
        assert!(cacheable("POST", "/v1/chat/completions"));
        assert!(cacheable("GET", "/v1/models/gpt-4o"));
        for (method, path) in [
            ("POST", "/v1/files"),
            ("POST", "/v1/audio/transcriptions"),
            ("GET", "/v1/realtime"),
            ("DELETE", "/v1/models/ft-x"),
            ("POST", "/v1/chat/completions/x"),
        ] {
            assert!(!cacheable(method, path), "{method} {path}");
        }
    }

    #[test]
    fn a_stream_is_kept_event_by_event_and_a_large_answer_not_at_all() {
        let headers = [
            header("content-type", "text/event-stream"),
            header("set-cookie", "a=b"),
        ];
        let mut fill = CacheFill::new(CacheKey([0; 32]), DEFAULT_TTL, 1000, &headers);
        fill.observe(b"data: 1\n\nda");
        fill.observe(b"ta: 2\n\ndata: [DONE]\n\n");
        let answer = fill.finish().expect("kept");
        assert_eq!(
            answer.pieces,
            [
                Bytes::from_static(b"data: 1\n\n"),
                Bytes::from_static(b"data: 2\n\n"),
                Bytes::from_static(b"data: [DONE]\n\n"),
            ]
        );
        assert_eq!(answer.headers.len(), 1, "no cookie kept");

        let mut fill = CacheFill::new(CacheKey([0; 32]), DEFAULT_TTL, 10, &[]);
        fill.observe(b"0123456789");
        fill.observe(b"x");
        assert!(fill.finish().is_none());
    }

    #[test]
    fn the_memory_cache_keeps_to_its_byte_cap() {
        let cap = 64 * 1024;
        let cache = MemoryCache::new(cap);
        let answer = CachedAnswer {
            status: 200,
            headers: Vec::new(),
            pieces: vec![Bytes::from(vec![b'x'; 4096])],
            ttl: DEFAULT_TTL,
        };
        for i in 0..64u8 {
            cache.put(CacheKey([i; 32]), answer.clone());
        }
        cache.entries.run_pending_tasks();
        let kept = cache.entries.weighted_size();
        assert!(kept <= cap, "{kept} bytes kept under a cap of {cap}");
        assert!(cache.entries.entry_count() < 64);
        assert!(cache.entries.entry_count() >= 8, "it keeps what fits");
    }

    #[test]
    fn the_memory_cache_forgets_after_the_entrys_ttl() {
        let cache = MemoryCache::new(1 << 20);
        let answer = |ttl| CachedAnswer {
            status: 200,
            headers: Vec::new(),
            pieces: vec![Bytes::from_static(b"{}")],
            ttl,
        };
        cache.put(CacheKey([1; 32]), answer(Duration::from_millis(50)));
        cache.put(CacheKey([2; 32]), answer(Duration::from_secs(60)));
        assert!(cache.get(&CacheKey([1; 32])).is_some());
        std::thread::sleep(Duration::from_millis(120));
        assert!(cache.get(&CacheKey([1; 32])).is_none());
        assert!(cache.get(&CacheKey([2; 32])).is_some());
    }
}
