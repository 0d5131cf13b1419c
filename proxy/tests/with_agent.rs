//! The proxy against the real agent server in-process (its SDS, its policy stream,
//! the real entries attestor with this test's uid as the caller; the CA behind it is
//! the agent's in-memory fake). The proxy's own outbound dials its own inbound, so
//! both ends use the certificate and bundle it got over SDS.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use citadel_agent::attest::EntriesAttestor;
use citadel_agent::bundle::BundleState;
use citadel_agent::entries::WorkloadEntries;
use citadel_agent::fake::FakeCa;
use citadel_agent::manager::{CertManager, ManagerConfig};
use citadel_agent::metrics::AgentMetrics;
use citadel_agent::policy::parse_set;
use citadel_agent::server::{AgentState, serve};
use citadel_agent::socket;
use citadel_identity::{Backoff, TrustDomain};
use citadel_policy::MeshConfig;
use citadel_proto::citadel::v1::{PolicyObject, PolicySet};
use citadel_proxy::app::{RunningProxy, start};
use citadel_proxy::config::{parse_inbound, parse_outbound};
use support::{API, echo_app, http_get, local_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

fn fast() -> Backoff {
    Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(300),
        multiplier: 2.0,
        jitter: 0.2,
    }
}

/// An AuthorizationPolicy on app=api with `action` for principal `shop/api`.
fn policy_set(version: &str, action: &str) -> PolicySet {
    let json = format!(
        r#"{{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{{"name":"api-{action}","namespace":"shop"}},"spec":{{"selector":{{"matchLabels":{{"app":"api"}}}},"action":"{action}","rules":[{{"from":[{{"source":{{"principals":["cluster.local/ns/shop/sa/api"]}}}}]}}]}}}}"#
    );
    PolicySet {
        version: version.to_owned(),
        objects: vec![PolicyObject {
            kind: "AuthorizationPolicy".to_owned(),
            api_version: "security.istio.io/v1".to_owned(),
            namespace: "shop".to_owned(),
            name: format!("api-{action}"),
            json,
            resolved_jwks: Vec::new(),
        }],
    }
}

/// The agent's server on `path` with `ca` behind it and `set` as its policies.
struct Agent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Agent {
    async fn start(path: &Path, ca: Arc<FakeCa>, set: &PolicySet) -> Agent {
        let yaml = format!(
            "entries:\n  - spiffe_id: {API}\n    uid: {}\n    labels: {{app: api}}\n",
            my_uid()
        );
        let (entries_tx, entries_rx) =
            watch::channel(Arc::new(WorkloadEntries::parse(&yaml).unwrap()));
        let (epoch_tx, epoch_rx) = watch::channel(0u64);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (bundle_tx, bundle_rx) =
            watch::channel(Some(Arc::new(BundleState::new(ca.bundle(), 1))));
        let metrics = AgentMetrics::new();
        let manager = CertManager::new(
            ca,
            bundle_rx.clone(),
            ManagerConfig {
                workload_ttl: Duration::from_secs(3600),
                idle_linger: Duration::from_millis(200),
                backoff: fast(),
                ..ManagerConfig::default()
            },
            metrics.clone(),
        );
        let policies = parse_set(set, &MeshConfig::default()).unwrap();
        let (policies_tx, policies_rx) = watch::channel(Some(Arc::new(policies)));
        let state = Arc::new(AgentState {
            attestor: Arc::new(EntriesAttestor::new(entries_rx)),
            propagation: Default::default(),
            manager,
            bundle: bundle_rx,
            policies: policies_rx,
            mesh: MeshConfig::default(),
            metrics,
            fetch_timeout: Duration::from_secs(2),
            attestation_changed: epoch_rx,
            shutdown: shutdown_rx,
        });
        let listener = socket::bind(path).await.unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            // The senders live as long as the server.
            let _keep = (entries_tx, epoch_tx, bundle_tx, policies_tx);
            serve(listener, state, async {
                let _ = stop_rx.await;
                shutdown_tx.send_replace(true);
            })
            .await
            .unwrap();
        });
        Agent {
            stop: Some(stop_tx),
            server,
        }
    }

    async fn stop(mut self, path: &Path) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.server)
            .await
            .expect("the agent did not stop")
            .unwrap();
        let _ = std::fs::remove_file(path);
    }
}

/// A proxy for the test's uid: inbound to an echo app, outbound to that inbound.
async fn proxy(socket: PathBuf) -> RunningProxy {
    let app = echo_app().await;
    let inbound_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut config = local_config(socket);
    config.backoff = fast();
    config.inbound = vec![parse_inbound(&format!("{inbound_port}:{app}")).unwrap()];
    let mut out = parse_outbound(&format!("1=127.0.0.1:{inbound_port},{API}")).unwrap();
    out.local_port = 0;
    config.outbound = vec![out];
    start(config).await.unwrap()
}

async fn wait_for(secs: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ready(p: &RunningProxy) -> bool {
    http_get(p.admin, "/healthz/ready")
        .await
        .starts_with("HTTP/1.1 200")
}

async fn echo_through(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"ping"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_takes_its_identity_and_policies_from_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let ca = Arc::new(FakeCa::new(TrustDomain::new("cluster.local").unwrap()));
    let agent = Agent::start(&path, ca, &policy_set("v1", "ALLOW")).await;
    let p = proxy(path.clone()).await;
    wait_for(10, "ready", async || ready(&p).await).await;
    assert!(echo_through(p.outbound[0].1).await, "api → api over mTLS");
    let m = p.metrics.encode();
    assert!(m.contains(r#"version="v1""#), "{m}");
    agent.stop(&path).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_going_away_keeps_serving_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let ca = Arc::new(FakeCa::new(TrustDomain::new("cluster.local").unwrap()));
    let agent = Agent::start(&path, ca.clone(), &policy_set("v1", "ALLOW")).await;
    let p = proxy(path.clone()).await;
    wait_for(10, "ready", async || ready(&p).await).await;
    assert!(echo_through(p.outbound[0].1).await);

    // The agent goes away: the proxy keeps what it holds and keeps serving.
    agent.stop(&path).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(ready(&p).await);
    assert!(
        echo_through(p.outbound[0].1).await,
        "stopped serving without its agent"
    );

    // It comes back with a DENY for this principal: the proxy reconnects and applies it.
    let agent = Agent::start(&path, ca, &policy_set("v2", "DENY")).await;
    wait_for(10, "policy v2 from the restarted agent", async || {
        p.metrics.encode().contains(r#"version="v2""#)
    })
    .await;
    assert!(!echo_through(p.outbound[0].1).await, "DENY not enforced");
    agent.stop(&path).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_started_before_its_agent_becomes_ready_when_it_comes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let p = proxy(path.clone()).await;
    let r = http_get(p.admin, "/healthz/ready").await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(!echo_through(p.outbound[0].1).await);
    let ca = Arc::new(FakeCa::new(TrustDomain::new("cluster.local").unwrap()));
    let agent = Agent::start(&path, ca, &policy_set("v1", "ALLOW")).await;
    wait_for(10, "ready", async || ready(&p).await).await;
    assert!(echo_through(p.outbound[0].1).await);
    agent.stop(&path).await;
}
