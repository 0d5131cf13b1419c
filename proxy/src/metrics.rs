//! Prometheus metrics of the proxy (`citadel_proxy_*`).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set of a connection decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    /// The peer's principal, `plaintext` for a peer without mTLS, `unknown` before it
    /// was known (refused transport or handshake).
    pub source_principal: String,
    /// The destination (application) port.
    pub destination_port: u16,
    /// `allow`, `deny`, or `closed_by_policy` for an open connection a new policy ended.
    pub decision: String,
}

/// Label set of a captured connection (transparent mode).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaptureLabel {
    /// `inbound` or `outbound`.
    pub direction: String,
    /// `mesh` (outbound mTLS), `passthrough` (outbound outside the mesh),
    /// `inbound` (handed to the inbound path), `no_original_dst`, `loop`.
    pub outcome: String,
}

/// Label: a policy-set version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    /// The CA's version of the set.
    pub version: String,
}

/// Handles to every metric; cheap to clone.
#[derive(Clone)]
pub struct ProxyMetrics {
    registry: Arc<Registry>,
    connections: Family<ConnectionLabel, Counter>,
    requests: Family<ConnectionLabel, Counter>,
    captured: Family<CaptureLabel, Counter>,
    policy_version: Family<VersionLabel, Gauge>,
    expiry_seconds: Gauge<f64, AtomicU64>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    /// Registers every metric under the `citadel_proxy` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("citadel_proxy");
        let connections = Family::default();
        registry.register(
            "inbound_connections",
            "Inbound connections by source principal, destination port and decision",
            connections.clone(),
        );
        let requests = Family::default();
        registry.register(
            "inbound_requests",
            "Inbound HTTP requests by source principal, destination port and decision",
            requests.clone(),
        );
        let captured = Family::default();
        registry.register(
            "captured_connections",
            "Connections taken by the capture listeners, by direction and outcome",
            captured.clone(),
        );
        let policy_version = Family::default();
        registry.register(
            "policy_version_info",
            "The policy set in force: 1 for its version (absent: none yet)",
            policy_version.clone(),
        );
        let expiry_seconds = Gauge::default();
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the workload certificate held expires (0: none held)",
            expiry_seconds.clone(),
        );
        Self {
            registry: Arc::new(registry),
            connections,
            requests,
            captured,
            policy_version,
            expiry_seconds,
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

    /// Counts one connection decision.
    pub fn connection(&self, source_principal: Option<&str>, port: u16, decision: &str) {
        self.connections
            .get_or_create(&ConnectionLabel {
                source_principal: source_principal.unwrap_or("plaintext").to_owned(),
                destination_port: port,
                decision: decision.to_owned(),
            })
            .inc();
    }

    /// Counts one HTTP request decision (`allow`, `deny`, `bad_request`).
    pub fn request(&self, source_principal: Option<&str>, port: u16, decision: &str) {
        self.requests
            .get_or_create(&ConnectionLabel {
                source_principal: source_principal.unwrap_or("plaintext").to_owned(),
                destination_port: port,
                decision: decision.to_owned(),
            })
            .inc();
    }

    /// Counts one captured connection.
    pub fn captured(&self, direction: &str, outcome: &str) {
        self.captured
            .get_or_create(&CaptureLabel {
                direction: direction.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The policy version now in force.
    pub fn policy_version(&self, version: &str) {
        self.policy_version.clear();
        self.policy_version
            .get_or_create(&VersionLabel {
                version: version.to_owned(),
            })
            .set(1);
    }

    /// Seconds to the certificate's expiry.
    pub fn expiry(&self, seconds: f64) {
        self.expiry_seconds.set(seconds);
    }
}
