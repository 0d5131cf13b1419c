//! The node's pods, from one `kube` watcher scoped to this node
//! (`fieldSelector=spec.nodeName=<node>`) feeding a reflector store: the
//! production [`PodIndex`]. The watcher re-lists and resumes by itself
//! (after `410 Gone`, a dropped connection, an API server restart), with
//! kube's default backoff; the store is the state of the last list plus
//! the events since.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::k8s::attestor::PodIndex;
use crate::k8s::pods::{PodFacts, has_container};

/// What attestation reads of a pod. `None` for a pod without a UID (never
/// from a real API server).
pub fn pod_facts(pod: &Pod) -> Option<PodFacts> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let ids = |statuses: Option<&Vec<ContainerStatus>>| -> Vec<String> {
        statuses
            .into_iter()
            .flatten()
            .filter_map(|s| s.container_id.clone())
            .filter(|id| !id.is_empty())
            .collect()
    };
    // Ephemeral (debug) containers are left out on purpose: they are not
    // the workload and must not get its identity.
    let mut container_ids = ids(status.and_then(|s| s.container_statuses.as_ref()));
    container_ids.extend(ids(status.and_then(|s| s.init_container_statuses.as_ref())));
    Some(PodFacts {
        uid: meta.uid.clone()?,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        container_ids,
    })
}

/// The field selector of the agent's pod watch.
pub fn node_selector(node_name: &str) -> String {
    format!("spec.nodeName={node_name}")
}

/// The pods of one node, kept current by a background watch.
pub struct KubePodIndex {
    store: Store<Pod>,
    changes: watch::Receiver<u64>,
}

impl KubePodIndex {
    /// Starts watching the pods of `node_name`. The returned task runs the
    /// watch until aborted; [`PodIndex::changes`] ticks on every event.
    pub fn start(client: Client, node_name: &str) -> (Arc<KubePodIndex>, JoinHandle<()>) {
        let api: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().fields(&node_selector(node_name));
        let (store, writer) = reflector::store();
        let (tx, rx) = watch::channel(0u64);
        let node = node_name.to_owned();
        let task = tokio::spawn(async move {
            let events = watcher(api, config).default_backoff().reflect(writer);
            futures::pin_mut!(events);
            let mut failing = false;
            while let Some(event) = events.next().await {
                match event {
                    Ok(_) => {
                        if failing {
                            tracing::info!(node = %node, "pod watch resumed");
                            failing = false;
                        }
                        tx.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    // The watcher retries by itself (backoff); say it once per outage.
                    Err(e) if !failing => {
                        tracing::warn!(node = %node, error = %e, "pod watch failed; retrying");
                        failing = true;
                    }
                    Err(e) => tracing::debug!(error = %e, "pod watch still failing"),
                }
            }
        });
        (Arc::new(KubePodIndex { store, changes: rx }), task)
    }

    /// Resolves once the first list has been applied.
    pub async fn ready(&self) {
        let _ = self.store.wait_until_ready().await;
    }

    /// How many pods the cache holds.
    pub fn len(&self) -> usize {
        self.store.state().len()
    }

    /// Whether the cache holds no pod.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PodIndex for KubePodIndex {
    fn pod_by_uid(&self, uid: &str) -> Option<PodFacts> {
        self.store
            .find(|p| p.metadata.uid.as_deref() == Some(uid))
            .and_then(|p| pod_facts(&p))
    }

    fn pods_with_container(&self, container_id: &str) -> Vec<PodFacts> {
        self.store
            .state()
            .iter()
            .filter_map(|p| pod_facts(p))
            .filter(|f| has_container(f, container_id))
            .collect()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_facts_take_regular_and_init_containers_but_not_ephemeral_ones() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": []},
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": "app", "containerID": "containerd://aa", "image": "", "imageID": "", "ready": true, "restartCount": 0},
                    {"name": "new", "image": "", "imageID": "", "ready": false, "restartCount": 0}
                ],
                "initContainerStatuses": [
                    {"name": "init", "containerID": "containerd://bb", "image": "", "imageID": "", "ready": false, "restartCount": 0}
                ],
                "ephemeralContainerStatuses": [
                    {"name": "debug", "containerID": "containerd://cc", "image": "", "imageID": "", "ready": false, "restartCount": 0}
                ]
            }
        }))
        .unwrap();
        let f = pod_facts(&pod).unwrap();
        assert_eq!(f.container_ids, vec!["containerd://aa", "containerd://bb"]);
        assert_eq!(
            (f.namespace.as_str(), f.service_account.as_str()),
            ("shop", "web")
        );
        assert_eq!(
            (f.node_name.as_str(), f.phase.as_str()),
            ("node-a", "Running")
        );
        assert_eq!(f.labels["app"], "web");
    }

    #[test]
    fn the_watch_is_scoped_to_the_node() {
        assert_eq!(node_selector("node-a"), "spec.nodeName=node-a");
    }
}
