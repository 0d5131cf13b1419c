//! Verified-token cache of the local JWT authenticator.
//!
//! A workload sends the same projected service-account token with every request until the
//! kubelet rotates it, and checking an ES256 signature costs about as much as checking the
//! CSR's. So an accepted token is remembered, keyed by its SHA-256 (the token itself is never
//! kept), in a bounded LRU ([`ReviewCache`]) until its own `exp` (no leeway: the authenticator
//! re-checks a token in its leeway window) and at most [`MAX_TTL_SECS`].
//!
//! An answer is only as good as the keys it was checked with: the cache belongs to one
//! generation of the issuer's JWKS, and a new JWKS (a refresh that may have removed a key)
//! starts an empty one, so a token whose key was withdrawn is checked again at once.

use std::sync::{Arc, Mutex};

use citadel_jwt::Jwks;

use super::review_cache::ReviewCache;

/// Tokens remembered at most (one per workload on a busy CA, with room to spare).
pub const CAPACITY: usize = 16_384;
/// Longest time an accepted token is served from the cache, seconds.
pub const MAX_TTL_SECS: i64 = 600;

/// The cache of the current JWKS generation.
pub struct VerifiedTokens {
    capacity: usize,
    current: Mutex<Generation>,
}

struct Generation {
    keys: Arc<Jwks>,
    cache: Arc<ReviewCache>,
}

impl VerifiedTokens {
    /// An empty cache for `keys`, of at most `capacity` tokens.
    pub fn new(keys: Arc<Jwks>, capacity: usize) -> Self {
        Self {
            capacity,
            current: Mutex::new(Generation {
                keys,
                cache: Arc::new(ReviewCache::new(capacity, MAX_TTL_SECS)),
            }),
        }
    }

    /// The cache of answers checked with exactly `keys`: the current one, or a new empty
    /// one (which becomes current) when the JWKS changed since.
    pub fn for_keys(&self, keys: &Arc<Jwks>) -> Arc<ReviewCache> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&current.keys, keys) {
            *current = Generation {
                keys: keys.clone(),
                cache: Arc::new(ReviewCache::new(self.capacity, MAX_TTL_SECS)),
            };
        }
        current.cache.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"a","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    #[test]
    fn a_new_jwks_starts_an_empty_cache() {
        let first = Arc::new(Jwks::parse(JWKS).unwrap());
        let tokens = VerifiedTokens::new(first.clone(), 8);
        let cache = tokens.for_keys(&first);
        assert!(Arc::ptr_eq(&cache, &tokens.for_keys(&first)));
        // Equal content, but fetched again: a refresh, whose answers start afresh.
        let refreshed = Arc::new(Jwks::parse(JWKS).unwrap());
        let after = tokens.for_keys(&refreshed);
        assert!(!Arc::ptr_eq(&cache, &after));
        assert!(after.is_empty());
    }
}
