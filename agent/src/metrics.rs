//! The agent's Prometheus metrics.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label: a SPIFFE ID.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabel {
    /// The SPIFFE ID.
    pub spiffe_id: String,
}

/// Label: a gRPC status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The code, e.g. `Unavailable`.
    pub code: String,
}

/// Label: which API a stream belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabel {
    /// `sds`, `workload_api` or `policy`.
    pub api: &'static str,
}

/// Label: how a renewal ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Label: a policy-set version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    /// The CA's version of the set.
    pub version: String,
}

/// Handles to every metric; cheap to clone.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    certificates_held: Gauge,
    expiry_seconds: Family<IdentityLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    issuances: Family<ResultLabel, Counter>,
    ca_errors: Family<CodeLabel, Counter>,
    streams_open: Family<ApiLabel, Gauge>,
    entries_reload_errors: Counter,
    bundle_sequence: Gauge<i64, AtomicI64>,
    policy_version: Family<VersionLabel, Gauge>,
    policy_objects: Gauge,
    policy_update_errors: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Registers every metric under the `citadel_agent` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("citadel_agent");
        let certificates_held = Gauge::default();
        registry.register(
            "certificates_held",
            "Workload certificates held in memory",
            certificates_held.clone(),
        );
        let expiry_seconds = Family::default();
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the certificate held for an identity expires",
            expiry_seconds.clone(),
        );
        let issuances = Family::default();
        registry.register(
            "certificate_issuances",
            "Certificates obtained from the CA (first issue and renewals), by result",
            issuances.clone(),
        );
        let ca_errors = Family::default();
        registry.register(
            "ca_errors",
            "Failed CA calls by gRPC code",
            ca_errors.clone(),
        );
        let streams_open = Family::default();
        registry.register(
            "streams_open",
            "Open SDS and Workload API streams",
            streams_open.clone(),
        );
        let entries_reload_errors = Counter::default();
        registry.register(
            "entries_reload_errors",
            "Entries-file reloads refused (the last good entries stay in force)",
            entries_reload_errors.clone(),
        );
        let bundle_sequence = Gauge::default();
        registry.register(
            "trust_bundle_sequence",
            "Sequence of the trust bundle in force (0: none yet)",
            bundle_sequence.clone(),
        );
        let policy_version = Family::default();
        registry.register(
            "policy_version_info",
            "The policy set in force: 1 for its version (absent: none yet)",
            policy_version.clone(),
        );
        let policy_objects = Gauge::default();
        registry.register(
            "policy_objects",
            "Objects in the policy set in force",
            policy_objects.clone(),
        );
        let policy_update_errors = Counter::default();
        registry.register(
            "policy_update_errors",
            "Policy sets from the CA refused (the current set stays in force)",
            policy_update_errors.clone(),
        );
        Self {
            registry: Arc::new(registry),
            policy_version,
            policy_objects,
            policy_update_errors,
            certificates_held,
            expiry_seconds,
            issuances,
            ca_errors,
            streams_open,
            entries_reload_errors,
            bundle_sequence,
        }
    }

    /// Text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Sets the number of certificates held.
    pub fn certificates_held(&self, n: usize) {
        self.certificates_held
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the seconds to expiry of `id`'s certificate.
    pub fn expiry(&self, id: &str, seconds: f64) {
        self.expiry_seconds
            .get_or_create(&IdentityLabel {
                spiffe_id: id.to_owned(),
            })
            .set(seconds);
    }

    /// Forgets `id` (no longer held).
    pub fn forget(&self, id: &str) {
        self.expiry_seconds.remove(&IdentityLabel {
            spiffe_id: id.to_owned(),
        });
    }

    /// Counts an issuance.
    pub fn issuance(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.issuances.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a CA error.
    pub fn ca_error(&self, code: &str) {
        self.ca_errors
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
    }

    /// Counts an entries-file reload that was refused.
    pub fn entries_reload_error(&self) {
        self.entries_reload_errors.inc();
    }

    /// Records the applied bundle sequence.
    pub fn bundle_sequence(&self, seq: u64) {
        self.bundle_sequence
            .set(i64::try_from(seq).unwrap_or(i64::MAX));
    }

    /// Records the policy set in force.
    pub fn policy_version(&self, version: &str, objects: usize) {
        self.policy_version.clear();
        self.policy_version
            .get_or_create(&VersionLabel {
                version: version.to_owned(),
            })
            .set(1);
        self.policy_objects
            .set(i64::try_from(objects).unwrap_or(i64::MAX));
    }

    /// Counts a policy set refused.
    pub fn policy_update_error(&self) {
        self.policy_update_errors.inc();
    }

    /// Counts a stream as open until the returned guard drops.
    pub fn stream_opened(&self, api: &'static str) -> StreamGuard {
        let gauge = self.streams_open.get_or_create(&ApiLabel { api }).clone();
        gauge.inc();
        StreamGuard(gauge)
    }
}

/// Decrements the open-stream gauge when dropped.
pub struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
