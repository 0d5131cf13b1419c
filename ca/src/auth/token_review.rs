//! Kubernetes TokenReview: `authorization: Bearer <service-account token>`
//! is posted to the API server (`POST /apis/authentication.k8s.io/v1/tokenreviews`)
//! with the configured audiences; the answer decides.
//!
//! Accepted: `status.authenticated`, a `status.audiences` that shares an audience with the
//! ones asked for (an empty one means "the API server's own audience", which is not ours),
//! and a `system:serviceaccount:<ns>:<sa>` user. Pod name and UID and node name come from
//! `status.user.extra`. Outcomes are cached ([`super::review_cache`]); an API server that
//! cannot be asked (down, timed out, refusing the CA) is `Unavailable`, never
//! `Unauthenticated`. Join tokens are left to their own authenticator.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use citadel_identity::{Escaped, SpiffeId, TrustDomain};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

use super::review_cache::ReviewCache;
use super::{AuthError, AuthMethod, Authenticator, Caller, Credentials, Rejection};
use crate::join_token::is_join_token;

/// `extra` key of the pod name (pod-bound tokens).
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `extra` key of the pod UID (pod-bound tokens).
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// `extra` key of the node name (pod-bound tokens, Kubernetes 1.30+ by default).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// Default audience asked for.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// Default bound on one review.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of tokens cached.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;
/// Default longest time an accepted token is cached, seconds.
pub const DEFAULT_MAX_CACHE_TTL_SECS: i64 = 300;

/// Settings of a [`TokenReviewAuthenticator`].
#[derive(Debug, Clone)]
pub struct TokenReviewConfig {
    /// Audiences asked for (`spec.audiences`); at least one.
    pub audiences: Vec<String>,
    /// Trust domain identities are minted in.
    pub trust_domain: TrustDomain,
    /// Bound on one review (kube's own retries on 503 included).
    pub timeout: Duration,
    /// Tokens cached at most.
    pub cache_capacity: usize,
    /// Longest time an accepted token is served from the cache, seconds.
    pub max_cache_ttl_secs: i64,
}

impl TokenReviewConfig {
    /// Defaults for `audiences` in `trust_domain`.
    pub fn new(audiences: Vec<String>, trust_domain: TrustDomain) -> Self {
        Self {
            audiences,
            trust_domain,
            timeout: DEFAULT_TIMEOUT,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            max_cache_ttl_secs: DEFAULT_MAX_CACHE_TTL_SECS,
        }
    }
}

fn reject(reason: impl Into<String>) -> Rejection {
    Rejection {
        method: AuthMethod::TokenReview.as_str(),
        reason: reason.into(),
    }
}

fn first<'a>(extra: Option<&'a BTreeMap<String, Vec<String>>>, key: &str) -> Option<&'a String> {
    extra?.get(key)?.first().filter(|v| !v.is_empty())
}

/// Judges a TokenReview answer (pure): the caller it proves, or why not.
pub fn judge_review(
    status: &TokenReviewStatus,
    requested: &[String],
    td: &TrustDomain,
) -> Result<Caller, Rejection> {
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("no reason given");
        return Err(reject(format!(
            "the API server did not authenticate the token: {why}"
        )));
    }
    let granted = status.audiences.as_deref().unwrap_or_default();
    if !granted.iter().any(|a| requested.contains(a)) {
        return Err(reject(format!(
            "the API server accepted the token for audiences [{}], none of [{}]",
            granted.join(", "),
            requested.join(", ")
        )));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    let (ns, sa) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| reject(format!("user {username:?} is not a service account")))?;
    let identity = SpiffeId::for_service_account(td, ns, sa)
        .map_err(|e| reject(format!("service account does not form a SPIFFE ID: {e}")))?;
    let extra = user.and_then(|u| u.extra.as_ref());
    Ok(Caller {
        identity,
        method: AuthMethod::TokenReview,
        node: first(extra, EXTRA_NODE_NAME).cloned(),
        pod: first(extra, EXTRA_POD_NAME).cloned(),
        pod_uid: first(extra, EXTRA_POD_UID).cloned(),
        certificate_serial: None,
    })
}

/// Authenticates bearer tokens with the API server's TokenReview.
pub struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    config: TokenReviewConfig,
    cache: ReviewCache,
}

impl TokenReviewAuthenticator {
    /// Reviews through `client`.
    pub fn new(client: kube::Client, config: TokenReviewConfig) -> Self {
        Self {
            api: Api::all(client),
            cache: ReviewCache::new(config.cache_capacity, config.max_cache_ttl_secs),
            config,
        }
    }

    /// Tokens currently cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let request = TokenReview {
            metadata: Default::default(),
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.config.audiences.clone()),
            },
            status: None,
        };
        let answer = tokio::time::timeout(
            self.config.timeout,
            self.api.create(&PostParams::default(), &request),
        )
        .await
        .map_err(|_| {
            AuthError::Unavailable(format!(
                "TokenReview took longer than {:?}: the Kubernetes API server is not answering",
                self.config.timeout
            ))
        })?
        .map_err(|e| {
            // kube's error may quote the request; it never holds the token, but say little.
            AuthError::Unavailable(format!("TokenReview failed: {}", describe(&e)))
        })?;
        let status = answer.status.unwrap_or_default();
        let caller = judge_review(&status, &self.config.audiences, &self.config.trust_domain)?;
        Ok(caller)
    }
}

fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            format!("API server answered {} {}: {}", s.code, s.reason, s.message)
        }
        other => other.to_string(),
    }
}

#[async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, creds: &Credentials<'_>) -> Result<Option<Caller>, AuthError> {
        let Some(token) = creds.bearer_token.filter(|t| !is_join_token(t)) else {
            return Ok(None);
        };
        let outcome = self
            .cache
            .get_or_review(token, creds.now, || self.review(token))
            .await;
        if let Err(e) = &outcome {
            tracing::debug!(error = %Escaped(e), "TokenReview refused");
        }
        outcome.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn aud() -> Vec<String> {
        vec!["istio-ca".into()]
    }

    fn status(user: &str, audiences: Option<Vec<&str>>) -> TokenReviewStatus {
        let extra: BTreeMap<String, Vec<String>> = [
            (EXTRA_POD_NAME, "web-1"),
            (EXTRA_POD_UID, "uid-1"),
            (EXTRA_NODE_NAME, "node-a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), vec![v.to_owned()]))
        .collect();
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: audiences.map(|a| a.into_iter().map(str::to_owned).collect()),
            error: None,
            user: Some(UserInfo {
                username: Some(user.into()),
                uid: Some("sa-uid".into()),
                groups: None,
                extra: Some(extra),
            }),
        }
    }

    #[test]
    fn service_account_with_a_compatible_audience_is_accepted_with_pod_and_node() {
        let c = judge_review(
            &status(
                "system:serviceaccount:shop:web",
                Some(vec!["other", "istio-ca"]),
            ),
            &aud(),
            &td(),
        )
        .unwrap();
        assert_eq!(c.identity.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(c.method, AuthMethod::TokenReview);
        assert_eq!(
            (c.pod.as_deref(), c.pod_uid.as_deref(), c.node.as_deref()),
            (Some("web-1"), Some("uid-1"), Some("node-a"))
        );
    }

    #[test]
    fn unauthenticated_token_is_rejected_with_the_servers_reason() {
        let mut s = status("system:serviceaccount:shop:web", Some(vec!["istio-ca"]));
        s.authenticated = None;
        s.error = Some("invalid bearer token".into());
        let r = judge_review(&s, &aud(), &td()).unwrap_err();
        assert!(r.reason.contains("invalid bearer token"), "{}", r.reason);
    }

    #[test]
    fn an_audience_unaware_answer_is_rejected() {
        // A server that ignored spec.audiences reports its own audiences (or none, which means
        // its own): the token was not checked against ours.
        for audiences in [
            Some(vec!["https://kubernetes.default.svc"]),
            Some(vec![]),
            None,
        ] {
            let s = status("system:serviceaccount:shop:web", audiences);
            let r = judge_review(&s, &aud(), &td()).unwrap_err();
            assert!(r.reason.contains("audiences"), "{}", r.reason);
        }
    }

    #[test]
    fn a_user_that_is_not_a_service_account_is_rejected() {
        for user in [
            "alice",
            "system:node:node-a",
            "system:serviceaccount:onlyns",
        ] {
            let s = status(user, Some(vec!["istio-ca"]));
            assert!(judge_review(&s, &aud(), &td()).is_err(), "{user}");
        }
    }
}
