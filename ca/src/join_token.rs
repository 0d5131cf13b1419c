//! One-time join tokens: their format, their validation and `citadel token create`.
//!
//! A token is `citadel-join.` followed by 32 random bytes in unpadded base64url. The store
//! keeps only its SHA-256, the node it admits, the SPIFFE IDs that node's agent may request
//! for its workloads, and its lifetime.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use citadel_identity::{SpiffeId, TrustDomain};
use citadel_store::{JoinTokenRecord, NodeStore, StoreError};
use ring::rand::SecureRandom;

use crate::node::{InvalidNodeName, is_reserved, validate_node_name};

/// Every join token starts with this; bearer tokens without it are not join tokens.
pub const TOKEN_PREFIX: &str = "citadel-join.";
/// Random bytes in a token.
pub const TOKEN_RANDOM_BYTES: usize = 32;
/// Longest lifetime a join token may have (7 days).
pub const MAX_TTL_SECS: i64 = 7 * 86_400;

/// Why a join token cannot be created. Never contains a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenError {
    /// The node name is not a lowercase DNS-like name.
    #[error("--node: {0}")]
    InvalidNodeName(#[from] InvalidNodeName),
    /// No `--allow` was given.
    #[error("at least one --allow SPIFFE_ID is required")]
    NothingAllowed,
    /// An `--allow` value is not a SPIFFE ID a node may be allowed.
    #[error("--allow {id:?}: {reason}")]
    InvalidAllowedId {
        /// The value given.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The lifetime is not in (0, 7d].
    #[error("--ttl must be more than 0 and at most 7d (got {0} s)")]
    InvalidTtl(i64),
    /// The system random generator failed.
    #[error("the system random generator failed")]
    Random,
    /// The token could not be stored.
    #[error("storing the join token: {0}")]
    Store(#[from] StoreError),
}

/// True when `bearer` has the join-token form (the prefix), whether or not it is valid.
pub fn is_join_token(bearer: &str) -> bool {
    bearer.starts_with(TOKEN_PREFIX)
}

/// True when `bearer` is exactly [`TOKEN_PREFIX`] and the unpadded base64url of
/// [`TOKEN_RANDOM_BYTES`] bytes: anything else cannot be a token we made, so it is refused
/// without a store lookup.
pub fn is_well_formed(bearer: &str) -> bool {
    bearer
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| URL_SAFE_NO_PAD.decode(rest).ok())
        .is_some_and(|bytes| bytes.len() == TOKEN_RANDOM_BYTES)
}

/// SHA-256 of the token text, the only form in which a token is stored or looked up.
pub fn token_hash(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// A new random token: [`TOKEN_PREFIX`] + base64url-no-pad of 32 bytes from `rng`.
pub fn generate(rng: &dyn SecureRandom) -> Result<String, JoinTokenError> {
    let mut bytes = [0u8; TOKEN_RANDOM_BYTES];
    rng.fill(&mut bytes).map_err(|_| JoinTokenError::Random)?;
    Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// What a new join token admits, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenGrant {
    /// The node the token admits.
    pub node_name: String,
    /// The identities the node's agent may request for its workloads, without duplicates.
    pub allowed_ids: Vec<SpiffeId>,
    /// Lifetime, seconds.
    pub ttl_secs: i64,
}

/// Validates a token request (pure): the node name, each allowed ID (a SPIFFE ID of `td`
/// with a path, not under the reserved `/citadel/`), at least one allowed ID, and
/// `0 < ttl_secs <= 7d`.
pub fn validate_grant(
    td: &TrustDomain,
    node_name: &str,
    allowed: &[String],
    ttl_secs: i64,
) -> Result<JoinTokenGrant, JoinTokenError> {
    validate_node_name(node_name)?;
    if allowed.is_empty() {
        return Err(JoinTokenError::NothingAllowed);
    }
    if ttl_secs <= 0 || ttl_secs > MAX_TTL_SECS {
        return Err(JoinTokenError::InvalidTtl(ttl_secs));
    }
    let mut allowed_ids: Vec<SpiffeId> = Vec::with_capacity(allowed.len());
    for raw in allowed {
        let invalid = |reason: String| JoinTokenError::InvalidAllowedId {
            id: raw.clone(),
            reason,
        };
        let id = SpiffeId::parse(raw).map_err(|e| invalid(e.to_string()))?;
        if !id.is_member_of(td) {
            return Err(invalid(format!("not in trust domain {td}")));
        }
        if id.is_root() {
            return Err(invalid("a workload identity needs a path".into()));
        }
        if is_reserved(&id) {
            return Err(invalid(
                "identities under /citadel/ are reserved for Citadel itself".into(),
            ));
        }
        if !allowed_ids.contains(&id) {
            allowed_ids.push(id);
        }
    }
    Ok(JoinTokenGrant {
        node_name: node_name.to_owned(),
        allowed_ids,
        ttl_secs,
    })
}

/// The stored form of `token` granting `grant`, created at `now` (pure).
pub fn record_for(token: &str, grant: &JoinTokenGrant, now: i64) -> JoinTokenRecord {
    JoinTokenRecord {
        token_sha256: token_hash(token),
        node_name: grant.node_name.clone(),
        allowed_ids: grant.allowed_ids.iter().map(|id| id.to_string()).collect(),
        created_at: now,
        expires_at: now.saturating_add(grant.ttl_secs),
        used_at: None,
    }
}

/// `citadel token create`, after [`validate_grant`]: generates a token, stores its hash and
/// returns the token (shown once, never stored) with what was stored.
pub async fn create(
    store: &dyn NodeStore,
    grant: &JoinTokenGrant,
    now: i64,
) -> Result<(String, JoinTokenRecord), JoinTokenError> {
    let token = generate(&ring::rand::SystemRandom::new())?;
    let record = record_for(&token, grant, now);
    store.insert_join_token(&record).await?;
    Ok((token, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    #[test]
    fn token_has_the_prefix_and_32_random_bytes() {
        let rng = ring::rand::SystemRandom::new();
        let a = generate(&rng).unwrap();
        let b = generate(&rng).unwrap();
        assert_ne!(a, b);
        let body = a.strip_prefix(TOKEN_PREFIX).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(body).unwrap().len(), 32);
        assert!(!body.contains('='));
        assert!(is_join_token(&a));
        assert!(!is_join_token("eyJhbGciOi.x.y"));
    }

    #[test]
    fn token_is_stored_only_as_its_hash() {
        let grant = validate_grant(&td(), "node-a", &[WEB.into()], 3600).unwrap();
        let rec = record_for("citadel-join.secret", &grant, 100);
        assert_eq!(rec.token_sha256, token_hash("citadel-join.secret"));
        assert_ne!(rec.token_sha256, token_hash("citadel-join.secreT"));
        assert_eq!(rec.expires_at, 3700);
        assert_eq!(rec.used_at, None);
        assert_eq!(rec.allowed_ids, vec![WEB.to_string()]);
    }

    #[test]
    fn grant_requires_a_valid_node_an_allowed_id_and_a_bounded_ttl() {
        let ok = |node: &str, allow: &[&str], ttl: i64| {
            let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
            validate_grant(&td(), node, &allow, ttl)
        };
        ok("node-a", &[WEB], 1).unwrap();
        ok("node-a", &[WEB], MAX_TTL_SECS).unwrap();
        assert_eq!(
            ok("node-a", &[WEB, WEB], 60).unwrap().allowed_ids.len(),
            1,
            "duplicates are folded"
        );
        assert!(matches!(
            ok("Node_A", &[WEB], 60),
            Err(JoinTokenError::InvalidNodeName(_))
        ));
        assert_eq!(ok("node-a", &[], 60), Err(JoinTokenError::NothingAllowed));
        assert_eq!(ok("node-a", &[WEB], 0), Err(JoinTokenError::InvalidTtl(0)));
        assert_eq!(
            ok("node-a", &[WEB], MAX_TTL_SECS + 1),
            Err(JoinTokenError::InvalidTtl(MAX_TTL_SECS + 1))
        );
        for bad in [
            "web",
            "spiffe://other.td/ns/shop/sa/web",
            "spiffe://cluster.local",
            "spiffe://cluster.local/citadel/node/node-b",
            "spiffe://cluster.local/ns/shop/sa/web?x=1",
        ] {
            assert!(
                matches!(
                    ok("node-a", &[WEB, bad], 60),
                    Err(JoinTokenError::InvalidAllowedId { .. })
                ),
                "{bad}"
            );
        }
    }
}
