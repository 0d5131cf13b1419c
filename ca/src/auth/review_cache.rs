//! The TokenReview cache: a bounded LRU keyed by the SHA-256 of the token (the
//! token itself is never kept), and single-flight so that concurrent requests
//! with one token share one review.
//!
//! Accepted tokens stay until the token's own `exp` (read from the JWT payload
//! *without* trusting it: it can only shorten the stay) and at most
//! [`ReviewCache::max_ttl_secs`]; refused tokens stay [`NEGATIVE_TTL_SECS`]; an
//! API server that could not be asked is never cached.
//!
//! The local JWT authenticator keeps its verified tokens in one too (see
//! [`super::jwt_cache`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::sync::OnceCell;

use super::{AuthError, Caller};

/// How long a refused token's refusal is remembered, seconds.
pub const NEGATIVE_TTL_SECS: i64 = 2;

/// SHA-256 of a token: the cache key.
pub type TokenHash = [u8; 32];

/// Hashes a token for the cache.
pub fn token_hash(token: &str) -> TokenHash {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The `exp` claim of a JWT-shaped token, unverified (pure); `None` when the token is not a
/// JWT or has no numeric `exp`.
pub fn unverified_exp(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_i64()
}

/// Until when an outcome may be served from the cache (pure); `None`: not at all.
pub fn cache_until(
    outcome: &Result<Caller, AuthError>,
    exp: Option<i64>,
    now: i64,
    max_ttl_secs: i64,
) -> Option<i64> {
    match outcome {
        Ok(_) => {
            let until = exp
                .unwrap_or(i64::MAX)
                .min(now.saturating_add(max_ttl_secs));
            (until > now).then_some(until)
        }
        Err(AuthError::Rejected(_)) => Some(now + NEGATIVE_TTL_SECS),
        Err(_) => None,
    }
}

struct Entry {
    outcome: Result<Caller, AuthError>,
    until: i64,
    tick: u64,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<TokenHash, Entry>,
    order: BTreeMap<u64, TokenHash>,
    tick: u64,
}

type Flight = Arc<OnceCell<Result<Caller, AuthError>>>;

/// Cache plus in-flight reviews.
pub struct ReviewCache {
    capacity: usize,
    /// Longest time an accepted token is served from the cache, seconds.
    pub max_ttl_secs: i64,
    lru: Mutex<Lru>,
    in_flight: Mutex<HashMap<TokenHash, Flight>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReviewCache {
    /// A cache of at most `capacity` tokens.
    pub fn new(capacity: usize, max_ttl_secs: i64) -> Self {
        Self {
            capacity: capacity.max(1),
            max_ttl_secs,
            lru: Mutex::new(Lru::default()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Tokens currently cached.
    pub fn len(&self) -> usize {
        lock(&self.lru).entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, key: &TokenHash, now: i64) -> Option<Result<Caller, AuthError>> {
        let mut lru = lock(&self.lru);
        lru.tick += 1;
        let tick = lru.tick;
        let Lru { entries, order, .. } = &mut *lru;
        let entry = entries.get_mut(key)?;
        if entry.until <= now {
            order.remove(&entry.tick);
            entries.remove(key);
            return None;
        }
        order.remove(&entry.tick);
        entry.tick = tick;
        order.insert(tick, *key);
        Some(entry.outcome.clone())
    }

    fn put(&self, key: TokenHash, outcome: Result<Caller, AuthError>, until: i64) {
        let mut lru = lock(&self.lru);
        lru.tick += 1;
        let tick = lru.tick;
        let Lru { entries, order, .. } = &mut *lru;
        if let Some(old) = entries.remove(&key) {
            order.remove(&old.tick);
        }
        while entries.len() >= self.capacity {
            let Some((_, oldest)) = order.pop_first() else {
                break;
            };
            entries.remove(&oldest);
        }
        entries.insert(
            key,
            Entry {
                outcome,
                until,
                tick,
            },
        );
        order.insert(tick, key);
    }

    /// The outcome for `token`: from the cache, from a review already in flight, or from
    /// `review` (run once however many callers wait for it).
    pub async fn get_or_review<F, Fut>(
        &self,
        token: &str,
        now: i64,
        review: F,
    ) -> Result<Caller, AuthError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Caller, AuthError>>,
    {
        let key = token_hash(token);
        if let Some(hit) = self.get(&key, now) {
            return hit;
        }
        let flight = lock(&self.in_flight).entry(key).or_default().clone();
        let exp = unverified_exp(token);
        let outcome = flight
            .get_or_init(|| async {
                let outcome = review().await;
                if let Some(until) = cache_until(&outcome, exp, now, self.max_ttl_secs) {
                    self.put(key, outcome.clone(), until);
                }
                lock(&self.in_flight).remove(&key);
                outcome
            })
            .await;
        outcome.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthMethod, Rejection};
    use citadel_identity::SpiffeId;

    fn caller() -> Caller {
        Caller {
            identity: SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap(),
            method: AuthMethod::TokenReview,
            node: None,
            pod: None,
            pod_uid: None,
            certificate_serial: None,
        }
    }

    fn jwt_with_exp(exp: i64) -> String {
        let payload = URL_SAFE_NO_PAD.encode(format!("{{\"exp\":{exp}}}"));
        format!("e30.{payload}.sig")
    }

    #[test]
    fn accepted_tokens_are_cached_until_their_expiry_capped_by_the_max_ttl() {
        let ok = Ok(caller());
        assert_eq!(cache_until(&ok, Some(1_100), 1_000, 300), Some(1_100));
        assert_eq!(cache_until(&ok, Some(9_000), 1_000, 300), Some(1_300));
        assert_eq!(cache_until(&ok, None, 1_000, 300), Some(1_300));
        assert_eq!(
            cache_until(&ok, Some(999), 1_000, 300),
            None,
            "already expired"
        );
    }

    #[test]
    fn refusals_are_cached_briefly_and_unavailability_never() {
        let refused = Err(AuthError::Rejected(Rejection {
            method: "token_review",
            reason: "no".into(),
        }));
        assert_eq!(
            cache_until(&refused, Some(9_000), 1_000, 300),
            Some(1_000 + NEGATIVE_TTL_SECS)
        );
        let down = Err(AuthError::Unavailable("down".into()));
        assert_eq!(cache_until(&down, Some(9_000), 1_000, 300), None);
    }

    #[test]
    fn expiry_is_read_from_the_payload_without_verification() {
        assert_eq!(unverified_exp(&jwt_with_exp(42)), Some(42));
        assert_eq!(unverified_exp("opaque-token"), None);
        assert_eq!(unverified_exp("a.!!!.c"), None);
    }

    #[tokio::test]
    async fn least_recently_used_token_is_evicted_at_capacity() {
        let cache = ReviewCache::new(2, 300);
        let reviews = std::sync::atomic::AtomicUsize::new(0);
        let review = || async {
            reviews.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(caller())
        };
        for t in ["a", "b", "a", "c", "a", "b"] {
            cache.get_or_review(t, 0, review).await.unwrap();
        }
        // a, b, (a hit), c evicts b, (a hit), b again evicts c.
        assert_eq!(reviews.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert_eq!(cache.len(), 2);
    }

    #[tokio::test]
    async fn an_expired_entry_is_reviewed_again() {
        let cache = ReviewCache::new(8, 300);
        let token = jwt_with_exp(100);
        cache
            .get_or_review(&token, 50, || async { Ok(caller()) })
            .await
            .unwrap();
        let again = cache
            .get_or_review(&token, 100, || async {
                Err(AuthError::Unavailable("x".into()))
            })
            .await;
        assert!(
            again.is_err(),
            "the token's exp passed: not served from the cache"
        );
    }
}
