//! `citadel serve --kubernetes`: the CA as a Kubernetes citizen.
//!
//! - [`crate::auth::token_review`]: callers' service-account tokens checked with TokenReview;
//! - [`pod_index`]: node agents may ask only for identities of pods on their own node,
//!   decided on an index of pods kept by a `kube` watcher ([`PodIndexAuthorizer`]);
//! - [`root_configmap`]: the trust bundle as ConfigMap `istio-ca-root-cert` in every namespace;
//! - [`lease`]: the Lease that picks the one replica running root renewal and the ConfigMaps;
//! - [`policy_crds`]: policies from the `security.istio.io` custom resources;
//! - [`secret_keystore`]: authority keys in a Secret shared by the replicas.

pub mod lease;
pub mod pod_index;
pub mod policy_crds;
pub mod root_configmap;
pub mod secret_keystore;

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use citadel_identity::{SpiffeId, TrustDomain};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use crate::auth::Caller;
use crate::issuer::IssueError;
use crate::node_authz::NodeAuthorizer;
pub use pod_index::{PodIndex, TrustedAgent};

/// Default `--trusted-agent`.
pub const DEFAULT_TRUSTED_AGENT: &str = "citadel-system/citadel-agent";
/// Default `--ca-namespace`.
pub const DEFAULT_CA_NAMESPACE: &str = "citadel-system";

/// How to reach the API server.
#[derive(Debug, Clone)]
pub enum KubeConnection {
    /// In-cluster service account, or `KUBECONFIG` (`kube::Client::try_default`).
    Infer,
    /// An explicit configuration (tests point it at the fake API server).
    Config(Box<kube::Config>),
}

impl KubeConnection {
    /// A client for this connection.
    pub async fn client(&self) -> Result<kube::Client, kube::Error> {
        match self {
            KubeConnection::Infer => kube::Client::try_default().await,
            KubeConnection::Config(c) => kube::Client::try_from((**c).clone()),
        }
    }
}

/// The `--kubernetes` part of the CA's configuration.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// The API server.
    pub connection: KubeConnection,
    /// `--token-review-audience` (default `istio-ca`).
    pub token_review_audiences: Vec<String>,
    /// `--trusted-agent` (default `citadel-system/citadel-agent`).
    pub trusted_agents: Vec<TrustedAgent>,
    /// `--ca-namespace` (default `citadel-system`).
    pub ca_namespace: String,
    /// Bound on one TokenReview, kube's retries included.
    pub token_review_timeout: std::time::Duration,
    /// Time between two full passes writing the root-certificate ConfigMaps.
    pub configmap_resync: std::time::Duration,
    /// `leaseDurationSeconds` of the leader Lease (renewed every third of it).
    pub lease_duration_secs: i32,
}

impl KubernetesConfig {
    /// Defaults (in-cluster or `KUBECONFIG`).
    pub fn new(connection: KubeConnection) -> Self {
        Self {
            connection,
            token_review_audiences: vec![crate::auth::token_review::DEFAULT_AUDIENCE.into()],
            trusted_agents: vec![TrustedAgent {
                namespace: "citadel-system".into(),
                service_account: "citadel-agent".into(),
            }],
            ca_namespace: DEFAULT_CA_NAMESPACE.into(),
            token_review_timeout: crate::auth::token_review::DEFAULT_TIMEOUT,
            configmap_resync: root_configmap::DEFAULT_RESYNC,
            lease_duration_secs: lease::DEFAULT_LEASE_DURATION_SECS,
        }
    }
}

/// Who may open the node-agent streams (trust bundle, policies) as a Kubernetes node agent.
#[derive(Debug, Clone)]
pub struct KubernetesAgents {
    /// Trust domain of node identities.
    pub trust_domain: TrustDomain,
    /// `--trusted-agent`.
    pub trusted: Vec<TrustedAgent>,
}

/// The node identity (`spiffe://<td>/citadel/node/<NODE>`) a Kubernetes node agent speaks
/// for on the node-agent streams (pure): a caller authenticated by its service-account token,
/// its service account trusted, its token naming a valid node. Acknowledgements are recorded
/// under it, so each node's agent counts once, as a node certificate's holder does.
pub fn kubernetes_agent_node(caller: &Caller, agents: &KubernetesAgents) -> Option<SpiffeId> {
    if !matches!(
        caller.method,
        crate::auth::AuthMethod::TokenReview | crate::auth::AuthMethod::Jwt
    ) || !caller.identity.is_member_of(&agents.trust_domain)
    {
        return None;
    }
    let sa = caller.identity.service_account()?;
    agents
        .trusted
        .iter()
        .any(|t| t.namespace == sa.namespace && t.service_account == sa.name)
        .then_some(())?;
    crate::node::node_identity(&agents.trust_domain, caller.node.as_deref()?).ok()
}

/// Kubernetes node agents, judged on the pod index ([`pod_index::decide`]).
pub struct PodIndexAuthorizer {
    index: Arc<RwLock<PodIndex>>,
    trusted: Vec<TrustedAgent>,
    trust_domain: TrustDomain,
}

impl PodIndexAuthorizer {
    /// Judges on `index`.
    pub fn new(
        index: Arc<RwLock<PodIndex>>,
        trusted: Vec<TrustedAgent>,
        trust_domain: TrustDomain,
    ) -> Self {
        Self {
            index,
            trusted,
            trust_domain,
        }
    }
}

#[async_trait]
impl NodeAuthorizer for PodIndexAuthorizer {
    async fn authorize(
        &self,
        caller: &Caller,
        target: &SpiffeId,
    ) -> Result<Option<String>, IssueError> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        pod_index::decide(&index, &self.trusted, &self.trust_domain, caller, target)
    }
}

/// Keeps `index` equal to the cluster's live pods until `shutdown`: a `kube` watcher over
/// all pods (it re-lists after `410 Gone` and backs off on errors). A full re-list replaces
/// the index at once when it is complete, so pods deleted while the watch was broken leave.
pub async fn run_pod_index(
    client: kube::Client,
    index: Arc<RwLock<PodIndex>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Pod> = Api::all(client);
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relist: Option<PodIndex> = None;
    let write = || index.write().unwrap_or_else(|p| p.into_inner());
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match event {
            None => return,
            Some(Ok(Event::Init)) => relist = Some(PodIndex::default()),
            Some(Ok(Event::InitApply(pod))) => {
                relist.get_or_insert_with(PodIndex::default).apply(&pod)
            }
            Some(Ok(Event::InitDone)) => {
                let mut fresh = relist.take().unwrap_or_default();
                fresh.mark_synced();
                let live = fresh.len();
                *write() = fresh;
                tracing::info!(live_pods = live, "pod index synced");
            }
            Some(Ok(Event::Apply(pod))) => write().apply(&pod),
            Some(Ok(Event::Delete(pod))) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    write().remove(uid);
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;

    fn agents() -> KubernetesAgents {
        KubernetesAgents {
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            trusted: vec![TrustedAgent::parse("citadel-system/citadel-agent").unwrap()],
        }
    }

    fn caller(id: &str, method: AuthMethod, node: Option<&str>) -> Caller {
        Caller {
            identity: SpiffeId::parse(id).unwrap(),
            method,
            node: node.map(str::to_owned),
            pod: None,
            pod_uid: None,
            certificate_serial: None,
        }
    }

    #[test]
    fn a_trusted_agents_token_speaks_for_the_node_it_names() {
        let agent = "spiffe://cluster.local/ns/citadel-system/sa/citadel-agent";
        let c = caller(agent, AuthMethod::TokenReview, Some("node-a"));
        assert_eq!(
            kubernetes_agent_node(&c, &agents()).unwrap().as_str(),
            "spiffe://cluster.local/citadel/node/node-a"
        );
        for c in [
            caller(agent, AuthMethod::TokenReview, None),
            caller(agent, AuthMethod::TokenReview, Some("Not_A_Node")),
            caller(agent, AuthMethod::ClientCertificate, Some("node-a")),
            caller(
                "spiffe://cluster.local/ns/shop/sa/web",
                AuthMethod::Jwt,
                Some("node-a"),
            ),
        ] {
            assert_eq!(kubernetes_agent_node(&c, &agents()), None, "{c:?}");
        }
    }
}
