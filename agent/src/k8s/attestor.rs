//! Pod attestation: the caller's pid (`SO_PEERCRED`) → `<proc-root>/<pid>/cgroup`
//! → pod UID and container ID → the pod, from the agent's node-scoped pod
//! cache → namespace, service account, labels.
//!
//! The cache is behind [`PodIndex`] (the `kube` reflector in production, a
//! map in tests). A pod the cache does not hold yet — the watch can trail
//! the container's start by a moment — is waited for, up to
//! [`PodAttestor::wait`], and so is a container its pod's status does not
//! list yet. Every cache change is also an attestation change: the agent
//! bumps its attestation epoch on it, open streams re-attest, and those of
//! a deleted pod end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use citadel_identity::TrustDomain;
use tokio::sync::watch;

use crate::attest::{AttestError, PeerInfo, Workload, WorkloadAttestor, check_same_process};
use crate::k8s::cgroup::{PodContainer, parse_cgroup_file};
use crate::k8s::pods::{PodFacts, PodMismatch, has_container, workload_of};

/// How long a caller waits for its pod to reach the cache, by default.
pub const DEFAULT_POD_WAIT: Duration = Duration::from_secs(2);

/// The pods on this node, as the agent's watch last saw them.
pub trait PodIndex: Send + Sync + 'static {
    /// The pod with this `metadata.uid`.
    fn pod_by_uid(&self, uid: &str) -> Option<PodFacts>;
    /// Pods that list this container ID (runtime part, lowercase) in their
    /// status: for a cgroup path without a pod UID.
    fn pods_with_container(&self, container_id: &str) -> Vec<PodFacts>;
    /// Changes on every change of the cache.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// Attests callers against a [`PodIndex`].
pub struct PodAttestor {
    index: Arc<dyn PodIndex>,
    proc_root: PathBuf,
    node_name: String,
    trust_domain: TrustDomain,
    wait: Duration,
}

impl PodAttestor {
    /// An attestor for the pods of `node_name`, reading process facts under
    /// `proc_root` (`/proc` with `hostPID`).
    pub fn new(
        index: Arc<dyn PodIndex>,
        proc_root: PathBuf,
        node_name: String,
        trust_domain: TrustDomain,
    ) -> Self {
        Self {
            index,
            proc_root,
            node_name,
            trust_domain,
            wait: DEFAULT_POD_WAIT,
        }
    }

    /// How long a caller whose pod is not in the cache yet is waited for.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// One look at the cache: the workload, or why not (and whether
    /// waiting for the next cache change could help).
    fn lookup(&self, pid: i32, at: &PodContainer) -> Result<Workload, (bool, AttestError)> {
        let no_pod = |retry: bool, reason: String| (retry, AttestError::NoPod { pid, reason });
        let pod = match &at.pod_uid {
            Some(uid) => self.index.pod_by_uid(uid).ok_or_else(|| {
                no_pod(
                    true,
                    format!("pod UID {uid} is not in the node's pod cache"),
                )
            })?,
            None => {
                let mut pods = self.index.pods_with_container(&at.container_id);
                pods.retain(|p| has_container(p, &at.container_id));
                match pods.len() {
                    1 => pods.remove(0),
                    0 => {
                        return Err(no_pod(
                            true,
                            format!("no pod lists container {}", at.container_id),
                        ));
                    }
                    n => {
                        return Err(no_pod(
                            false,
                            format!("{n} pods list container {}", at.container_id),
                        ));
                    }
                }
            }
        };
        workload_of(&pod, &at.container_id, &self.node_name, &self.trust_domain).map_err(|e| {
            let retry = matches!(e, PodMismatch::NotItsContainer { .. });
            no_pod(retry, e.to_string())
        })
    }
}

#[async_trait]
impl WorkloadAttestor for PodAttestor {
    async fn attest(&self, peer: &PeerInfo) -> Result<Workload, AttestError> {
        let pid = peer.pid.ok_or(AttestError::NoCredentials)?;
        // Without the start time from accept time, the cgroup read now may
        // belong to a later holder of the pid: refuse rather than guess.
        if peer.start_time.is_none() {
            return Err(AttestError::ProcessGone { pid });
        }
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        let contents = tokio::fs::read_to_string(&path)
            .await
            .map_err(|_| AttestError::ProcessGone { pid })?;
        let at = parse_cgroup_file(&contents)
            .map_err(|e| AttestError::NoPod {
                pid,
                reason: e.to_string(),
            })?
            .ok_or(AttestError::NotInAPod { pid })?;
        let mut changes = self.index.changes();
        let deadline = tokio::time::Instant::now() + self.wait;
        let workload = loop {
            changes.borrow_and_update();
            match self.lookup(pid, &at) {
                Ok(w) => break w,
                Err((true, e)) => {
                    let waited = tokio::time::timeout_at(deadline, changes.changed()).await;
                    match waited {
                        Ok(Ok(())) => {}
                        // Out of time, or the cache is gone: the last answer stands.
                        _ => return Err(e),
                    }
                }
                Err((false, e)) => return Err(e),
            }
        };
        check_same_process(&self.proc_root, peer)?;
        Ok(workload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const PID: i32 = 4242;
    const START: u64 = 777;

    #[derive(Default)]
    struct MapIndex {
        pods: Mutex<BTreeMap<String, PodFacts>>,
        tx: Mutex<Option<watch::Sender<u64>>>,
        rx: Mutex<Option<watch::Receiver<u64>>>,
    }

    impl MapIndex {
        fn new() -> Arc<Self> {
            let (tx, rx) = watch::channel(0);
            Arc::new(Self {
                pods: Mutex::default(),
                tx: Mutex::new(Some(tx)),
                rx: Mutex::new(Some(rx)),
            })
        }
        fn put(&self, pod: PodFacts) {
            self.pods.lock().unwrap().insert(pod.uid.clone(), pod);
            if let Some(tx) = &*self.tx.lock().unwrap() {
                tx.send_modify(|n| *n += 1);
            }
        }
    }

    impl PodIndex for MapIndex {
        fn pod_by_uid(&self, uid: &str) -> Option<PodFacts> {
            self.pods.lock().unwrap().get(uid).cloned()
        }
        fn pods_with_container(&self, id: &str) -> Vec<PodFacts> {
            let pods = self.pods.lock().unwrap();
            pods.values()
                .filter(|p| has_container(p, id))
                .cloned()
                .collect()
        }
        fn changes(&self) -> watch::Receiver<u64> {
            self.rx.lock().unwrap().clone().unwrap()
        }
    }

    fn pod(uid: &str, container: &str) -> PodFacts {
        PodFacts {
            uid: uid.into(),
            namespace: "shop".into(),
            name: "web-1".into(),
            service_account: "web".into(),
            node_name: "node-a".into(),
            phase: "Running".into(),
            labels: [("app".to_owned(), "web".to_owned())].into(),
            container_ids: vec![format!("containerd://{container}")],
        }
    }

    /// A proc root with one process: its cgroup file and a stat line whose
    /// start time is [`START`].
    fn proc_root(cgroup: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(PID.to_string());
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("cgroup"), cgroup).unwrap();
        let fields: Vec<String> = (3..=21).map(|_| "0".to_owned()).collect();
        std::fs::write(
            p.join("stat"),
            format!("{PID} (app) {} {START} 0 0\n", fields.join(" ")),
        )
        .unwrap();
        dir
    }

    fn peer() -> PeerInfo {
        PeerInfo {
            connection_id: 1,
            pid: Some(PID),
            uid: 1000,
            gid: 1000,
            start_time: Some(START),
        }
    }

    fn attestor(index: Arc<MapIndex>, root: &tempfile::TempDir) -> PodAttestor {
        PodAttestor::new(
            index,
            root.path().to_owned(),
            "node-a".into(),
            TrustDomain::new("cluster.local").unwrap(),
        )
    }

    fn systemd_containerd() -> String {
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        )
    }

    #[tokio::test]
    async fn a_container_of_a_pod_on_the_node_gets_its_service_account_identity() {
        let index = MapIndex::new();
        index.put(pod(UID, ID));
        let root = proc_root(&systemd_containerd());
        let w = attestor(index, &root).attest(&peer()).await.unwrap();
        assert_eq!(
            w.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(w.labels["app"], "web");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_not_yet_in_the_cache_is_waited_for_briefly() {
        let index = MapIndex::new();
        let root = proc_root(&systemd_containerd());
        let a = attestor(index.clone(), &root);
        let late = index.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            late.put(pod(UID, ID));
        });
        assert!(a.attest(&peer()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_that_never_arrives_is_refused_after_the_wait() {
        let index = MapIndex::new();
        let root = proc_root(&systemd_containerd());
        let started = tokio::time::Instant::now();
        let err = attestor(index, &root).attest(&peer()).await.unwrap_err();
        assert!(matches!(err, AttestError::NoPod { .. }), "{err}");
        assert_eq!(started.elapsed(), DEFAULT_POD_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_the_pod_does_not_list_is_refused() {
        let index = MapIndex::new();
        index.put(pod(UID, &ID.replace('0', "f")));
        let root = proc_root(&systemd_containerd());
        let err = attestor(index, &root).attest(&peer()).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("is not a container of pod shop/web-1"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_pod_on_another_node_is_refused() {
        let index = MapIndex::new();
        let mut p = pod(UID, ID);
        p.node_name = "node-b".into();
        index.put(p);
        let root = proc_root(&systemd_containerd());
        let err = attestor(index, &root).attest(&peer()).await.unwrap_err();
        assert!(err.to_string().contains("node-b"), "{err}");
    }

    #[tokio::test]
    async fn a_host_process_is_refused_as_not_in_a_pod() {
        let index = MapIndex::new();
        let root = proc_root("0::/user.slice/user-1000.slice/session-2.scope\n");
        let err = attestor(index, &root).attest(&peer()).await.unwrap_err();
        assert_eq!(err, AttestError::NotInAPod { pid: PID });
    }

    #[tokio::test]
    async fn a_cgroup_without_pod_uid_is_matched_by_container_id_and_only_uniquely() {
        let index = MapIndex::new();
        index.put(pod(UID, ID));
        let root = proc_root(&format!("0::/../crio-{ID}.scope\n"));
        let a = attestor(index.clone(), &root);
        assert!(a.attest(&peer()).await.is_ok());
        index.put(pod("00000000-0000-4000-8000-000000000000", ID));
        let err = a.attest(&peer()).await.unwrap_err();
        assert!(err.to_string().contains("2 pods list container"), "{err}");
    }

    #[tokio::test]
    async fn pod_attestation_refuses_a_reused_or_unknown_pid() {
        let index = MapIndex::new();
        index.put(pod(UID, ID));
        let root = proc_root(&systemd_containerd());
        let a = attestor(index, &root);
        let mut reused = peer();
        reused.start_time = Some(START + 1);
        assert_eq!(
            a.attest(&reused).await.unwrap_err(),
            AttestError::ProcessGone { pid: PID }
        );
        let mut unknown = peer();
        unknown.start_time = None;
        assert_eq!(
            a.attest(&unknown).await.unwrap_err(),
            AttestError::ProcessGone { pid: PID }
        );
        let mut gone = peer();
        gone.pid = Some(PID + 1);
        assert!(matches!(
            a.attest(&gone).await.unwrap_err(),
            AttestError::ProcessGone { .. }
        ));
    }
}
