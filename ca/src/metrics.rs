//! Prometheus metrics of the CA.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of a failed issuance.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Short machine-readable reason (`unauthenticated`, `bad_csr`, …).
    pub reason: &'static str,
}

/// Label of a successful issuance.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    /// How the caller authenticated.
    pub method: &'static str,
}

/// Label of a request or connection refused by a resource limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// Which limit: `connections`, `handshake_timeout`, `idle_timeout`, `caller_rate`,
    /// `join_token_rate`, `join_token_format`, `queue_full`, `queue_timeout`.
    pub limit: &'static str,
}

/// Every metric the CA exports.
pub struct CaMetrics {
    registry: Registry,
    /// `citadel_policy_*`: the policy set, under its own prefix.
    policy_registry: Registry,
    /// Reloads of the policy source that failed (unreadable or invalid); the last good set
    /// stayed in force.
    pub policy_reload_errors: Counter,
    /// Objects in the policy set in force.
    pub policy_objects: Gauge,
    /// Fetches of a RequestAuthentication JWKS that failed (the last good keys stay).
    pub policy_jwks_fetch_errors: Counter,
    /// JWKS URIs whose last fetch failed or that have never been fetched.
    pub policy_jwks_stale: Gauge,
    /// Certificates issued.
    pub issued: Family<IssuedLabels, Counter>,
    /// Issuance failures by reason.
    pub failures: Family<FailureLabels, Counter>,
    /// Seconds from request to durable answer.
    pub issuance_seconds: Histogram,
    /// Seconds until the active root expires (set at scrape time).
    pub root_expiry_seconds: Gauge,
    /// Seconds until the active signing certificate expires (set at scrape time).
    pub signer_expiry_seconds: Gauge,
    /// `citadel_ca_dir_rejected_total`: sets found in `--ca-dir` while running that could not
    /// sign (each distinct set counted once); the last good set stayed.
    pub ca_dir_rejected: Counter,
    /// `citadel_ca_limit_rejections_total`: connections closed and requests refused by a
    /// resource limit of the public port, by limit.
    pub limit_rejections: Family<LimitLabels, Counter>,
    /// `citadel_ca_open_connections`: TLS connections open on the public port.
    pub open_connections: Gauge,
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CaMetrics {
    /// Registers every metric under the `citadel_ca` prefix, the policy ones under
    /// `citadel_policy`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("citadel_ca");
        let issued = Family::<IssuedLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let issuance_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let root_expiry_seconds = Gauge::default();
        let signer_expiry_seconds = Gauge::default();
        registry.register("certificates_issued", "Certificates issued", issued.clone());
        registry.register(
            "issuance_failures",
            "Certificate requests refused or failed, by reason",
            failures.clone(),
        );
        registry.register(
            "issuance_duration_seconds",
            "Time from request to durable answer",
            issuance_seconds.clone(),
        );
        registry.register(
            "root_expiry_seconds",
            "Seconds until the active root certificate expires",
            root_expiry_seconds.clone(),
        );
        registry.register(
            "signer_expiry_seconds",
            "Seconds until the active signing certificate expires",
            signer_expiry_seconds.clone(),
        );
        let ca_dir_rejected = Counter::default();
        // Under the `citadel_ca` prefix: `citadel_ca_dir_rejected_total`.
        registry.register(
            "dir_rejected",
            "Sets found in --ca-dir while running that could not sign (chain, key, probe leaf or missing files); the last good set stayed",
            ca_dir_rejected.clone(),
        );
        let limit_rejections = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_rejections",
            "Connections closed and requests refused (ResourceExhausted) by a resource limit of the public port, by limit",
            limit_rejections.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Connections open on the public port (counted against --max-connections)",
            open_connections.clone(),
        );
        let mut policy_registry = Registry::with_prefix("citadel_policy");
        let policy_reload_errors = Counter::default();
        let policy_objects = Gauge::default();
        policy_registry.register(
            "reload_errors",
            "Policy reloads that failed (unreadable source or invalid object; the last good set stayed in force), and invalid policy custom resources left out of the set",
            policy_reload_errors.clone(),
        );
        policy_registry.register(
            "objects",
            "PeerAuthentication and AuthorizationPolicy objects in the set in force",
            policy_objects.clone(),
        );
        let policy_jwks_fetch_errors = Counter::default();
        let policy_jwks_stale = Gauge::default();
        policy_registry.register(
            "jwks_fetch_errors",
            "Fetches of a RequestAuthentication JWKS that failed; the last good keys stayed in the set",
            policy_jwks_fetch_errors.clone(),
        );
        policy_registry.register(
            "jwks_stale",
            "JWKS URIs whose last fetch failed or that were never fetched",
            policy_jwks_stale.clone(),
        );
        Self {
            registry,
            policy_registry,
            policy_reload_errors,
            policy_objects,
            policy_jwks_fetch_errors,
            policy_jwks_stale,
            issued,
            failures,
            issuance_seconds,
            root_expiry_seconds,
            signer_expiry_seconds,
            ca_dir_rejected,
            limit_rejections,
            open_connections,
        }
    }

    /// Counts one refusal by a resource limit.
    pub fn limited(&self, limit: &'static str) {
        self.limit_rejections
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// Counts one failure.
    pub fn fail(&self, reason: &'static str) {
        self.failures.get_or_create(&FailureLabels { reason }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.policy_registry);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}
