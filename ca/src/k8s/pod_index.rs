//! The pod index: which pods of which service account run on which node,
//! kept from a `kube` watcher over all pods, and the pure node-authorization
//! decision taken on it.
//!
//! A pod counts while it is *live*: phase `Running`, or `Pending` with a container already
//! created (a process exists that can call its node agent before the kubelet reports
//! `Running`), and not being deleted (`metadata.deletionTimestamp` unset). Pods that ended,
//! were deleted or are terminating leave the index.

use std::collections::{BTreeSet, HashMap};

use citadel_identity::{SpiffeId, TrustDomain};
use k8s_openapi::api::core::v1::Pod;

use crate::auth::{AuthMethod, Caller};
use crate::issuer::IssueError;
use crate::node_authz::denied;

/// What the index keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service account (`default` when the pod names none).
    pub service_account: String,
    /// The node it is scheduled on.
    pub node: String,
}

/// The facts of a live pod (pure); `None` for a pod that is not live or not scheduled yet.
pub fn live_pod(pod: &Pod) -> Option<(String, PodFacts)> {
    let meta = &pod.metadata;
    if meta.deletion_timestamp.is_some() {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    let created = || {
        status
            .container_statuses
            .iter()
            .flatten()
            .any(|c| c.container_id.as_deref().is_some_and(|id| !id.is_empty()))
    };
    let live = match status.phase.as_deref() {
        Some("Running") => true,
        Some("Pending") => created(),
        _ => false,
    };
    if !live {
        return None;
    }
    let nonempty = |s: Option<&String>| s.filter(|s| !s.is_empty()).cloned();
    let uid = nonempty(meta.uid.as_ref())?;
    Some((
        uid,
        PodFacts {
            namespace: nonempty(meta.namespace.as_ref())?,
            name: nonempty(meta.name.as_ref())?,
            service_account: nonempty(spec.service_account_name.as_ref())
                .unwrap_or_else(|| "default".into()),
            node: nonempty(spec.node_name.as_ref())?,
        },
    ))
}

type SaNode = (String, String, String);

/// Live pods by UID and by (namespace, service account, node).
#[derive(Debug, Default, Clone)]
pub struct PodIndex {
    pods: HashMap<String, PodFacts>,
    by_sa_node: HashMap<SaNode, BTreeSet<String>>,
    synced: bool,
}

fn sa_node(f: &PodFacts) -> SaNode {
    (
        f.namespace.clone(),
        f.service_account.clone(),
        f.node.clone(),
    )
}

impl PodIndex {
    /// Whether the first full list has been applied (before it, nothing is decided).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Marks the index complete.
    pub fn mark_synced(&mut self) {
        self.synced = true;
    }

    /// Live pods indexed.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether no live pod is indexed.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Adds, updates or (when it is no longer live) removes `pod`.
    pub fn apply(&mut self, pod: &Pod) {
        match (live_pod(pod), pod.metadata.uid.as_deref()) {
            (Some((uid, facts)), _) => self.insert(uid, facts),
            (None, Some(uid)) => self.remove(uid),
            (None, None) => {}
        }
    }

    /// Inserts a live pod's facts.
    pub fn insert(&mut self, uid: String, facts: PodFacts) {
        self.remove(&uid);
        self.by_sa_node
            .entry(sa_node(&facts))
            .or_default()
            .insert(uid.clone());
        self.pods.insert(uid, facts);
    }

    /// Removes the pod with `uid`.
    pub fn remove(&mut self, uid: &str) {
        let Some(old) = self.pods.remove(uid) else {
            return;
        };
        let key = sa_node(&old);
        if let Some(set) = self.by_sa_node.get_mut(&key) {
            set.remove(uid);
            if set.is_empty() {
                self.by_sa_node.remove(&key);
            }
        }
    }

    /// The live pod with `uid`.
    pub fn pod(&self, uid: &str) -> Option<&PodFacts> {
        self.pods.get(uid)
    }

    /// Whether a live pod of `namespace/service_account` is on `node`.
    pub fn runs_on(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        self.by_sa_node
            .get(&(
                namespace.to_owned(),
                service_account.to_owned(),
                node.to_owned(),
            ))
            .is_some_and(|s| !s.is_empty())
    }
}

/// A service account trusted as a node agent (`--trusted-agent NS/SA`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedAgent {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

impl TrustedAgent {
    /// Parses `NS/SA`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => Ok(Self {
                namespace: ns.to_owned(),
                service_account: sa.to_owned(),
            }),
            _ => Err(format!("{s:?} is not NAMESPACE/SERVICE_ACCOUNT")),
        }
    }
}

impl std::fmt::Display for TrustedAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// Decides whether `caller` may receive `target` as a Kubernetes node agent (pure).
///
/// `Ok(None)`: the caller is not a trusted agent (authenticated by a service-account token,
/// its service account listed in `trusted`). Otherwise it must name its node and pod (a
/// pod-bound token), that pod must be a live pod of the caller's service account on that
/// node, and a live pod of `target`'s service account must be on the same node.
pub fn decide(
    index: &PodIndex,
    trusted: &[TrustedAgent],
    td: &TrustDomain,
    caller: &Caller,
    target: &SpiffeId,
) -> Result<Option<String>, IssueError> {
    if !matches!(caller.method, AuthMethod::TokenReview | AuthMethod::Jwt)
        || !caller.identity.is_member_of(td)
    {
        return Ok(None);
    }
    let Some(agent) = caller.identity.service_account() else {
        return Ok(None);
    };
    if !trusted
        .iter()
        .any(|t| t.namespace == agent.namespace && t.service_account == agent.name)
    {
        return Ok(None);
    }
    let deny = |why: String| Err(denied(caller, target.as_str(), &why));
    if !index.is_synced() {
        return Err(IssueError::Unavailable(
            "the pod index is not synced with the Kubernetes API server yet; retry later".into(),
        ));
    }
    let Some(node) = caller.node.as_deref() else {
        return deny(
            "its token names no node (pod-bound tokens carry one from Kubernetes 1.30)".into(),
        );
    };
    let Some(pod_uid) = caller.pod_uid.as_deref() else {
        return deny("its token is not bound to a pod".into());
    };
    let agent_pod_ok = index.pod(pod_uid).is_some_and(|p| {
        p.namespace == agent.namespace && p.service_account == agent.name && p.node == node
    });
    if !agent_pod_ok {
        return deny(format!(
            "its token's pod {pod_uid} is not a running pod of {}/{} on node {node}",
            agent.namespace, agent.name
        ));
    }
    let Some(wanted) = target.service_account() else {
        return deny("a node agent may only ask for /ns/<namespace>/sa/<name> identities".into());
    };
    if !index.runs_on(wanted.namespace, wanted.name, node) {
        return deny(format!(
            "no running pod of service account {}/{} is on node {node}",
            wanted.namespace, wanted.name
        ));
    }
    Ok(Some(node.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn pod(uid: &str, ns: &str, sa: &str, node: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{sa}-{uid}"), "namespace": ns, "uid": uid},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn index() -> PodIndex {
        let mut i = PodIndex::default();
        i.apply(&pod(
            "agent-a",
            "citadel-system",
            "citadel-agent",
            "node-a",
            "Running",
        ));
        i.apply(&pod("web-a", "shop", "web", "node-a", "Running"));
        i.apply(&pod("db-b", "shop", "db", "node-b", "Running"));
        i.mark_synced();
        i
    }

    fn trusted() -> Vec<TrustedAgent> {
        vec![TrustedAgent::parse("citadel-system/citadel-agent").unwrap()]
    }

    fn agent(node: &str, pod_uid: &str) -> Caller {
        Caller {
            identity: SpiffeId::parse("spiffe://cluster.local/ns/citadel-system/sa/citadel-agent")
                .unwrap(),
            method: AuthMethod::TokenReview,
            node: Some(node.into()),
            pod: Some("agent".into()),
            pod_uid: Some(pod_uid.into()),
            certificate_serial: None,
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn refused(out: Result<Option<String>, IssueError>) -> String {
        match out {
            Err(IssueError::PermissionDenied(m)) => m,
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    }

    #[test]
    fn agent_may_impersonate_a_service_account_with_a_running_pod_on_its_node() {
        let out = decide(
            &index(),
            &trusted(),
            &td(),
            &agent("node-a", "agent-a"),
            &id("spiffe://cluster.local/ns/shop/sa/web"),
        );
        assert_eq!(out.unwrap(), Some("node-a".into()));
    }

    #[test]
    fn agent_may_not_impersonate_a_service_account_whose_pods_run_elsewhere() {
        let m = refused(decide(
            &index(),
            &trusted(),
            &td(),
            &agent("node-a", "agent-a"),
            &id("spiffe://cluster.local/ns/shop/sa/db"),
        ));
        assert!(
            m.contains("no running pod of service account shop/db"),
            "{m}"
        );
    }

    #[test]
    fn agent_whose_pod_uid_is_not_its_running_pod_on_that_node_is_refused() {
        // A token from a pod that is gone, or claiming another node, or another SA's pod.
        for (node, uid) in [
            ("node-a", "gone"),
            ("node-b", "agent-a"),
            ("node-a", "web-a"),
        ] {
            let m = refused(decide(
                &index(),
                &trusted(),
                &td(),
                &agent(node, uid),
                &id("spiffe://cluster.local/ns/shop/sa/web"),
            ));
            assert!(m.contains("is not a running pod"), "{m}");
        }
    }

    #[test]
    fn agent_token_without_pod_or_node_binding_is_refused() {
        let mut c = agent("node-a", "agent-a");
        c.node = None;
        refused(decide(
            &index(),
            &trusted(),
            &td(),
            &c,
            &id("spiffe://cluster.local/ns/shop/sa/web"),
        ));
        let mut c = agent("node-a", "agent-a");
        c.pod_uid = None;
        refused(decide(
            &index(),
            &trusted(),
            &td(),
            &c,
            &id("spiffe://cluster.local/ns/shop/sa/web"),
        ));
    }

    #[test]
    fn an_untrusted_service_account_is_not_a_node_agent() {
        let mut c = agent("node-a", "web-a");
        c.identity = id("spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            decide(
                &index(),
                &trusted(),
                &td(),
                &c,
                &id("spiffe://cluster.local/ns/shop/sa/db")
            )
            .unwrap(),
            None
        );
        let mut c = agent("node-a", "agent-a");
        c.method = AuthMethod::ClientCertificate;
        assert_eq!(
            decide(
                &index(),
                &trusted(),
                &td(),
                &c,
                &id("spiffe://cluster.local/ns/shop/sa/web")
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn nothing_is_decided_before_the_index_is_synced() {
        let mut i = index();
        i.synced = false;
        let out = decide(
            &i,
            &trusted(),
            &td(),
            &agent("node-a", "agent-a"),
            &id("spiffe://cluster.local/ns/shop/sa/web"),
        );
        assert!(matches!(out, Err(IssueError::Unavailable(_))), "{out:?}");
    }

    #[test]
    fn deleted_terminating_and_finished_pods_leave_the_index() {
        let mut i = index();
        assert!(i.runs_on("shop", "web", "node-a"));
        let mut terminating = pod("web-a", "shop", "web", "node-a", "Running");
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        i.apply(&terminating);
        assert!(!i.runs_on("shop", "web", "node-a"));
        i.apply(&pod("web-a", "shop", "web", "node-a", "Running"));
        i.apply(&pod("web-a", "shop", "web", "node-a", "Succeeded"));
        assert!(!i.runs_on("shop", "web", "node-a"));
        i.apply(&pod("web-a", "shop", "web", "node-a", "Running"));
        i.remove("web-a");
        assert!(!i.runs_on("shop", "web", "node-a"));
        assert!(i.pod("web-a").is_none());
    }

    #[test]
    fn a_pending_pod_counts_once_a_container_exists() {
        let mut p = pod("p", "shop", "web", "node-a", "Pending");
        assert!(live_pod(&p).is_none());
        p.status = serde_json::from_value(json!({"phase": "Pending", "containerStatuses": [
            {"name": "app", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
             "containerID": "containerd://abc"}]}))
        .unwrap();
        assert!(live_pod(&p).is_some());
    }

    #[test]
    fn trusted_agent_flag_is_namespace_slash_service_account() {
        assert!(TrustedAgent::parse("a/b").is_ok());
        for bad in ["a", "/b", "a/", "a/b/c"] {
            assert!(TrustedAgent::parse(bad).is_err(), "{bad}");
        }
    }
}
