//! The real `citadel serve --kubernetes` binary against the fake Kubernetes API
//! server (reached through `KUBECONFIG`): a workload pod's token exchanged through
//! TokenReview yields its certificate, and a node agent gets certificates only for pods
//! on its own node.

use std::time::Duration;

use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use citadel_e2e::fake_kube::resources::{PODS, SECRETS};
use citadel_e2e::fake_kube::{FakeKube, pod, service_account_token};
use citadel_e2e::process::{CaProcess, free_port};
use citadel_e2e::unix_now;
use serde_json::Value;
use tonic::Code;

fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: ca\n    namespace: citadel-system\n\
         current-context: fake\nusers:\n- name: ca\n  user:\n    token: not-checked-by-the-fake\n"
    )
}

fn token_for(fake: &FakeKube, ns: &str, sa: &str, pod_obj: &Value) -> String {
    let name = pod_obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap();
    let node = pod_obj
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap();
    let uid = pod_obj
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap();
    let t = service_account_token(
        ns,
        sa,
        Some((name, uid)),
        Some(node),
        &["istio-ca"],
        unix_now() + 3600,
    );
    fake.register_token(&t.token, t.info.clone());
    t.token
}

async fn ask(
    ca: &CaProcess,
    bundle: &str,
    token: &str,
    target: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let csr = p256_csr(&[]).unwrap();
    let mut client = connect(ca.grpc_addr, bundle, None).await.unwrap();
    create(&mut client, request(&csr.pem, 0, Some(token), target))
        .await
        .map(|r| r.cert_chain)
}

#[tokio::test]
async fn the_ca_binary_on_kubernetes_issues_by_token_review_and_node_authorization() {
    let fake = FakeKube::start().await.unwrap();
    let agent = fake
        .insert(
            PODS,
            pod(
                "citadel-system",
                "citadel-agent-a",
                "citadel-agent",
                "node-a",
                "Running",
            ),
        )
        .unwrap();
    let web = fake
        .insert(PODS, pod("shop", "web-1", "web", "node-a", "Running"))
        .unwrap();
    fake.insert(PODS, pod("shop", "db-1", "db", "node-b", "Running"))
        .unwrap();
    let agent_token = token_for(&fake, "citadel-system", "citadel-agent", &agent);
    let web_token = token_for(&fake, "shop", "web", &web);

    let tmp = tempfile::tempdir().unwrap();
    let kc = tmp.path().join("kubeconfig");
    std::fs::write(&kc, kubeconfig(&fake.url())).unwrap();
    let grpc = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let kc = kc.display().to_string();
    let ca = CaProcess::start_with_env(
        &tmp.path().join("data"),
        grpc,
        http,
        &["--kubernetes"],
        &[("KUBECONFIG", &kc)],
    )
    .await
    .unwrap();
    let bundle = ca.bundle_pem().unwrap();

    // The workload's own token: TokenReview says who it is.
    let chain = ask(&ca, &bundle, &web_token, None).await.unwrap();
    assert!(chain.len() >= 2);

    // The agent on node-a: web (on node-a) yes, once the pod index has synced; db (node-b) no.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ask(
            &ca,
            &bundle,
            &agent_token,
            Some("spiffe://cluster.local/ns/shop/sa/web"),
        )
        .await
        {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(
                    e.code(),
                    Code::Unavailable,
                    "only 'not synced yet' may precede: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("agent never got web's certificate: {e:?}"),
        }
    }
    let err = ask(
        &ca,
        &bundle,
        &agent_token,
        Some("spiffe://cluster.local/ns/shop/sa/db"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(fake.token_review_calls() >= 2);
}

/// Runs `citadel root ARGS --data-dir DATA` with `KUBECONFIG` off the async runtime: the
/// fake API server lives on this test's runtime and must keep serving.
async fn root_on_kubernetes(
    data: &std::path::Path,
    kc: &str,
    args: &[&str],
) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(citadel_e2e::process::binary("citadel"));
    cmd.arg("root")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("KUBECONFIG", kc);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("citadel root finished within 60 s")
    .unwrap()
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_prepare_on_kubernetes_puts_the_key_in_the_secret_and_the_running_ca_signs_with_it() {
    let fake = FakeKube::start().await.unwrap();
    let web = fake
        .insert(PODS, pod("shop", "web-1", "web", "node-a", "Running"))
        .unwrap();
    let web_token = token_for(&fake, "shop", "web", &web);
    let tmp = tempfile::tempdir().unwrap();
    let kc = tmp.path().join("kubeconfig");
    std::fs::write(&kc, kubeconfig(&fake.url())).unwrap();
    let kc = kc.display().to_string();
    let data = tmp.path().join("data");
    let grpc = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ca = CaProcess::start_with_env(
        &data,
        grpc,
        http,
        &[
            "--kubernetes",
            "--bundle-poll-interval",
            "1s",
            "--no-root-renewal",
        ],
        &[("KUBECONFIG", &kc)],
    )
    .await
    .unwrap();
    let bundle = ca.bundle_pem().unwrap();
    let signer_before = ask(&ca, &bundle, &web_token, None).await.unwrap()[1].clone();
    let keys_in_secret = |fake: &FakeKube| {
        fake.get(SECRETS, "citadel-system", "citadel-ca-keys")
            .and_then(|s| {
                s.get("data").and_then(Value::as_object).map(|d| {
                    // Authority keys only: the ledger checkpoint key lives there too.
                    d.keys()
                        .filter(|k| k.as_str() != "ledger-checkpoint.key.pem")
                        .count()
                })
            })
            .unwrap_or(0)
    };
    assert_eq!(
        keys_in_secret(&fake),
        1,
        "the first root's key is in the Secret"
    );

    let (code, id, err) = root_on_kubernetes(&data, &kc, &["prepare", "--kubernetes"]).await;
    assert_eq!(code, 0, "root prepare --kubernetes failed: {err}");
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 32, "prepare prints the new ID: {id:?}");
    assert_eq!(keys_in_secret(&fake), 2, "the new key went to the Secret");
    assert!(
        !std::fs::read_dir(&data)
            .unwrap()
            .flatten()
            .any(|e| e.file_name() == "keys"
                && std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some())),
        "no key file in the data directory"
    );

    // No agent holds an older bundle: activation is allowed, and the running CA (which
    // reads keys only from the Secret) switches to the new authority.
    let (code, out, err) = root_on_kubernetes(&data, &kc, &["activate", &id]).await;
    assert_eq!(code, 0, "root activate failed: {out}{err}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let bundle = ca.bundle_pem().unwrap();
        if let Ok(chain) = ask(&ca, &bundle, &web_token, None).await
            && chain[1] != signer_before
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CA never signed with the root prepared on Kubernetes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The ledger says so too: the new authority is active and signed a live leaf.
    let (code, out, err) = root_on_kubernetes(&data, &kc, &["status", "--json"]).await;
    assert_eq!(code, 0, "root status failed: {err}");
    let status: Value = serde_json::from_str(out.trim()).unwrap();
    let new = status["authorities"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} not in {status:#}"));
    assert_eq!(new["state"], "active", "{status:#}");
    assert!(new["live_leaves"].as_u64() >= Some(1), "{status:#}");
}
