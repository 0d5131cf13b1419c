//! The proxy as a client of its node agent, on the agent's Unix socket: two SDS v3
//! streams (`default` and `ROOTCA`, one each, as Envoy opens them) feeding the
//! certificate resolver and the trust bundle, and the workload policy stream feeding
//! a `watch` of [`PolicyState`]. Each reconnects with backoff and keeps what it holds
//! meanwhile. Turning messages into state is pure ([`parse_secret`], [`policy_state`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use citadel_identity::{Backoff, TrustBundle, TrustDomain, check_x509_svid};
use citadel_policy::{Loader, MeshConfig};
use citadel_proto::SECRET_TYPE_URL;
use citadel_proto::citadel::v1::WorkloadPolicies;
use citadel_proto::citadel::v1::WorkloadPoliciesRequest;
use citadel_proto::citadel::v1::workload_policy_service_client::WorkloadPolicyServiceClient;
use citadel_proto::envoy::config::core::v3::{DataSource, data_source};
use citadel_proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use citadel_proto::envoy::service::discovery::v3::DiscoveryRequest;
use citadel_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use citadel_tls::{CertResolver, SharedBundle};
use prost::Message;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::decide::PolicyState;
use crate::{random_unit, unix_now};

/// The SDS resource name of the workload's own certificate.
pub const DEFAULT: &str = "default";
/// The SDS resource name of the trust bundle.
pub const ROOTCA: &str = "ROOTCA";

/// A secret or policy message the proxy cannot use (it keeps what it holds).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentDataError {
    /// Not a `Secret`, or not decodable.
    #[error("resource is not an SDS Secret: {0}")]
    NotASecret(String),
    /// A secret of the wrong kind for its name.
    #[error("secret {name:?} is not a {want}")]
    WrongKind {
        /// The secret's name.
        name: String,
        /// What was expected.
        want: &'static str,
    },
    /// A data source that is not inline.
    #[error("secret {0:?}: only inline data sources are read")]
    NotInline(String),
    /// Bad PEM or certificate.
    #[error("secret {name:?}: {reason}")]
    Invalid {
        /// The secret's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A policy object the policy crate refuses.
    #[error("policy version {version}: {reason}")]
    Policy {
        /// The version.
        version: String,
        /// The diagnostics.
        reason: String,
    },
}

/// A usable secret.
#[derive(Debug, Clone)]
pub enum SecretUpdate {
    /// The workload certificate.
    Certificate {
        /// Leaf first.
        chain: Vec<CertificateDer<'static>>,
        /// PKCS#8 DER.
        key_pkcs8: Vec<u8>,
        /// The leaf's trust domain (the bundle's too).
        trust_domain: TrustDomain,
        /// The leaf's notAfter, unix seconds.
        not_after: i64,
    },
    /// The trust bundle's roots, as PEM.
    Roots(String),
}

fn inline(name: &str, source: Option<&DataSource>) -> Result<Vec<u8>, AgentDataError> {
    match source.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(data_source::Specifier::InlineString(s)) => Ok(s.as_bytes().to_vec()),
        _ => Err(AgentDataError::NotInline(name.to_owned())),
    }
}

/// Reads one SDS resource (`Any`-encoded `Secret`).
pub fn parse_secret(type_url: &str, value: &[u8]) -> Result<SecretUpdate, AgentDataError> {
    if type_url != SECRET_TYPE_URL {
        return Err(AgentDataError::NotASecret(format!("type {type_url}")));
    }
    let s = Secret::decode(value).map_err(|e| AgentDataError::NotASecret(e.to_string()))?;
    let invalid = |reason: String| AgentDataError::Invalid {
        name: s.name.clone(),
        reason,
    };
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            let chain_pem = inline(&s.name, t.certificate_chain.as_ref())?;
            let key_pem = inline(&s.name, t.private_key.as_ref())?;
            let chain = CertificateDer::pem_slice_iter(&chain_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("certificate chain: {e}")))?;
            let leaf = chain
                .first()
                .ok_or_else(|| invalid("empty certificate chain".to_owned()))?;
            let svid = check_x509_svid(leaf).map_err(|e| invalid(e.to_string()))?;
            let key = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(&key_pem)
                .map_err(|e| invalid(format!("private key is not PKCS#8 PEM: {e}")))?;
            Ok(SecretUpdate::Certificate {
                chain,
                key_pkcs8: key.secret_pkcs8_der().to_vec(),
                trust_domain: svid.spiffe_id.trust_domain().clone(),
                not_after: svid.not_after,
            })
        }
        Some(secret::Type::ValidationContext(v)) => {
            let pem = inline(&s.name, v.trusted_ca.as_ref())?;
            String::from_utf8(pem)
                .map(SecretUpdate::Roots)
                .map_err(|_| invalid("trusted_ca is not text".to_owned()))
        }
        _ => Err(AgentDataError::WrongKind {
            name: s.name.clone(),
            want: "TLS certificate or validation context",
        }),
    }
}

/// Builds the policy state from the agent's message with the policy crate's loader.
pub fn policy_state(
    msg: &WorkloadPolicies,
    mesh: &MeshConfig,
) -> Result<PolicyState, AgentDataError> {
    let mut loader = Loader::new(mesh.clone());
    for o in &msg.objects {
        loader.add_source(&format!("{} {}/{}", o.kind, o.namespace, o.name), &o.json);
        for k in &o.resolved_jwks {
            loader.add_remote_jwks(&k.uri, &k.jwks);
        }
    }
    let set = loader
        .finish()
        .map(|(set, _)| set)
        .map_err(|e| AgentDataError::Policy {
            version: msg.version.clone(),
            reason: e.to_string(),
        })?;
    let mut labels: Vec<(String, String)> = msg
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.sort();
    Ok(PolicyState {
        version: msg.version.clone(),
        spiffe_id: msg.spiffe_id.clone(),
        namespace: msg.namespace.clone(),
        labels,
        set,
    })
}

/// What the identity followers write to.
#[derive(Clone)]
pub struct IdentitySinks {
    /// The workload certificate of the moment.
    pub certs: Arc<CertResolver>,
    /// The trust bundle of the moment.
    pub bundle: SharedBundle,
    /// notAfter of the certificate held (unix seconds; 0 = none).
    pub not_after: Arc<AtomicI64>,
    /// Trust domain and roots, joined when both are known.
    pending: Arc<std::sync::Mutex<(Option<TrustDomain>, Option<String>)>>,
}

impl IdentitySinks {
    /// Empty sinks over a resolver and a bundle.
    pub fn new(certs: Arc<CertResolver>, bundle: SharedBundle) -> Self {
        Self {
            certs,
            bundle,
            not_after: Arc::new(AtomicI64::new(0)),
            pending: Arc::default(),
        }
    }

    /// Applies a secret; an error leaves everything as it was.
    pub fn apply(&self, update: SecretUpdate) -> Result<(), AgentDataError> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match update {
            SecretUpdate::Certificate {
                chain,
                key_pkcs8,
                trust_domain,
                not_after,
            } => {
                self.certs
                    .set(chain, key_pkcs8)
                    .map_err(|e| AgentDataError::Invalid {
                        name: DEFAULT.to_owned(),
                        reason: e.to_string(),
                    })?;
                self.not_after.store(not_after, Ordering::Relaxed);
                pending.0 = Some(trust_domain);
            }
            SecretUpdate::Roots(pem) => pending.1 = Some(pem),
        }
        if let (Some(td), Some(pem)) = (&pending.0, &pending.1) {
            let bundle =
                TrustBundle::from_pem(td.clone(), pem).map_err(|e| AgentDataError::Invalid {
                    name: ROOTCA.to_owned(),
                    reason: e.to_string(),
                })?;
            self.bundle.set(bundle);
        }
        Ok(())
    }

    /// Forgets the certificate once it has expired (no new one came in time).
    pub fn drop_if_expired(&self, now: i64) {
        let not_after = self.not_after.load(Ordering::Relaxed);
        if not_after != 0 && now >= not_after && self.certs.current().is_some() {
            tracing::warn!("the workload certificate expired and no new one came; dropping it");
            self.certs.clear();
        }
    }
}

/// Connects to the agent's socket.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_owned();
    Endpoint::from_static("http://agent.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

fn request(name: &str, version: &str, nonce: &str, error: Option<String>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.to_owned(),
        resource_names: vec![name.to_owned()],
        type_url: SECRET_TYPE_URL.to_owned(),
        response_nonce: nonce.to_owned(),
        error_detail: error.map(|message| citadel_proto::google::rpc::Status {
            code: 3,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

/// Why a stream to the agent ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot reach the agent: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("the agent ended the stream")]
    Ended,
}

/// One SDS stream for `name`, until it fails. Sets `*progressed` once a response
/// was applied (the backoff then starts over).
async fn sds_stream(
    socket: &Path,
    name: &str,
    sinks: &IdentitySinks,
    progressed: &mut bool,
) -> Result<(), StreamError> {
    let channel = connect(socket).await?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let _ = tx.send(request(name, "", "", None)).await;
    let mut responses = client
        .stream_secrets(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut acked = String::new();
    while let Some(resp) = responses.message().await? {
        let mut error = None;
        for any in &resp.resources {
            match parse_secret(&any.type_url, &any.value).and_then(|u| sinks.apply(u)) {
                Ok(()) => *progressed = true,
                Err(e) => {
                    tracing::warn!(resource = name, error = %e, "SDS secret refused; keeping the last good one");
                    error = Some(e.to_string());
                }
            }
        }
        let ack = match error {
            None => {
                acked.clone_from(&resp.version_info);
                request(name, &resp.version_info, &resp.nonce, None)
            }
            Some(e) => request(name, &acked, &resp.nonce, Some(e)),
        };
        if tx.send(ack).await.is_err() {
            break;
        }
    }
    Err(StreamError::Ended)
}

/// Follows the SDS resource `name` forever, reconnecting with backoff.
pub async fn follow_sds(
    socket: PathBuf,
    name: &'static str,
    sinks: IdentitySinks,
    backoff: Backoff,
) {
    let mut failures = 0u32;
    loop {
        let mut progressed = false;
        let result = sds_stream(&socket, name, &sinks, &mut progressed).await;
        if progressed {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        if let Err(e) = result {
            tracing::warn!(resource = name, error = %e, "SDS stream to the agent ended; reconnecting");
        }
        tokio::time::sleep(backoff.delay(failures, random_unit())).await;
    }
}

async fn policy_stream(
    socket: &Path,
    mesh: &MeshConfig,
    tx: &watch::Sender<Option<Arc<PolicyState>>>,
    progressed: &mut bool,
) -> Result<(), StreamError> {
    let channel = connect(socket).await?;
    let mut client = WorkloadPolicyServiceClient::new(channel);
    let mut stream = client
        .watch_workload_policies(WorkloadPoliciesRequest {})
        .await?
        .into_inner();
    while let Some(msg) = stream.message().await? {
        match policy_state(&msg, mesh) {
            Ok(state) => {
                *progressed = true;
                tracing::info!(version = %state.version, spiffe_id = %state.spiffe_id, "policy version applied");
                tx.send_replace(Some(Arc::new(state)));
            }
            Err(e) => tracing::warn!(error = %e, "policy set refused; keeping the last good one"),
        }
    }
    Err(StreamError::Ended)
}

/// Follows the workload policy stream forever, reconnecting with backoff.
pub async fn follow_policies(
    socket: PathBuf,
    mesh: MeshConfig,
    tx: watch::Sender<Option<Arc<PolicyState>>>,
    backoff: Backoff,
) {
    let mut failures = 0u32;
    loop {
        let mut progressed = false;
        let result = policy_stream(&socket, &mesh, &tx, &mut progressed).await;
        if progressed {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        if let Err(e) = result {
            tracing::warn!(error = %e, "policy stream to the agent ended; reconnecting");
        }
        tokio::time::sleep(backoff.delay(failures, random_unit())).await;
    }
}

/// Drops the certificate when it expires, checking every second.
pub async fn expire_certificate(sinks: IdentitySinks) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        sinks.drop_if_expired(unix_now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_proto::citadel::v1::PolicyObject;

    fn sinks() -> IdentitySinks {
        IdentitySinks::new(
            Arc::new(CertResolver::new(citadel_tls::provider())),
            SharedBundle::default(),
        )
    }

    fn certificate(ca: &citadel_tls::testing::TestCa, not_after: i64) -> SecretUpdate {
        let svid = ca.svid("spiffe://cluster.local/ns/shop/sa/api");
        SecretUpdate::Certificate {
            chain: svid.chain,
            key_pkcs8: svid.key_pkcs8,
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            not_after,
        }
    }

    #[test]
    fn the_last_good_certificate_is_kept_until_it_expires() {
        let ca = citadel_tls::testing::TestCa::new("cluster.local", "root");
        let s = sinks();
        s.apply(certificate(&ca, 1_000)).unwrap();
        s.drop_if_expired(999);
        assert!(s.certs.current().is_some(), "dropped before notAfter");
        s.drop_if_expired(1_000);
        assert!(s.certs.current().is_none(), "kept after notAfter");
    }

    #[test]
    fn a_refused_certificate_leaves_the_current_one() {
        let ca = citadel_tls::testing::TestCa::new("cluster.local", "root");
        let s = sinks();
        s.apply(certificate(&ca, 1_000)).unwrap();
        let bad = SecretUpdate::Certificate {
            chain: Vec::new(),
            key_pkcs8: vec![1, 2, 3],
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            not_after: 2_000,
        };
        assert!(s.apply(bad).is_err());
        assert!(s.certs.current().is_some());
        assert_eq!(s.not_after.load(Ordering::Relaxed), 1_000);
    }

    #[test]
    fn roots_before_the_certificate_wait_for_its_trust_domain() {
        let ca = citadel_tls::testing::TestCa::new("cluster.local", "root");
        let s = sinks();
        s.apply(SecretUpdate::Roots(ca.bundle().to_pem())).unwrap();
        assert!(
            s.bundle.get().is_none(),
            "bundle set without a trust domain"
        );
        s.apply(certificate(&ca, 1_000)).unwrap();
        let b = s.bundle.get().unwrap();
        assert_eq!(b.trust_domain().as_str(), "cluster.local");
    }

    #[test]
    fn foreign_resource_types_are_refused() {
        assert!(matches!(
            parse_secret("type.googleapis.com/x", &[]),
            Err(AgentDataError::NotASecret(_))
        ));
        assert!(parse_secret(SECRET_TYPE_URL, &[0xff, 0xff]).is_err());
    }

    #[test]
    fn invalid_policy_objects_keep_nothing() {
        let msg = WorkloadPolicies {
            version: "v2".into(),
            spiffe_id: "spiffe://cluster.local/ns/shop/sa/api".into(),
            namespace: "shop".into(),
            labels: [("app".to_owned(), "api".to_owned())].into_iter().collect(),
            objects: vec![PolicyObject {
                kind: "AuthorizationPolicy".into(),
                api_version: "security.istio.io/v1".into(),
                namespace: "shop".into(),
                name: "bad".into(),
                json: r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"bad","namespace":"shop"},"spec":{"action":"NOPE"}}"#.into(),
                resolved_jwks: Vec::new(),
            }],
        };
        assert!(matches!(
            policy_state(&msg, &MeshConfig::default()),
            Err(AgentDataError::Policy { .. })
        ));
        let ok = WorkloadPolicies {
            objects: Vec::new(),
            ..msg
        };
        let s = policy_state(&ok, &MeshConfig::default()).unwrap();
        assert_eq!(s.version, "v2");
        assert_eq!(s.labels, vec![("app".to_owned(), "api".to_owned())]);
    }
}
