//! Several upstream API keys, used in turn. A key the upstream refuses
//! (401) or rate-limits (429) rests for a while and is skipped; when every
//! key rests, the one whose rest ends first is used anyway, so the app gets
//! the upstream's own answer (typically its 429 with `retry-after`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderValue, StatusCode};
use tracing::warn;

use crate::upstream_config::{ApiKey, UpstreamConfigError};

/// Rest of a key after a 429 without a usable `retry-after`.
pub const RATE_LIMIT_REST: Duration = Duration::from_secs(30);
/// Longest rest a `retry-after` can impose.
pub const MAX_REST: Duration = Duration::from_secs(600);
/// Rest of a key the upstream refused (401): it may have been rotated.
pub const REFUSED_REST: Duration = Duration::from_secs(300);

/// One key: its Authorization value and until when it rests.
#[derive(Debug)]
struct Key {
    authorization: HeaderValue,
    resting_until: Mutex<Option<Instant>>,
}

/// The relay's upstream keys.
#[derive(Debug)]
pub struct KeyRing {
    keys: Vec<Key>,
    next: AtomicUsize,
}

/// The key chosen for one request.
#[derive(Debug, Clone)]
pub struct KeyChoice {
    /// Which key (for [`KeyRing::report`]).
    pub index: usize,
    /// Its `Authorization` value (marked sensitive).
    pub authorization: HeaderValue,
}

impl KeyRing {
    /// A ring of `keys`; `None` when there are none.
    pub fn new(keys: &[ApiKey]) -> Result<Option<KeyRing>, UpstreamConfigError> {
        if keys.is_empty() {
            return Ok(None);
        }
        let keys = keys
            .iter()
            .map(|key| {
                let mut authorization = HeaderValue::try_from(format!("Bearer {}", key.expose()))
                    .map_err(|_| UpstreamConfigError::BadKey)?;
                authorization.set_sensitive(true);
                Ok(Key {
                    authorization,
                    resting_until: Mutex::new(None),
                })
            })
            .collect::<Result<Vec<_>, UpstreamConfigError>>()?;
        Ok(Some(KeyRing {
            keys,
            next: AtomicUsize::new(0),
        }))
    }

    /// The next key in turn that is not resting, or, if all rest, the one
    /// whose rest ends first.
    pub fn pick(&self) -> KeyChoice {
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.keys.len();
        let mut soonest: Option<(usize, Instant)> = None;
        for offset in 0..count {
            let index = (start + offset) % count;
            match self.resting_until(index) {
                Some(until) if until > now => {
                    if soonest.is_none_or(|(_, best)| until < best) {
                        soonest = Some((index, until));
                    }
                }
                _ => return self.choice(index),
            }
        }
        self.choice(soonest.map_or(start % count, |(index, _)| index))
    }

    /// Lets key `index` rest if the upstream answered `status` (401 or 429).
    pub fn report(&self, index: usize, status: StatusCode, headers: &HeaderMap) {
        let rest = match status {
            StatusCode::TOO_MANY_REQUESTS => retry_after(headers).unwrap_or(RATE_LIMIT_REST),
            StatusCode::UNAUTHORIZED => REFUSED_REST,
            _ => return,
        };
        let Some(key) = self.keys.get(index) else {
            return;
        };
        let until = Instant::now() + rest.min(MAX_REST);
        *key.resting_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(until);
        // The key itself never reaches a log: only its position.
        warn!(
            key = index + 1,
            of = self.keys.len(),
            status = status.as_u16(),
            rest_s = rest.min(MAX_REST).as_secs(),
            "upstream key resting"
        );
    }

    /// Every key, in the order configured (for a check of each).
    pub fn every(&self) -> Vec<KeyChoice> {
        (0..self.keys.len())
            .map(|index| self.choice(index))
            .collect()
    }

    fn resting_until(&self, index: usize) -> Option<Instant> {
        *self.keys[index]
            .resting_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn choice(&self, index: usize) -> KeyChoice {
        KeyChoice {
            index,
            authorization: self.keys[index].authorization.clone(),
        }
    }
}

/// A `retry-after` given in seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize) -> KeyRing {
        let keys: Vec<ApiKey> = (0..n).map(|i| ApiKey::new(format!("sk-{i}"))).collect();
        KeyRing::new(&keys).expect("valid").expect("some")
    }

    fn limited(seconds: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(seconds).expect("value"));
        headers
    }

    #[test]
    fn keys_take_turns_and_resting_ones_are_skipped() {
        let ring = ring(3);
        let picks: Vec<usize> = (0..6).map(|_| ring.pick().index).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        ring.report(1, StatusCode::TOO_MANY_REQUESTS, &limited("60"));
        ring.report(2, StatusCode::UNAUTHORIZED, &HeaderMap::new());
        assert!((0..6).all(|_| ring.pick().index == 0));
        ring.report(0, StatusCode::OK, &HeaderMap::new());
        assert_eq!(ring.pick().index, 0, "a 200 does not rest a key");
    }

    #[test]
    fn when_all_rest_the_soonest_awake_is_used() {
        let ring = ring(2);
        ring.report(0, StatusCode::TOO_MANY_REQUESTS, &limited("120"));
        ring.report(1, StatusCode::TOO_MANY_REQUESTS, &limited("5"));
        assert!((0..4).all(|_| ring.pick().index == 1));
    }

    #[test]
    fn a_short_rest_ends() {
        let ring = ring(2);
        ring.report(0, StatusCode::TOO_MANY_REQUESTS, &limited("0"));
        let picks: Vec<usize> = (0..4).map(|_| ring.pick().index).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        assert_eq!(retry_after(&limited("soon")), None);
        assert_eq!(
            retry_after(&limited("1.5")),
            Some(Duration::from_millis(1500))
        );
    }
}
