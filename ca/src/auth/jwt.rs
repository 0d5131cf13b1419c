//! Local verification of Kubernetes service-account JWTs against the
//! issuer's JWKS: no API-server round trip.
//!
//! Accepted: RS256 and ES256 signatures by a key of the issuer's JWKS
//! (looked up by `kid`), the configured `iss`, one of the configured
//! audiences, `exp`/`nbf` within a 30 s leeway. The identity comes from the
//! `kubernetes.io` claims, or from `sub` = `system:serviceaccount:<ns>:<sa>`.
//!
//! The checks themselves are `citadel-jwt`'s, the same code the proxy runs for
//! RequestAuthentication (including a key's `use`, which must be `sig`, and its `alg`,
//! which must be the token's); this module adds the algorithm allow-list, the key
//! lookup policy, JWKS loading and the service-account identity.
//!
//! JWKS hygiene: the keys are loaded again every [`JwtConfig::refresh_interval`] (so a
//! key the issuer removed stops being trusted within that interval) and when a token
//! names an unknown `kid` (at most every 30 s); a URL must be `https://`, redirects are
//! not followed (never to plain HTTP), and a document is refused as soon as reading it
//! passes [`MAX_JWKS_BYTES`]. A failed reload keeps the keys we have (logged), so an
//! issuer outage does not lock every workload out.

use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use citadel_identity::{SpiffeId, TrustDomain};
use citadel_jwt::{Alg, Jwks, Jwt, JwtError, Validation};
use serde::Deserialize;

use super::jwt_cache::{self, VerifiedTokens};
use super::{AuthError, AuthMethod, Authenticator, Caller, Credentials, Rejection};

/// Clock skew tolerated on `exp` and `nbf`, seconds.
pub const LEEWAY_SECS: i64 = 30;
/// An unknown `kid` triggers a JWKS refresh at most this often.
const REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Largest JWKS document accepted (enforced while reading).
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// Default time between two scheduled reloads of the JWKS.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Time limit of one JWKS fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A local JWKS file (re-read when a token names an unknown key).
    File(PathBuf),
    /// An HTTPS URL serving the JWKS (re-fetched when a token names an unknown key).
    Url(String),
}

impl JwksSource {
    /// `https://…` is a URL, anything else a file path.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("https://") {
            Ok(JwksSource::Url(s.to_owned()))
        } else if s.starts_with("http://") {
            Err(format!("JWKS URL {s} must use https"))
        } else {
            Ok(JwksSource::File(PathBuf::from(s)))
        }
    }
}

/// Settings of a [`JwtAuthenticator`].
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Expected `iss`.
    pub issuer: String,
    /// Accepted audiences (any one must be in `aud`).
    pub audiences: Vec<String>,
    /// The issuer's keys.
    pub jwks: JwksSource,
    /// Trust domain identities are minted in.
    pub trust_domain: TrustDomain,
    /// Time between two scheduled reloads of the keys.
    pub refresh_interval: Duration,
    /// PEM file of CA certificates trusted for an https JWKS, besides the webpki roots.
    pub extra_roots: Option<PathBuf>,
}

/// Could not load the JWKS.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot load JWKS from {source_name}: {reason}")]
pub struct JwksError {
    source_name: String,
    reason: String,
}

/// Verifies JWTs locally.
pub struct JwtAuthenticator {
    config: JwtConfig,
    keys: RwLock<Arc<Jwks>>,
    last_refresh: tokio::sync::Mutex<Instant>,
    http: crate::policy_jwks::Fetcher,
    /// Tokens already accepted with the current keys (see [`super::jwt_cache`]).
    verified: VerifiedTokens,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: Option<NamedObject>,
    pod: Option<NamedObject>,
    node: Option<NamedObject>,
}

#[derive(Debug, Deserialize)]
struct NamedObject {
    name: String,
    #[serde(default)]
    uid: Option<String>,
}

fn reject(reason: impl Into<String>) -> Rejection {
    Rejection {
        method: AuthMethod::Jwt.as_str(),
        reason: reason.into(),
    }
}

impl JwtAuthenticator {
    /// Loads the JWKS once; a source that cannot be read is an error. Nothing reloads it on
    /// a schedule: [`JwtAuthenticator::start`] does.
    pub async fn new(config: JwtConfig) -> Result<Self, JwksError> {
        let http =
            crate::policy_jwks::Fetcher::new(config.extra_roots.as_deref()).map_err(|e| {
                JwksError {
                    source_name: "https client".into(),
                    reason: format!("{e:#}"),
                }
            })?;
        let keys = Arc::new(fetch(&config.jwks, &http).await?);
        Ok(Self {
            config,
            verified: VerifiedTokens::new(keys.clone(), jwt_cache::CAPACITY),
            keys: RwLock::new(keys),
            last_refresh: tokio::sync::Mutex::new(Instant::now()),
            http,
        })
    }

    /// Loads the JWKS and reloads it every `refresh_interval` for as long as the
    /// authenticator lives (the task holds it weakly and ends with it).
    pub async fn start(config: JwtConfig) -> Result<Arc<Self>, JwksError> {
        let every = config.refresh_interval.max(Duration::from_secs(1));
        let this = Arc::new(Self::new(config).await?);
        let weak: Weak<Self> = Arc::downgrade(&this);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(this) = weak.upgrade() else { return };
                this.reload().await;
            }
        });
        Ok(this)
    }

    fn current(&self) -> Arc<Jwks> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the JWKS for an unknown `kid`, at most once per [`REFRESH_INTERVAL`].
    async fn refresh(&self) {
        let mut last = self.last_refresh.lock().await;
        if last.elapsed() < REFRESH_INTERVAL {
            return;
        }
        *last = Instant::now();
        self.load().await;
    }

    /// The scheduled reload.
    async fn reload(&self) {
        let mut last = self.last_refresh.lock().await;
        *last = Instant::now();
        self.load().await;
    }

    async fn load(&self) {
        match fetch(&self.config.jwks, &self.http).await {
            Ok(keys) => *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys),
            Err(e) => tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys we have"),
        }
    }

    fn verify(&self, token: &str, keys: &Jwks, now: i64) -> Result<Caller, KeyLookup> {
        let jwt = Jwt::parse(token)
            .map_err(|_| KeyLookup::Rejected(reject("token is not a well-formed JWT")))?;
        if !matches!(jwt.alg, Alg::RS256 | Alg::ES256) {
            return Err(KeyLookup::Rejected(reject(format!(
                "signature algorithm {:?} is not accepted (RS256 or ES256 only)",
                jwt.alg
            ))));
        }
        match &jwt.kid {
            Some(kid) if !keys.has_kid(kid) => return Err(KeyLookup::UnknownKid(kid.clone())),
            None if keys.keys().len() > 1 => {
                return Err(KeyLookup::Rejected(reject(
                    "token has no kid and the issuer has several keys",
                )));
            }
            _ => {}
        }
        let validation = Validation {
            issuer: Some(self.config.issuer.clone()),
            audiences: self.config.audiences.clone(),
            leeway_secs: LEEWAY_SECS.unsigned_abs(),
            required: vec!["exp", "iss", "aud", "sub"],
        };
        jwt.check_claims(&validation, now)
            .and_then(|()| jwt.verify_signature(keys))
            .map_err(|e| {
                KeyLookup::Rejected(reject(match e {
                    JwtError::VerificationFail => "signature does not verify".to_string(),
                    JwtError::UnknownIssuer => format!("issuer is not {}", self.config.issuer),
                    JwtError::AudienceNotAllowed => format!(
                        "audience is not one of [{}]",
                        self.config.audiences.join(", ")
                    ),
                    JwtError::KidAlgMismatch => "algorithm does not match the issuer key".into(),
                    JwtError::MissingClaim(c) => format!("required claim '{c}' is missing"),
                    JwtError::Expired => "token has expired".into(),
                    JwtError::NotYetValid => "token is not valid yet (nbf)".into(),
                    _ => "token is invalid".into(),
                }))
            })?;
        let claims: Claims = serde_json::from_value(serde_json::Value::Object(jwt.claims))
            .map_err(|_| {
                KeyLookup::Rejected(reject("claims are not valid JSON of the expected shape"))
            })?;
        self.identity(&claims).map_err(KeyLookup::Rejected)
    }

    fn identity(&self, claims: &Claims) -> Result<Caller, Rejection> {
        let from_sub = claims
            .sub
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'));
        let (namespace, name, pod, pod_uid, node) = match &claims.kubernetes {
            Some(k) => {
                let sa = k
                    .serviceaccount
                    .as_ref()
                    .ok_or_else(|| reject("kubernetes.io claims carry no serviceaccount"))?;
                if let Some((ns, sa_name)) = from_sub
                    && (ns != k.namespace || sa_name != sa.name)
                {
                    return Err(reject(
                        "sub and kubernetes.io claims name different service accounts",
                    ));
                }
                (
                    k.namespace.as_str(),
                    sa.name.as_str(),
                    k.pod.as_ref().map(|p| p.name.clone()),
                    k.pod.as_ref().and_then(|p| p.uid.clone()),
                    k.node.as_ref().map(|n| n.name.clone()),
                )
            }
            None => {
                let (ns, sa) = from_sub
                    .ok_or_else(|| reject("sub is not system:serviceaccount:<namespace>:<name>"))?;
                (ns, sa, None, None, None)
            }
        };
        let identity = SpiffeId::for_service_account(&self.config.trust_domain, namespace, name)
            .map_err(|e| reject(format!("service account does not form a SPIFFE ID: {e}")))?;
        Ok(Caller {
            identity,
            method: AuthMethod::Jwt,
            node,
            pod,
            pod_uid,
            certificate_serial: None,
        })
    }
}

enum KeyLookup {
    UnknownKid(String),
    Rejected(Rejection),
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, creds: &Credentials<'_>) -> Result<Option<Caller>, AuthError> {
        let Some(token) = creds.bearer_token else {
            return Ok(None);
        };
        // Answers of the keys in force now; a refresh below starts a new cache.
        let cache = self.verified.for_keys(&self.current());
        cache
            .get_or_review(token, creds.now, || {
                self.verify_and_refresh(token, creds.now)
            })
            .await
            .map(Some)
    }
}

impl JwtAuthenticator {
    /// Verifies `token` with the current keys; a token naming a key we do not have
    /// refreshes the JWKS (rate-limited) and is checked once more.
    async fn verify_and_refresh(&self, token: &str, now: i64) -> Result<Caller, AuthError> {
        match self.verify(token, &self.current(), now) {
            Ok(caller) => Ok(caller),
            Err(KeyLookup::Rejected(r)) => Err(r.into()),
            Err(KeyLookup::UnknownKid(_)) => {
                // The issuer may have rotated its keys: look again, once.
                self.refresh().await;
                match self.verify(token, &self.current(), now) {
                    Ok(caller) => Ok(caller),
                    Err(KeyLookup::Rejected(r)) => Err(r.into()),
                    Err(KeyLookup::UnknownKid(kid)) => {
                        Err(reject(format!("unknown signing key id (kid) {kid:?}")).into())
                    }
                }
            }
        }
    }
}

async fn fetch(source: &JwksSource, http: &crate::policy_jwks::Fetcher) -> Result<Jwks, JwksError> {
    let (name, bytes) = match source {
        JwksSource::File(path) => {
            let name = path.display().to_string();
            let err = |reason: String| JwksError {
                source_name: name.clone(),
                reason,
            };
            // Read at most one byte past the limit: a huge file is refused, not loaded.
            use tokio::io::AsyncReadExt;
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| err(e.to_string()))?;
            let mut bytes = Vec::new();
            file.take(MAX_JWKS_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| err(e.to_string()))?;
            if bytes.len() > MAX_JWKS_BYTES {
                return Err(err(format!("document larger than {MAX_JWKS_BYTES} bytes")));
            }
            (name, bytes)
        }
        JwksSource::Url(url) => {
            let text = http
                .get_limited(url, FETCH_TIMEOUT, MAX_JWKS_BYTES)
                .await
                .map_err(|e| JwksError {
                    source_name: url.clone(),
                    reason: e.to_string(),
                })?;
            (url.clone(), text.into_bytes())
        }
    };
    let text = String::from_utf8(bytes).map_err(|_| JwksError {
        source_name: name.clone(),
        reason: "not a JWKS document: not UTF-8".into(),
    })?;
    Jwks::parse(&text).map_err(|e| JwksError {
        source_name: name,
        reason: format!("not a JWKS document: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_e2e::tokens::{TEST_ISSUER, TokenIssuer};

    const NOW: i64 = 1_800_000_000;

    async fn authenticator(tokens: &TokenIssuer, dir: &std::path::Path) -> JwtAuthenticator {
        let path = dir.join("jwks.json");
        std::fs::write(&path, tokens.jwks()).unwrap();
        JwtAuthenticator::new(JwtConfig {
            issuer: TEST_ISSUER.into(),
            audiences: vec!["istio-ca".into()],
            jwks: JwksSource::File(path),
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            refresh_interval: Duration::from_secs(300),
            extra_roots: None,
        })
        .await
        .unwrap()
    }

    async fn check(auth: &JwtAuthenticator, token: &str, now: i64) -> Result<Caller, AuthError> {
        let creds = Credentials {
            bearer_token: Some(token),
            peer_chain: None,
            now,
        };
        auth.authenticate(&creds).await.map(|c| c.unwrap())
    }

    #[tokio::test]
    async fn an_accepted_token_is_remembered_for_the_keys_that_accepted_it() {
        let tmp = tempfile::tempdir().unwrap();
        let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
        let auth = authenticator(&tokens, tmp.path()).await;
        let token = tokens.sign_es256(&tokens.claims("a", "b", "istio-ca", NOW, 600));
        let caller = check(&auth, &token, NOW).await.unwrap();
        assert_eq!(caller.identity.as_str(), "spiffe://cluster.local/ns/a/sa/b");
        let cache = auth.verified.for_keys(&auth.current());
        assert_eq!(cache.len(), 1);
        assert_eq!(check(&auth, &token, NOW + 1).await.unwrap(), caller);
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn rejects_a_remembered_token_once_its_key_is_withdrawn() {
        let tmp = tempfile::tempdir().unwrap();
        let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
        let auth = authenticator(&tokens, tmp.path()).await;
        let token = tokens.sign_es256(&tokens.claims("a", "b", "istio-ca", NOW, 600));
        check(&auth, &token, NOW).await.unwrap();
        // A refresh brings a JWKS without the token's key (another issuer's keys).
        let other = TokenIssuer::new(TEST_ISSUER).unwrap();
        let keys = Jwks::parse(&other.jwks()).unwrap();
        *auth.keys.write().unwrap() = Arc::new(keys);
        let err = check(&auth, &token, NOW + 1).await.unwrap_err();
        assert!(err.to_string().contains("kid"), "{err}");
    }

    #[tokio::test]
    async fn rejects_a_remembered_token_after_it_expires() {
        let tmp = tempfile::tempdir().unwrap();
        let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
        let auth = authenticator(&tokens, tmp.path()).await;
        let token = tokens.sign_es256(&tokens.claims("a", "b", "istio-ca", NOW, 60));
        check(&auth, &token, NOW).await.unwrap();
        let err = check(&auth, &token, NOW + 60 + LEEWAY_SECS + 1)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }
}
