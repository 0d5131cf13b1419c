//! On Kubernetes, a trusted node agent authenticated by its service-account token (checked
//! with TokenReview against the fake API server) opens the trust-bundle stream, and its
//! acknowledgements count for the node its token names; a workload's token does not.

mod support;

use std::time::Duration;

use citadel_ca::k8s::{KubeConnection, KubernetesConfig};
use citadel_e2e::fake_kube::resources::PODS;
use citadel_e2e::fake_kube::{FakeKube, pod, service_account_token};
use citadel_e2e::unix_now;
use citadel_proto::citadel::v1::TrustBundleAck;
use serde_json::Value;
use support::Harness;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn token_for(fake: &FakeKube, ns: &str, sa: &str, p: &Value) -> String {
    let name = p.pointer("/metadata/name").and_then(Value::as_str).unwrap();
    let node = p.pointer("/spec/nodeName").and_then(Value::as_str).unwrap();
    let uid = p.pointer("/metadata/uid").and_then(Value::as_str).unwrap();
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

async fn open(
    h: &Harness,
    token: &str,
) -> Result<
    (
        mpsc::Sender<TrustBundleAck>,
        tonic::Streaming<citadel_proto::citadel::v1::TrustBundleUpdate>,
    ),
    tonic::Status,
> {
    let (acks, rx) = mpsc::channel(8);
    acks.send(TrustBundleAck {
        applied_sequence: 0,
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let updates = h
        .bundle_client(None)
        .await
        .watch_trust_bundle(req)
        .await?
        .into_inner();
    Ok((acks, updates))
}

#[tokio::test]
async fn a_kubernetes_node_agent_watches_the_bundle_and_its_acks_count_for_its_node() {
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
    let agent_token = token_for(&fake, "citadel-system", "citadel-agent", &agent);
    let web_token = token_for(&fake, "shop", "web", &web);
    let k8s = KubernetesConfig::new(KubeConnection::Config(Box::new(fake.config())));
    let h = Harness::start_custom(
        |s| s,
        |c| {
            c.jwt = None;
            c.kubernetes = Some(k8s);
        },
    )
    .await;

    let (acks, mut updates) = open(&h, &agent_token).await.unwrap();
    let update = tokio::time::timeout(Duration::from_secs(10), updates.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    acks.send(TrustBundleAck {
        applied_sequence: update.sequence,
    })
    .await
    .unwrap();
    let mut recorded = Vec::new();
    for _ in 0..200 {
        recorded = h.store.list_bundle_acks().await.unwrap();
        if !recorded.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(
        recorded[0].agent_id,
        "spiffe://cluster.local/citadel/node/node-a"
    );
    assert_eq!(recorded[0].sequence, update.sequence);

    let err = open(&h, &web_token).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}
