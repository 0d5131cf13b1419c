//! The agent's Kubernetes mode as one setting ([`KubernetesMode`]) and its
//! start-up: the CA client on the projected token file, and the pod
//! attestor over a watch of this node's pods.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::attest::WorkloadAttestor;
use crate::ca_client::{CaEndpoint, GrpcCa, NodeCredential};
use crate::k8s::attestor::{DEFAULT_POD_WAIT, PodAttestor, PodIndex};
use crate::k8s::pod_cache::KubePodIndex;

/// The agent's settings on Kubernetes (`citadel-agent run --kubernetes`).
#[derive(Clone)]
pub struct KubernetesMode {
    /// This node's name (`spec.nodeName`, from the downward API): only its
    /// pods are watched and attested.
    pub node_name: String,
    /// The projected service-account token (audience `istio-ca`), read again
    /// for every request to the CA.
    pub token_file: PathBuf,
    /// Where `/proc` of the node's processes is (`/proc` with `hostPID`).
    pub proc_root: PathBuf,
    /// The trust domain of the pods' SPIFFE IDs.
    pub trust_domain: citadel_identity::TrustDomain,
    /// The API server to use; `None`: in-cluster configuration or `KUBECONFIG`.
    pub kube_config: Option<kube::Config>,
    /// How long a caller whose pod the watch has not delivered yet is waited for.
    pub pod_wait: Duration,
}

impl KubernetesMode {
    /// The mode with the documented defaults (`/proc`, a 2 s pod wait,
    /// the in-cluster API server).
    pub fn new(
        node_name: impl Into<String>,
        token_file: PathBuf,
        trust_domain: citadel_identity::TrustDomain,
    ) -> Self {
        Self {
            node_name: node_name.into(),
            token_file,
            proc_root: PathBuf::from("/proc"),
            trust_domain,
            kube_config: None,
            pod_wait: DEFAULT_POD_WAIT,
        }
    }
}

// By hand: the kube configuration may hold credentials.
impl std::fmt::Debug for KubernetesMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesMode")
            .field("node_name", &self.node_name)
            .field("token_file", &self.token_file)
            .field("proc_root", &self.proc_root)
            .field("trust_domain", &self.trust_domain.as_str())
            .field(
                "api_server",
                &self.kube_config.as_ref().map(|c| c.cluster_url.to_string()),
            )
            .field("pod_wait", &self.pod_wait)
            .finish()
    }
}

/// On Kubernetes: the CA client on the projected token, and the pod
/// attestor over a watch of this node's pods (its task pushed on `tasks`;
/// every pod event bumps `epoch`).
pub(crate) async fn start(
    k8s: &KubernetesMode,
    endpoint: CaEndpoint,
    tasks: &mut Vec<JoinHandle<()>>,
    epoch: watch::Sender<u64>,
) -> anyhow::Result<(Arc<GrpcCa>, Arc<dyn WorkloadAttestor>)> {
    // The token must be there now; afterwards a read failure fails only the
    // request that needed it.
    crate::ca_client::read_token_file(&k8s.token_file)
        .map_err(|e| anyhow!("--token-file: {}", e.message()))?;
    let ca = Arc::new(
        GrpcCa::new(endpoint, NodeCredential::TokenFile(k8s.token_file.clone()))
            .map_err(|e| anyhow!("{e}"))?,
    );
    let kube_config = match &k8s.kube_config {
        Some(c) => c.clone(),
        None => kube::Config::infer()
            .await
            .context("Kubernetes API configuration (in-cluster or KUBECONFIG)")?,
    };
    let client = kube::Client::try_from(kube_config).context("Kubernetes client")?;
    let (index, watch_task) = KubePodIndex::start(client, &k8s.node_name);
    tasks.push(watch_task);
    let mut changes = index.changes();
    tasks.push(tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            epoch.send_modify(|n| *n += 1);
        }
    }));
    tracing::info!(node = %k8s.node_name, "attesting callers by pod; watching this node's pods");
    let attestor = PodAttestor::new(
        index,
        k8s.proc_root.clone(),
        k8s.node_name.clone(),
        k8s.trust_domain.clone(),
    )
    .wait(k8s.pod_wait);
    Ok((ca, Arc::new(attestor)))
}
