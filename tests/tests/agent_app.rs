//! The agent as a library (`citadel_agent::app`), in-process against the
//! real `citadel` CA binary: `start` returns a handle with what it bound,
//! and `shutdown` stops every task it spawned.

use std::time::Duration;

use citadel_agent::app::{self, AgentConfig, JoinToken};
use citadel_e2e::mesh::create_join_token;
use citadel_e2e::process::CaProcess;
use spiffe::WorkloadApiClient;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_app_serves_and_its_shutdown_stops_every_task_it_spawned() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("ca"), &[]).await.unwrap();
    let token = create_join_token(&ca.data_dir, "node-a", &[WEB], "10m").unwrap();
    let entries = tmp.path().join("entries.yaml");
    std::fs::write(
        &entries,
        format!("entries:\n  - spiffe_id: {WEB}\n    uid: {}\n", my_uid()),
    )
    .unwrap();
    let mut config = AgentConfig::new(
        ca.grpc_addr.to_string(),
        ca.data_dir.join("bundle.pem"),
        entries,
    );
    config.socket = tmp.path().join("agent.sock");
    config.data_dir = tmp.path().join("agent-data");
    config.http_listen = "127.0.0.1:0".parse().unwrap();
    config.join_token = Some(JoinToken(token));
    config.idle_linger = Duration::from_millis(200);
    config.entries_poll = Duration::from_millis(100);

    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let agent = app::start(config).await.unwrap();
    assert_ne!(agent.http_addr.port(), 0, "the bound address is reported");
    assert_eq!(
        agent
            .node_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        "spiffe://cluster.local/citadel/node/node-a"
    );
    let socket = agent.socket_path.clone();
    let client = WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), WEB);
    drop(client);
    assert!(metrics.num_alive_tasks() > before);

    agent.shutdown().await.unwrap();
    assert!(!socket.exists(), "the socket is removed");
    // The identity task lingers `idle_linger`, the entries poller one tick.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metrics.num_alive_tasks() > before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metrics.num_alive_tasks(),
        before,
        "tasks left running after shutdown"
    );
}
