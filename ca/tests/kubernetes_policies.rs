//! On Kubernetes the CA's policies come from the `security.istio.io` custom resources
//! (through the fake API server): a change reaches a node agent's policy stream, and an
//! invalid object is left out while the others stay in force.

mod support;

use std::time::Duration;

use citadel_ca::k8s::{KubeConnection, KubernetesConfig};
use citadel_e2e::fake_kube::FakeKube;
use citadel_e2e::fake_kube::resources::{AUTHORIZATION_POLICIES, PEER_AUTHENTICATIONS};
use citadel_proto::citadel::v1::{PolicyAck, PolicySet};
use serde_json::json;
use support::{Harness, WEB};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn names(set: &PolicySet) -> Vec<(String, String, String)> {
    set.objects
        .iter()
        .map(|o| (o.kind.clone(), o.namespace.clone(), o.name.clone()))
        .collect()
}

#[tokio::test]
async fn a_crd_policy_change_reaches_the_policy_stream_and_an_invalid_object_is_left_out() {
    let fake = FakeKube::start().await.unwrap();
    fake.insert(
        AUTHORIZATION_POLICIES,
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "shop-allow", "namespace": "shop"},
               "spec": {"rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}}),
    )
    .unwrap();
    let k8s = KubernetesConfig::new(KubeConnection::Config(Box::new(fake.config())));
    let h = Harness::start_custom(
        |s| s,
        |c| {
            c.jwt = None;
            c.kubernetes = Some(k8s);
        },
    )
    .await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let (acks, rx) = mpsc::channel(8);
    acks.send(PolicyAck::default()).await.unwrap();
    let mut sets = h
        .policy_client(Some((&chain, &key)))
        .await
        .watch_policies(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), sets.message())
            .await
            .expect("a policy set within 10 s")
            .unwrap()
            .expect("the stream ended")
    };
    let first = next().await;
    assert_eq!(
        names(&first),
        [(
            "AuthorizationPolicy".into(),
            "shop".into(),
            "shop-allow".into()
        )]
    );

    // A new valid object and an invalid one (an unknown mTLS mode): the valid one arrives, the
    // invalid one never does, and shop-allow stays.
    fake.insert(
        PEER_AUTHENTICATIONS,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "bad", "namespace": "shop"},
               "spec": {"mtls": {"mode": "SOMETIMES"}}}),
    )
    .unwrap();
    fake.insert(
        PEER_AUTHENTICATIONS,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": "default", "namespace": "istio-system"},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    )
    .unwrap();
    let mut set = next().await;
    while set.objects.len() < 2 {
        set = next().await;
    }
    assert_eq!(
        names(&set),
        [
            (
                "AuthorizationPolicy".into(),
                "shop".into(),
                "shop-allow".into()
            ),
            (
                "PeerAuthentication".into(),
                "istio-system".into(),
                "default".into()
            ),
        ]
    );

    // The invalid object was counted.
    let http = h.ca.as_ref().unwrap().http_addr;
    let (_, metrics) = citadel_e2e::process::http_get(http, "/metrics")
        .await
        .unwrap();
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("citadel_policy_reload_errors_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "{metrics}");

    // A deletion reaches the stream too.
    fake.remove(AUTHORIZATION_POLICIES, "shop", "shop-allow")
        .unwrap();
    let mut set = next().await;
    while set.objects.len() != 1 {
        set = next().await;
    }
    assert_eq!(
        names(&set),
        [(
            "PeerAuthentication".into(),
            "istio-system".into(),
            "default".into()
        )]
    );
}
