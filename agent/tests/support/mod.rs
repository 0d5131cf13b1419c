//! An agent in-process on a real Unix socket, with the fake CA behind the
//! `CertificateAuthority` seam and the real entries attestor (the test
//! process's own uid is the caller).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use citadel_agent::attest::EntriesAttestor;
use citadel_agent::bundle::BundleState;
use citadel_agent::entries::WorkloadEntries;
use citadel_agent::fake::FakeCa;
use citadel_agent::manager::{CertManager, ManagerConfig};
use citadel_agent::metrics::AgentMetrics;
use citadel_agent::policy::{PolicyState, parse_set};
use citadel_agent::propagation::Propagation;
use citadel_agent::server::{AgentState, serve};
use citadel_agent::socket;
use citadel_identity::{Backoff, TrustBundle, TrustDomain};
use citadel_proto::SECRET_TYPE_URL;
use citadel_proto::citadel::v1::PolicySet;
use citadel_proto::citadel::v1::workload_policy_service_client::WorkloadPolicyServiceClient;
use citadel_proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use citadel_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use citadel_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use citadel_proto::spiffe_workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

pub const TD: &str = "cluster.local";
pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// The uid of the test process (the caller the agent sees).
pub fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub ca: Arc<FakeCa>,
    pub bundle_tx: watch::Sender<Option<Arc<BundleState>>>,
    pub manager: CertManager,
    pub metrics: AgentMetrics,
    /// How far the bundle has reached the open streams.
    pub propagation: Propagation,
    /// The policy set the agent serves, as the CA's policy stream would set it.
    pub policies_tx: watch::Sender<Option<Arc<PolicyState>>>,
    entries_tx: watch::Sender<Arc<WorkloadEntries>>,
    epoch_tx: watch::Sender<u64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

pub struct Options {
    /// Entries YAML; `None` maps the test's own uid to WEB.
    pub entries: Option<String>,
    pub backoff: Backoff,
    pub idle_linger: Duration,
    pub workload_ttl: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            entries: None,
            backoff: Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(400),
                multiplier: 2.0,
                jitter: 0.2,
            },
            idle_linger: Duration::from_millis(200),
            workload_ttl: Duration::from_secs(3600),
        }
    }
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("agent.sock");
        let td = TrustDomain::new(TD).unwrap();
        let ca = Arc::new(FakeCa::new(td));
        let yaml = opts.entries.unwrap_or_else(|| {
            format!(
                "entries:\n  - spiffe_id: {WEB}\n    uid: {}\n    labels: {{app: web}}\n",
                my_uid()
            )
        });
        let (entries_tx, entries_rx) =
            watch::channel(Arc::new(WorkloadEntries::parse(&yaml).unwrap()));
        let (epoch_tx, epoch_rx) = watch::channel(0u64);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (bundle_tx, bundle_rx) =
            watch::channel(Some(Arc::new(BundleState::new(ca.bundle(), 1))));
        let metrics = AgentMetrics::new();
        let manager = CertManager::new(
            ca.clone(),
            bundle_rx.clone(),
            ManagerConfig {
                workload_ttl: opts.workload_ttl,
                idle_linger: opts.idle_linger,
                backoff: opts.backoff,
                ..ManagerConfig::default()
            },
            metrics.clone(),
        );
        let (policies_tx, policies_rx) = watch::channel(None);
        let propagation = Propagation::new();
        let state = Arc::new(AgentState {
            attestor: Arc::new(EntriesAttestor::new(entries_rx)),
            manager: manager.clone(),
            bundle: bundle_rx,
            propagation: propagation.clone(),
            policies: policies_rx,
            mesh: citadel_policy::MeshConfig::default(),
            metrics: metrics.clone(),
            fetch_timeout: Duration::from_secs(2),
            attestation_changed: epoch_rx,
            shutdown: shutdown_rx,
        });
        let listener = socket::bind(&socket_path).await.unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            serve(listener, state, async {
                let _ = stop_rx.await;
                shutdown_tx.send_replace(true);
            })
            .await
            .unwrap();
        });
        Harness {
            dir,
            socket: socket_path,
            ca,
            bundle_tx,
            manager,
            metrics,
            propagation,
            policies_tx,
            entries_tx,
            epoch_tx,
            shutdown: Some(stop_tx),
            server: Some(server),
        }
    }

    pub async fn channel(&self) -> Channel {
        uds_channel(&self.socket).await
    }

    pub async fn sds(&self) -> SecretDiscoveryServiceClient<Channel> {
        SecretDiscoveryServiceClient::new(self.channel().await)
    }

    pub async fn workload_api(&self) -> SpiffeWorkloadApiClient<Channel> {
        SpiffeWorkloadApiClient::new(self.channel().await)
    }

    /// Replaces the bundle with `bundle` at `sequence`.
    pub fn set_bundle(&self, bundle: TrustBundle, sequence: u64) {
        self.bundle_tx
            .send_replace(Some(Arc::new(BundleState::new(bundle, sequence))));
    }

    /// Applies `set` as the agent's policy set, as the CA's policy stream does.
    pub fn set_policies(&self, set: &PolicySet) {
        let state = parse_set(set, &citadel_policy::MeshConfig::default()).unwrap();
        self.policies_tx.send_replace(Some(Arc::new(state)));
    }

    pub async fn policies(&self) -> WorkloadPolicyServiceClient<Channel> {
        WorkloadPolicyServiceClient::new(self.channel().await)
    }

    /// Replaces the workload entries, as a reload of the file does.
    pub fn set_entries(&self, yaml: &str) {
        self.entries_tx
            .send_replace(Arc::new(WorkloadEntries::parse(yaml).unwrap()));
        self.epoch_tx.send_modify(|n| *n += 1);
    }

    /// Stops the server; fails the test if graceful shutdown hangs (open
    /// streams must end when the agent stops).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .expect("the agent did not shut down within 5 s with streams open")
                .unwrap();
        }
    }
}

pub async fn uds_channel(path: &Path) -> Channel {
    let path = path.to_owned();
    Endpoint::try_from("http://agent.local")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// An open SDS stream: requests go in through `tx`.
pub struct SdsStream {
    pub tx: mpsc::Sender<DiscoveryRequest>,
    pub rx: tonic::Streaming<DiscoveryResponse>,
}

pub fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.to_owned(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.to_owned(),
        response_nonce: nonce.to_owned(),
        ..Default::default()
    }
}

impl SdsStream {
    pub async fn open(
        client: &mut SecretDiscoveryServiceClient<Channel>,
        names: &[&str],
    ) -> Result<SdsStream, tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(request(names, "", "")).await.unwrap();
        let rx = client
            .stream_secrets(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(SdsStream { tx, rx })
    }

    /// The next response, failing after `secs`.
    pub async fn next(&mut self, secs: u64) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(secs), self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => Err(tonic::Status::aborted("stream ended")),
            Ok(Err(s)) => Err(s),
            Err(_) => Err(tonic::Status::deadline_exceeded("no response in time")),
        }
    }

    /// Whether nothing arrives within `ms`.
    pub async fn quiet_for(&mut self, ms: u64) -> bool {
        tokio::time::timeout(Duration::from_millis(ms), self.rx.message())
            .await
            .is_err()
    }
}

/// Decodes the secrets of a response.
pub fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, SECRET_TYPE_URL);
            Secret::decode(any.value.as_slice()).unwrap()
        })
        .collect()
}

/// The leaf certificate (DER) of a `TlsCertificate` secret.
pub fn leaf_of(secret: &Secret) -> Vec<u8> {
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            let chain = match t
                .certificate_chain
                .as_ref()
                .and_then(|d| d.specifier.as_ref())
            {
                Some(
                    citadel_proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(b),
                ) => b.clone(),
                other => panic!("chain is not inline bytes: {other:?}"),
            };
            pem::parse_many(&chain).unwrap()[0].contents().to_vec()
        }
        other => panic!("not a TLS certificate: {other:?}"),
    }
}

/// The serial (lowercase hex) of a DER certificate.
pub fn serial_of(der: &[u8]) -> String {
    citadel_identity::check_x509_svid(der).unwrap().serial_hex
}

/// Waits until `cond` holds, polling.
pub async fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
