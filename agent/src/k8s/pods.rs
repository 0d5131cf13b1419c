//! The second step of pod attestation, pure: given the pod the caller's
//! cgroup points at, and the container ID it names, which workload is it?
//!
//! The pod comes from the agent's node-scoped pods watch, as [`PodFacts`]
//! (only the fields attestation reads). The rules, each pinned by a test:
//! - the container must be one of the pod's (`status.containerStatuses`
//!   or `initContainerStatuses`, compared after the `<runtime>://`
//!   prefix); ephemeral (debug) containers are not the workload and get
//!   nothing, nor does the pause container, which no status lists;
//! - the pod must be on this agent's node;
//! - a pod that has finished (`Succeeded`, `Failed`) gets nothing;
//! - the identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service account>`
//!   (`default` when the pod names none), the labels are the pod's.

use std::collections::BTreeMap;

use citadel_identity::{SpiffeId, TrustDomain};

use crate::attest::Workload;

/// What attestation needs to know of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodFacts {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.serviceAccountName` (empty: `default`).
    pub service_account: String,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `status.phase`.
    pub phase: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `containerID` of every entry of `status.containerStatuses` and
    /// `status.initContainerStatuses`, as the API gives them
    /// (`containerd://<id>`); empty ones (not created yet) left out.
    pub container_ids: Vec<String>,
}

/// Why a pod does not vouch for a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodMismatch {
    /// The caller's container is not one of the pod's (yet: a status may
    /// lag the container's start, so callers may retry briefly).
    #[error("container {container_id} is not a container of pod {namespace}/{pod}")]
    NotItsContainer {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        pod: String,
        /// The container ID from the caller's cgroup.
        container_id: String,
    },
    /// The pod is scheduled elsewhere.
    #[error("pod {namespace}/{pod} runs on node {node:?}, not this one")]
    OtherNode {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        pod: String,
        /// Its node.
        node: String,
    },
    /// The pod has finished.
    #[error("pod {namespace}/{pod} has finished (phase {phase})")]
    Finished {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        pod: String,
        /// Its phase.
        phase: String,
    },
    /// Namespace or service account do not make a SPIFFE ID.
    #[error("pod {namespace}/{pod}: no SPIFFE ID for its service account: {reason}")]
    BadIdentity {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        pod: String,
        /// Why.
        reason: String,
    },
}

/// The runtime's ID in a status `containerID` (`containerd://<id>`,
/// `cri-o://<id>`, `docker://<id>`): the part after `://`, lowercase.
/// `None` when there is no `://` or nothing after it.
pub fn runtime_container_id(status_id: &str) -> Option<String> {
    let (_, id) = status_id.split_once("://")?;
    (!id.is_empty()).then(|| id.to_ascii_lowercase())
}

/// Whether `container_id` (from a cgroup path) is one of the pod's.
pub fn has_container(pod: &PodFacts, container_id: &str) -> bool {
    pod.container_ids
        .iter()
        .filter_map(|s| runtime_container_id(s))
        .any(|id| id == container_id)
}

/// The workload `pod` vouches for, when the caller runs in its container
/// `container_id` on node `node`.
pub fn workload_of(
    pod: &PodFacts,
    container_id: &str,
    node: &str,
    trust_domain: &TrustDomain,
) -> Result<Workload, PodMismatch> {
    if pod.node_name != node {
        return Err(PodMismatch::OtherNode {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            node: pod.node_name.clone(),
        });
    }
    if matches!(pod.phase.as_str(), "Succeeded" | "Failed") {
        return Err(PodMismatch::Finished {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            phase: pod.phase.clone(),
        });
    }
    if !has_container(pod, container_id) {
        return Err(PodMismatch::NotItsContainer {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container_id: container_id.to_owned(),
        });
    }
    let sa = if pod.service_account.is_empty() {
        "default"
    } else {
        pod.service_account.as_str()
    };
    let spiffe_id =
        SpiffeId::for_service_account(trust_domain, &pod.namespace, sa).map_err(|e| {
            PodMismatch::BadIdentity {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                reason: e.to_string(),
            }
        })?;
    Ok(Workload {
        spiffe_id,
        labels: pod.labels.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn pod() -> PodFacts {
        PodFacts {
            uid: "2c48913c-b29f-11e7-9350-020968147796".into(),
            namespace: "shop".into(),
            name: "web-1".into(),
            service_account: "web".into(),
            node_name: "node-a".into(),
            phase: "Running".into(),
            labels: [("app".to_owned(), "web".to_owned())].into(),
            container_ids: vec![format!("containerd://{ID}")],
        }
    }

    #[test]
    fn a_container_of_the_pod_gets_the_pods_service_account_identity_and_labels() {
        let w = workload_of(&pod(), ID, "node-a", &td()).unwrap();
        assert_eq!(
            w.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(w.labels.get("app").map(String::as_str), Some("web"));
    }

    #[test]
    fn a_container_the_pod_does_not_list_gets_nothing() {
        let other = ID.replace('0', "f");
        assert!(matches!(
            workload_of(&pod(), &other, "node-a", &td()),
            Err(PodMismatch::NotItsContainer { .. })
        ));
        // Not created yet: the status has no ID.
        let mut p = pod();
        p.container_ids = vec![String::new(), "containerd://".into()];
        assert!(workload_of(&p, ID, "node-a", &td()).is_err());
    }

    #[test]
    fn every_runtime_prefix_is_stripped_before_comparing() {
        for prefix in ["containerd://", "cri-o://", "docker://"] {
            let mut p = pod();
            p.container_ids = vec![format!("{prefix}{}", ID.to_uppercase())];
            assert!(has_container(&p, ID), "{prefix}");
        }
        assert_eq!(runtime_container_id(ID), None);
    }

    #[test]
    fn a_pod_on_another_node_gets_nothing() {
        assert!(matches!(
            workload_of(&pod(), ID, "node-b", &td()),
            Err(PodMismatch::OtherNode { .. })
        ));
    }

    #[test]
    fn a_finished_pod_gets_nothing() {
        for phase in ["Succeeded", "Failed"] {
            let mut p = pod();
            p.phase = phase.into();
            assert!(matches!(
                workload_of(&p, ID, "node-a", &td()),
                Err(PodMismatch::Finished { .. })
            ));
        }
    }

    #[test]
    fn a_pod_without_a_service_account_name_is_default() {
        let mut p = pod();
        p.service_account.clear();
        let w = workload_of(&p, ID, "node-a", &td()).unwrap();
        assert_eq!(
            w.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/default"
        );
    }

    #[test]
    fn a_namespace_that_makes_no_spiffe_path_is_refused() {
        let mut p = pod();
        p.namespace = "a/b".into();
        assert!(matches!(
            workload_of(&p, ID, "node-a", &td()),
            Err(PodMismatch::BadIdentity { .. })
        ));
    }
}
