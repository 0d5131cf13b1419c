//! First contact of a node agent off Kubernetes: a one-time join token from
//! `citadel token create`, sent as `authorization: Bearer citadel-join.…`.
//!
//! Authentication only looks the token up; it does not use it up. The issuer
//! spends it in the store transaction that records the node certificate in the
//! ledger, once the request has passed every other check: a bad CSR does not
//! burn the token, and neither does a failed ledger write.

use std::sync::Arc;

use async_trait::async_trait;
use citadel_identity::TrustDomain;
use citadel_store::NodeStore;

use super::{AuthError, AuthMethod, Authenticator, Caller, Credentials, Rejection};
use crate::join_token::{is_join_token, is_well_formed, token_hash};
use crate::node::node_identity;

/// Accepts unused, unexpired join tokens; the caller is the token's node agent,
/// `spiffe://<trust-domain>/citadel/node/<node>`.
pub struct JoinTokenAuthenticator {
    store: Arc<dyn NodeStore>,
    trust_domain: TrustDomain,
}

impl JoinTokenAuthenticator {
    /// Looks tokens up in `store`; node identities are minted in `trust_domain`.
    pub fn new(store: Arc<dyn NodeStore>, trust_domain: TrustDomain) -> Self {
        Self {
            store,
            trust_domain,
        }
    }
}

fn reject(reason: impl Into<String>) -> AuthError {
    AuthError::Rejected(Rejection {
        method: AuthMethod::JoinToken.as_str(),
        reason: reason.into(),
    })
}

#[async_trait]
impl Authenticator for JoinTokenAuthenticator {
    async fn authenticate(&self, creds: &Credentials<'_>) -> Result<Option<Caller>, AuthError> {
        let Some(token) = creds.bearer_token.filter(|t| is_join_token(t)) else {
            return Ok(None);
        };
        // Not one of ours whatever the store holds: no lookup for it.
        if !is_well_formed(token) {
            return Err(reject("malformed join token"));
        }
        let found = self
            .store
            .find_join_token(&token_hash(token))
            .await
            .map_err(|e| AuthError::Unavailable(format!("join tokens cannot be checked: {e}")))?;
        let Some(rec) = found else {
            return Err(reject(citadel_store::JoinTokenRefusal::Unknown.to_string()));
        };
        if let Some(refusal) = rec.refusal_at(creds.now) {
            return Err(reject(format!("{refusal} (node {})", rec.node_name)));
        }
        let identity = node_identity(&self.trust_domain, &rec.node_name)
            .map_err(|e| reject(format!("stored token names a bad node: {e}")))?;
        Ok(Some(Caller {
            identity,
            method: AuthMethod::JoinToken,
            node: Some(rec.node_name),
            pod: None,
            pod_uid: None,
            certificate_serial: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_store::JoinTokenRecord;
    use citadel_store::memory::MemoryStore;

    const TOKEN: &str = "citadel-join.c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2U";

    async fn authenticator(used_at: Option<i64>) -> JoinTokenAuthenticator {
        let store = Arc::new(MemoryStore::new());
        store
            .insert_join_token(&JoinTokenRecord {
                token_sha256: token_hash(TOKEN),
                node_name: "node-a".into(),
                allowed_ids: vec!["spiffe://cluster.local/ns/shop/sa/web".into()],
                created_at: 0,
                expires_at: 100,
                used_at,
            })
            .await
            .unwrap();
        JoinTokenAuthenticator::new(store, TrustDomain::new("cluster.local").unwrap())
    }

    fn creds(token: Option<&str>, now: i64) -> Credentials<'_> {
        Credentials {
            bearer_token: token,
            peer_chain: None,
            now,
        }
    }

    #[tokio::test]
    async fn accepts_a_valid_token_as_the_node_agent_without_using_it() {
        let a = authenticator(None).await;
        for _ in 0..2 {
            let caller = a.authenticate(&creds(Some(TOKEN), 50)).await.unwrap();
            let caller = caller.unwrap();
            assert_eq!(
                caller.identity.as_str(),
                "spiffe://cluster.local/citadel/node/node-a"
            );
            assert_eq!(caller.method, AuthMethod::JoinToken);
            assert_eq!(caller.node.as_deref(), Some("node-a"));
        }
    }

    #[tokio::test]
    async fn other_bearer_tokens_are_not_join_tokens() {
        let a = authenticator(None).await;
        assert_eq!(a.authenticate(&creds(None, 50)).await, Ok(None));
        assert_eq!(
            a.authenticate(&creds(Some("eyJhbGciOiJFUzI1NiJ9.e30.sig"), 50))
                .await,
            Ok(None)
        );
    }

    #[tokio::test]
    async fn rejects_unknown_used_and_expired_tokens_without_echoing_them() {
        let fresh = authenticator(None).await;
        let used = authenticator(Some(10)).await;
        let cases = [
            (
                &fresh,
                "citadel-join.b3RoZXJvdGhlcm90aGVyb3RoZXJvdGhlcm90aGVyb3Q",
                50,
                "unknown",
            ),
            (&fresh, "citadel-join.other", 50, "malformed"),
            (&fresh, TOKEN, 100, "expired"),
            (&used, TOKEN, 50, "already been used"),
        ];
        for (a, token, now, expected) in cases {
            let err = a.authenticate(&creds(Some(token), now)).await.unwrap_err();
            assert!(matches!(err, AuthError::Rejected(_)), "{err:?}");
            let text = err.to_string();
            assert!(text.contains(expected), "{text}");
            assert!(!text.contains(token), "{text}");
        }
    }
}
