//! The keys of RequestAuthentication rules travel with the policies: the CA fetches each
//! `jwksUri` (or the issuer's OIDC discovery document, then its `jwks_uri`) and ships the
//! JWKS inline in the policy set, so proxies never call out (Istio's default, where istiod
//! inlines the keys).
//!
//! - HTTPS only, at most [`MAX_DOCUMENT_BYTES`] per document, the rule's `timeout`
//!   (default 5 s) per fetch, redirects not followed.
//! - Each URI is fetched again every `refresh_interval` (Istio: 20 min), and one
//!   `retry_interval` (Istio: 1 min) after a failure; never more often than that, so a
//!   failing issuer is not hammered.
//! - A failed fetch keeps the last good keys; it is logged, counted in
//!   `citadel_policy_jwks_fetch_errors_total`, and `citadel_policy_jwks_stale` says how
//!   many URIs are without fresh keys.
//!
//! The decisions (which URIs a set needs, which are due, the set with its keys) are pure;
//! [`start`] is the thin task around them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use citadel_policy::model::RequestAuthenticationSpec;
use citadel_proto::citadel::v1::ResolvedJwks;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::CaMetrics;
use crate::policy_set::{PolicySnapshot, canonical_version};

/// Largest JWKS or discovery document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 512 * 1024;
/// Fetch time limit when a rule sets no `timeout` (Istio's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the CA fetches policy JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyJwksConfig {
    /// Time between two fetches of a URI whose last fetch succeeded.
    pub refresh_interval: Duration,
    /// Time between two fetches of a URI whose last fetch failed.
    pub retry_interval: Duration,
    /// PEM file of extra roots trusted for JWKS fetches (besides the webpki roots).
    pub extra_roots: Option<PathBuf>,
}

impl Default for PolicyJwksConfig {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(20 * 60),
            retry_interval: Duration::from_secs(60),
            extra_roots: None,
        }
    }
}

/// The remote key sources a set needs: URI -> fetch time limit (pure).
pub fn remote_sources(snapshot: &PolicySnapshot) -> BTreeMap<String, Duration> {
    let mut out = BTreeMap::new();
    for o in snapshot
        .objects
        .iter()
        .filter(|o| o.kind == "RequestAuthentication")
    {
        for rule in rules_of(&o.json) {
            if let Some(uri) = citadel_policy::remote_jwks_key(&rule) {
                let timeout = rule
                    .timeout
                    .as_deref()
                    .and_then(citadel_policy::parse_timeout)
                    .unwrap_or(DEFAULT_TIMEOUT);
                out.entry(uri).or_insert(timeout);
            }
        }
    }
    out
}

fn rules_of(json: &str) -> Vec<citadel_policy::model::JwtRule> {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("spec").cloned())
        .and_then(|spec| serde_json::from_value::<RequestAuthenticationSpec>(spec).ok())
        .and_then(|spec| spec.jwt_rules)
        .unwrap_or_default()
}

/// `snapshot` with each RequestAuthentication carrying the keys of its rules that are
/// in `keys` (URI -> JWKS document), and the version of the whole (pure).
pub fn with_keys(snapshot: &PolicySnapshot, keys: &BTreeMap<String, String>) -> PolicySnapshot {
    let mut objects = snapshot.objects.clone();
    for o in objects
        .iter_mut()
        .filter(|o| o.kind == "RequestAuthentication")
    {
        let mut resolved: BTreeMap<String, String> = BTreeMap::new();
        for rule in rules_of(&o.json) {
            if let Some(uri) = citadel_policy::remote_jwks_key(&rule)
                && let Some(jwks) = keys.get(&uri)
            {
                resolved.insert(uri, jwks.clone());
            }
        }
        o.resolved_jwks = resolved
            .into_iter()
            .map(|(uri, jwks)| ResolvedJwks { uri, jwks })
            .collect();
    }
    PolicySnapshot {
        version: canonical_version(&objects),
        objects,
    }
}

/// What the CA knows of one URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The last good JWKS document.
    pub jwks: Option<String>,
    /// When it was last fetched (successfully or not).
    pub last_attempt: Option<Instant>,
    /// Whether the last fetch failed.
    pub failing: bool,
}

/// Whether a URI is due for a fetch at `now` (pure).
pub fn due(entry: Option<&Entry>, now: Instant, config: &PolicyJwksConfig) -> bool {
    let Some(e) = entry else { return true };
    let Some(last) = e.last_attempt else {
        return true;
    };
    let wait = if e.failing {
        config.retry_interval
    } else {
        config.refresh_interval
    };
    now.saturating_duration_since(last) >= wait
}

/// Why a fetch failed (logged; never contains key material).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(String);

/// Fetches key documents.
#[derive(Clone)]
pub struct Fetcher {
    http: reqwest::Client,
}

impl Fetcher {
    /// An HTTPS-only client trusting the webpki roots and `extra_roots`.
    pub fn new(extra_roots: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut b = reqwest::Client::builder()
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = extra_roots {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        Ok(Self { http: b.build()? })
    }

    async fn get(&self, uri: &str, timeout: Duration) -> Result<String, FetchError> {
        self.get_limited(uri, timeout, MAX_DOCUMENT_BYTES).await
    }

    /// One GET of an https URL: redirects are not followed (so never to plain HTTP), and the
    /// body is read chunk by chunk and refused as soon as it passes `max_bytes`, so a
    /// hostile or broken server cannot make the CA buffer more than that.
    pub async fn get_limited(
        &self,
        uri: &str,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<String, FetchError> {
        if !uri.starts_with("https://") {
            return Err(FetchError(format!("{uri} is not an https URL")));
        }
        let fetch = async {
            let mut resp = self
                .http
                .get(uri)
                .send()
                .await
                .map_err(|e| FetchError(format!("{uri}: {e}")))?;
            if resp.status().is_redirection() {
                // Following could lead to plain HTTP or another host: the URL must be exact.
                return Err(FetchError(format!(
                    "{uri}: answered a redirect (HTTP {}); redirects are not followed",
                    resp.status()
                )));
            }
            if !resp.status().is_success() {
                return Err(FetchError(format!("{uri}: HTTP {}", resp.status())));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| FetchError(format!("{uri}: {e}")))?
            {
                if body.len() + chunk.len() > max_bytes {
                    return Err(FetchError(format!(
                        "{uri}: document larger than {max_bytes} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            String::from_utf8(body).map_err(|_| FetchError(format!("{uri}: not UTF-8")))
        };
        tokio::time::timeout(timeout, fetch)
            .await
            .map_err(|_| FetchError(format!("{uri}: no answer within {timeout:?}")))?
    }

    /// The JWKS of a source: the document itself, or for an OIDC discovery URL the
    /// document its `jwks_uri` names. The JWKS must have a usable key.
    pub async fn fetch(&self, uri: &str, timeout: Duration) -> Result<String, FetchError> {
        let mut doc = self.get(uri, timeout).await?;
        if uri.ends_with("/.well-known/openid-configuration") {
            let jwks_uri = serde_json::from_str::<serde_json::Value>(&doc)
                .ok()
                .and_then(|v| v.get("jwks_uri")?.as_str().map(str::to_owned))
                .ok_or_else(|| {
                    FetchError(format!("{uri}: no jwks_uri in the discovery document"))
                })?;
            doc = self.get(&jwks_uri, timeout).await?;
        }
        citadel_policy::citadel_jwt::Jwks::parse(&doc)
            .map_err(|e| FetchError(format!("{uri}: {e}")))?;
        Ok(doc)
    }
}

/// Starts resolving: fetches every URI the current set needs once (so the first set
/// served already carries keys), then follows `sources` and the refresh schedule until
/// `shutdown`. Returns the watch of sets with their keys, which the policy stream serves.
pub async fn start(
    mut sources: watch::Receiver<Arc<PolicySnapshot>>,
    config: PolicyJwksConfig,
    metrics: Arc<CaMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<watch::Receiver<Arc<PolicySnapshot>>> {
    let fetcher = Fetcher::new(config.extra_roots.as_deref())?;
    let mut cache: BTreeMap<String, Entry> = BTreeMap::new();
    let source = sources.borrow_and_update().clone();
    resolve_due(&fetcher, &source, &mut cache, &config, &metrics).await;
    let first = with_keys(&source, &good_keys(&cache));
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        // Check the schedule at least this often (it is cheap: no fetch unless due).
        let tick = config
            .retry_interval
            .min(config.refresh_interval)
            .min(Duration::from_secs(5));
        loop {
            tokio::select! {
                changed = sources.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let source = sources.borrow_and_update().clone();
            resolve_due(&fetcher, &source, &mut cache, &config, &metrics).await;
            let next = with_keys(&source, &good_keys(&cache));
            if tx.borrow().version != next.version {
                tracing::info!(version = %next.version, "policy set (with fetched JWKS) changed");
                tx.send_replace(Arc::new(next));
            }
        }
    });
    Ok(rx)
}

fn good_keys(cache: &BTreeMap<String, Entry>) -> BTreeMap<String, String> {
    cache
        .iter()
        .filter_map(|(u, e)| e.jwks.clone().map(|j| (u.clone(), j)))
        .collect()
}

async fn resolve_due(
    fetcher: &Fetcher,
    source: &PolicySnapshot,
    cache: &mut BTreeMap<String, Entry>,
    config: &PolicyJwksConfig,
    metrics: &CaMetrics,
) {
    let needed = remote_sources(source);
    cache.retain(|uri, _| needed.contains_key(uri));
    let now = Instant::now();
    for (uri, timeout) in &needed {
        if !due(cache.get(uri), now, config) {
            continue;
        }
        let result = fetcher.fetch(uri, *timeout).await;
        let entry = cache.entry(uri.clone()).or_insert(Entry {
            jwks: None,
            last_attempt: None,
            failing: false,
        });
        entry.last_attempt = Some(Instant::now());
        match result {
            Ok(doc) => {
                if entry.jwks.as_deref() != Some(doc.as_str()) {
                    tracing::info!(jwks_uri = %uri, "fetched new JWKS");
                }
                entry.jwks = Some(doc);
                entry.failing = false;
            }
            Err(e) => {
                metrics.policy_jwks_fetch_errors.inc();
                entry.failing = true;
                tracing::warn!(jwks_uri = %uri, error = %e, keeping_last_good = entry.jwks.is_some(),
                    "JWKS fetch failed; the last good keys stay in the policy set");
            }
        }
    }
    let stale = cache
        .values()
        .filter(|e| e.failing || e.jwks.is_none())
        .count();
    metrics
        .policy_jwks_stale
        .set(i64::try_from(stale).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_set::{Loaded, SourceText, load_sources};

    const RA: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  jwtRules:
  - issuer: https://idp.example
    jwksUri: https://idp.example/keys
    timeout: 2s
  - issuer: https://oidc.example
  - issuer: inline
    jwks: '{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}'
"#;

    fn snapshot() -> PolicySnapshot {
        match load_sources(
            &[SourceText {
                name: "ra.yaml".into(),
                text: RA.into(),
            }],
            &citadel_policy::MeshConfig::default(),
        ) {
            Loaded::Valid { snapshot, .. } => snapshot,
            Loaded::Invalid(d) => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_set_needs_its_jwks_uris_and_discovery_urls_but_not_inline_keys() {
        let needed = remote_sources(&snapshot());
        assert_eq!(
            needed.into_iter().collect::<Vec<_>>(),
            vec![
                (
                    "https://idp.example/keys".to_owned(),
                    Duration::from_secs(2)
                ),
                (
                    "https://oidc.example/.well-known/openid-configuration".to_owned(),
                    DEFAULT_TIMEOUT
                ),
            ]
        );
    }

    #[test]
    fn fetched_keys_ride_with_their_object_and_change_the_version() {
        let s = snapshot();
        let none = with_keys(&s, &BTreeMap::new());
        assert_eq!(
            none.version, s.version,
            "no keys: the version is the source's"
        );
        let mut keys = BTreeMap::new();
        keys.insert(
            "https://idp.example/keys".to_owned(),
            "{\"keys\":[1]}".to_owned(),
        );
        let one = with_keys(&s, &keys);
        assert_eq!(one.objects[0].resolved_jwks.len(), 1);
        assert_eq!(
            one.objects[0].resolved_jwks[0].uri,
            "https://idp.example/keys"
        );
        assert_ne!(one.version, s.version);
        keys.insert(
            "https://idp.example/keys".to_owned(),
            "{\"keys\":[2]}".to_owned(),
        );
        assert_ne!(
            with_keys(&s, &keys).version,
            one.version,
            "a rotation is a new version"
        );
    }

    #[test]
    fn fetches_are_due_on_schedule_and_failures_retry_sooner() {
        let config = PolicyJwksConfig::default();
        let t0 = Instant::now();
        assert!(due(None, t0, &config));
        let ok = Entry {
            jwks: Some("{}".into()),
            last_attempt: Some(t0),
            failing: false,
        };
        assert!(!due(Some(&ok), t0 + Duration::from_secs(60), &config));
        assert!(due(Some(&ok), t0 + config.refresh_interval, &config));
        let failed = Entry {
            failing: true,
            ..ok
        };
        assert!(!due(Some(&failed), t0 + Duration::from_secs(59), &config));
        assert!(due(Some(&failed), t0 + config.retry_interval, &config));
    }

    #[tokio::test]
    async fn rejects_plain_http_jwks_uris() {
        let f = Fetcher::new(None).unwrap();
        let err = f
            .fetch("http://idp.example/keys", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not an https URL"), "{err}");
    }
}
