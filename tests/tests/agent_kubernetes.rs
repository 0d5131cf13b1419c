//! The agent's Kubernetes mode against the fake Kubernetes API server, through
//! the real `kube` client: pod attestation from every cgroup fixture, the
//! node-scoped watch, resumption after `410 Gone`, and — with the whole agent
//! running in Kubernetes mode — a deleted pod's streams ending.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use citadel_agent::app::{self, AgentConfig, KubernetesMode};
use citadel_agent::attest::{AttestError, PeerInfo, WorkloadAttestor};
use citadel_agent::k8s::attestor::{PodAttestor, PodIndex};
use citadel_agent::k8s::pod_cache::KubePodIndex;
use citadel_e2e::fake_kube::{FakeKube, pod, resources};
use citadel_identity::TrustDomain;
use citadel_proto::citadel::v1::WorkloadPoliciesRequest;
use citadel_proto::citadel::v1::workload_policy_service_client::WorkloadPolicyServiceClient;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

const NODE: &str = "node-a";
const START: u64 = 4242;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/cgroup")
}

/// (fixture, pod UID or None, container ID) for every fixture that names a container.
fn expected() -> Vec<(String, Option<String>, String)> {
    let text = std::fs::read_to_string(fixtures().join("EXPECTED.tsv")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            match cols.as_slice() {
                [_, _, "-"] => None,
                [name, uid, id] => Some((
                    (*name).to_owned(),
                    (*uid != "-").then(|| (*uid).to_owned()),
                    (*id).to_owned(),
                )),
                _ => panic!("bad line {l:?}"),
            }
        })
        .collect()
}

/// A pod on `node` with the given UID and one container.
fn pod_with(name: &str, uid: Option<&str>, container_id: &str, node: &str) -> Value {
    let mut p = pod("shop", name, "web", node, "Running");
    if let Some(uid) = uid {
        p["metadata"]["uid"] = uid.into();
    }
    p["status"]["containerStatuses"][0]["containerID"] =
        format!("containerd://{container_id}").into();
    p
}

/// Writes `<root>/<pid>/cgroup` and a `stat` whose start time is [`START`].
fn fake_process(root: &Path, pid: i32, cgroup: &str) {
    let dir = root.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cgroup"), cgroup).unwrap();
    let zeros = vec!["0"; 19].join(" ");
    std::fs::write(
        dir.join("stat"),
        format!("{pid} (app) {zeros} {START} 0 0\n"),
    )
    .unwrap();
}

fn peer(pid: i32) -> PeerInfo {
    PeerInfo {
        connection_id: 1,
        pid: Some(pid),
        uid: 1000,
        gid: 1000,
        start_time: Some(START),
    }
}

async fn index(fake: &FakeKube) -> (Arc<KubePodIndex>, tokio::task::JoinHandle<()>) {
    let (index, task) = KubePodIndex::start(fake.client().unwrap(), NODE);
    tokio::time::timeout(Duration::from_secs(10), index.ready())
        .await
        .expect("the first list arrives");
    (index, task)
}

fn attestor(index: Arc<KubePodIndex>, root: &Path) -> PodAttestor {
    PodAttestor::new(
        index,
        root.to_owned(),
        NODE.into(),
        TrustDomain::new("cluster.local").unwrap(),
    )
    .wait(Duration::from_secs(2))
}

#[tokio::test]
async fn every_cgroup_fixture_attests_to_its_pod_from_the_node_scoped_watch() {
    let fake = FakeKube::start().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let cases = expected();
    for (i, (fixture, uid, id)) in cases.iter().enumerate() {
        fake.insert(
            resources::PODS,
            pod_with(&format!("web-{i}"), uid.as_deref(), id, NODE),
        )
        .unwrap();
        let contents = std::fs::read_to_string(fixtures().join(fixture)).unwrap();
        fake_process(root.path(), 1000 + i as i32, &contents);
    }
    let (index, task) = index(&fake).await;
    let attestor = attestor(index, root.path());
    for (i, (fixture, _, _)) in cases.iter().enumerate() {
        let w = attestor
            .attest(&peer(1000 + i as i32))
            .await
            .unwrap_or_else(|e| panic!("{fixture}: {e}"));
        assert_eq!(
            w.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web",
            "{fixture}"
        );
        assert_eq!(w.labels["app"], format!("web-{i}"), "{fixture}");
    }
    // The agent asked only for its node's pods.
    let requests = fake.requests();
    assert!(
        requests
            .iter()
            .filter(|r| r.contains("/api/v1/pods"))
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{requests:?}"
    );
    task.abort();
}

#[tokio::test]
async fn a_pod_on_another_node_never_reaches_the_cache_and_gets_nothing() {
    let fake = FakeKube::start().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let (_, uid, id) = expected().remove(0);
    let uid = uid.unwrap();
    fake.insert(resources::PODS, pod_with("web", Some(&uid), &id, "node-b"))
        .unwrap();
    fake_process(
        root.path(),
        7,
        &format!("0::/kubepods/besteffort/pod{uid}/{id}\n"),
    );
    let (index, task) = index(&fake).await;
    assert!(index.is_empty(), "the watch is scoped to {NODE}");
    let err = attestor(index, root.path())
        .attest(&peer(7))
        .await
        .unwrap_err();
    assert!(matches!(err, AttestError::NoPod { .. }), "{err}");
    task.abort();
}

#[tokio::test]
async fn a_deleted_pod_is_refused_and_the_watch_resumes_after_410_gone() {
    let fake = FakeKube::start().await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let (_, uid, id) = expected().remove(0);
    let uid = uid.unwrap();
    fake.insert(resources::PODS, pod_with("web", Some(&uid), &id, NODE))
        .unwrap();
    fake_process(
        root.path(),
        7,
        &format!("0::/kubepods/besteffort/pod{uid}/{id}\n"),
    );
    let (index, task) = index(&fake).await;
    let a = attestor(index.clone(), root.path());
    assert!(a.attest(&peer(7)).await.is_ok());

    // The watch is cut off with 410 Gone and the pod deleted meanwhile: the
    // re-list must notice the deletion.
    fake.expire_next_watch(resources::PODS);
    fake.disconnect_watches();
    fake.remove(resources::PODS, "shop", "web").unwrap();
    let mut changes = index.changes();
    let gone = tokio::time::timeout(Duration::from_secs(15), async {
        while index.pod_by_uid(&uid).is_some() {
            let _ = changes.changed().await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the deletion reached the cache");
    assert!(matches!(
        a.attest(&peer(7)).await.unwrap_err(),
        AttestError::NoPod { .. }
    ));
    // The deletion came from a fresh list: the 410 made the watcher list again.
    let lists = fake
        .requests()
        .iter()
        .filter(|r| r.contains("/api/v1/pods") && !r.contains("watch="))
        .count();
    assert!(
        lists >= 2,
        "a re-list after 410 Gone: {:?}",
        fake.requests()
    );

    // A pod created after the resumption is seen.
    let other = id.replace('0', "e");
    fake.insert(resources::PODS, pod_with("web-2", Some(&uid), &other, NODE))
        .unwrap();
    fake_process(
        root.path(),
        8,
        &format!("0::/kubepods/besteffort/pod{uid}/{other}\n"),
    );
    assert!(a.attest(&peer(8)).await.is_ok());
    task.abort();
}

async fn uds_channel(path: &Path) -> Channel {
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

/// A self-signed CA certificate, only so that `--ca-bundle` parses (the CA
/// itself is never reached in this test).
fn some_root_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_kubernetes_mode_ends_a_deleted_pods_streams() {
    let fake = FakeKube::start().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // This test process plays the workload: its pid gets a pod's cgroup
    // under the agent's proc root, and its real start time.
    let pid = std::process::id() as i32;
    let proc_root = tmp.path().join("proc");
    let (_, uid, id) = expected().remove(0);
    let uid = uid.unwrap();
    std::fs::create_dir_all(proc_root.join(pid.to_string())).unwrap();
    std::fs::write(
        proc_root.join(pid.to_string()).join("cgroup"),
        format!("0::/kubepods/besteffort/pod{uid}/{id}\n"),
    )
    .unwrap();
    std::fs::copy(
        format!("/proc/{pid}/stat"),
        proc_root.join(pid.to_string()).join("stat"),
    )
    .unwrap();
    fake.insert(resources::PODS, pod_with("web", Some(&uid), &id, NODE))
        .unwrap();

    let bundle = tmp.path().join("root.pem");
    std::fs::write(&bundle, some_root_pem()).unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "projected.token.value").unwrap();
    let mut config = AgentConfig::new("127.0.0.1:1", bundle, PathBuf::new());
    config.socket = tmp.path().join("agent.sock");
    config.data_dir = tmp.path().join("data");
    config.http_listen = "127.0.0.1:0".parse().unwrap();
    let mut mode = KubernetesMode::new(NODE, token, TrustDomain::new("cluster.local").unwrap());
    mode.proc_root = proc_root;
    mode.kube_config = Some(fake.config());
    config.kubernetes = Some(mode);
    let agent = app::start(config).await.unwrap();
    assert_eq!(agent.node_id, None, "no node certificate on Kubernetes");

    let mut client = WorkloadPolicyServiceClient::new(uds_channel(&agent.socket_path).await);
    let stream = client
        .watch_workload_policies(WorkloadPoliciesRequest {})
        .await;
    let mut stream = stream
        .expect("the pod's container is attested")
        .into_inner();

    fake.remove(resources::PODS, "shop", "web").unwrap();
    let end = tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("the stream ends once the pod is deleted");
    let status = end.expect_err("ends with an error");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");

    // A new stream from the same caller is refused too.
    let again = client
        .watch_workload_policies(WorkloadPoliciesRequest {})
        .await;
    let refused = match again {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.expect_err("refused"),
    };
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    agent.shutdown().await.unwrap();
}
