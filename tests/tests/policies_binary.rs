//! Policies end to end with the real binaries: `citadel serve --policies DIR`, a join token
//! from `citadel token create`, the real `citadel-agent`, and a tonic client on the agent's
//! socket following `citadel.v1.WorkloadPolicyService`.

use std::path::Path;
use std::time::{Duration, Instant};

use citadel_e2e::mesh::{AgentOptions, AgentProcess, create_join_token};
use citadel_e2e::process::{CaProcess, citadel, http_get};
use citadel_proto::citadel::v1::workload_policy_service_client::WorkloadPolicyServiceClient;
use citadel_proto::citadel::v1::{WorkloadPolicies, WorkloadPoliciesRequest};
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

const SHOP: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shop-allow, namespace: shop}
spec:
  rules:
  - from: [{source: {namespaces: [shop]}}]
";

const OTHERS: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bank-allow, namespace: bank}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-only, namespace: shop}
spec: {selector: {matchLabels: {app: cart}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
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

async fn next(stream: &mut Streaming<WorkloadPolicies>, secs: u64) -> WorkloadPolicies {
    tokio::time::timeout(Duration::from_secs(secs), stream.message())
        .await
        .unwrap_or_else(|_| panic!("no policy message within {secs} s"))
        .unwrap()
        .expect("the policy stream ended")
}

fn names(msg: &WorkloadPolicies) -> Vec<&str> {
    msg.objects.iter().map(|o| o.name.as_str()).collect()
}

fn node_policy_version(ca: &CaProcess) -> Option<String> {
    let dir = ca.data_dir.display().to_string();
    let out = citadel(&["node", "list", "--data-dir", &dir, "--json"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()?
        .iter()
        .find(|r| r["node"] == "node-a")?
        .get("policy_version")?
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_flow_from_the_ca_directory_to_a_workload_on_the_agent_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let policies = tmp.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("shop.yaml"), SHOP).unwrap();
    std::fs::write(policies.join("others.yaml"), OTHERS).unwrap();
    let policies_arg = policies.display().to_string();
    let ca = CaProcess::start(
        &tmp.path().join("ca"),
        &[
            "--policies",
            &policies_arg,
            "--policies-poll-interval",
            "1s",
        ],
    )
    .await
    .unwrap();
    let token = create_join_token(&ca.data_dir, "node-a", &[WEB], "10m").unwrap();
    let entries = format!(
        "entries:\n  - spiffe_id: {WEB}\n    uid: {}\n    labels: {{app: web}}\n",
        my_uid()
    );
    let dir = tmp.path().join("agent");
    let agent = AgentProcess::start(&ca, &AgentOptions::new(&dir, &entries, Some(&token)))
        .await
        .unwrap();

    // The workload gets its own policies: its namespace's, the mesh-wide one; not bank's,
    // not the selector policy its labels do not match.
    let mut client = WorkloadPolicyServiceClient::new(uds_channel(&agent.socket).await);
    let mut stream = client
        .watch_workload_policies(WorkloadPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream, 15).await;
    assert_eq!(first.spiffe_id, WEB);
    assert_eq!(first.namespace, "shop");
    assert_eq!(first.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(names(&first), ["shop-allow", "default"]);
    assert_eq!(first.version.len(), 64);

    // An edit of a file reaches the workload within a few seconds.
    let edited_at = Instant::now();
    std::fs::write(
        policies.join("shop.yaml"),
        SHOP.replace("[shop]", "[shop, front]"),
    )
    .unwrap();
    let pushed = next(&mut stream, 10).await;
    assert!(edited_at.elapsed() < Duration::from_secs(10));
    assert_ne!(pushed.version, first.version);
    assert!(pushed.objects[0].json.contains("front"), "{pushed:?}");

    // An invalid file keeps the last version in force and counts a reload error.
    std::fs::write(
        policies.join("broken.yaml"),
        SHOP.replace("shop-allow", "broken")
            .replace("rules", "rulez"),
    )
    .unwrap();
    let quiet = tokio::time::timeout(Duration::from_secs(3), stream.message()).await;
    assert!(
        quiet.is_err(),
        "a set was pushed after an invalid edit: {quiet:?}"
    );
    let (_, metrics) = http_get(ca.http_addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("citadel_policy_reload_errors_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("citadel_policy_objects 4"), "{metrics}");

    // The agent acknowledged the version in force: `node list` shows it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if node_policy_version(&ca).as_deref() == Some(pushed.version.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node list does not show policy version {} (shows {:?})",
            pushed.version,
            node_policy_version(&ca)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let agent_metrics = agent.metrics().await.unwrap();
    assert!(
        agent_metrics.contains(&format!(
            "citadel_agent_policy_version_info{{version=\"{}\"}} 1",
            pushed.version
        )),
        "{agent_metrics}"
    );
}
