//! The policy stream of the in-process CA: node agents get the set from `--policies DIR` and
//! every change, their acknowledgements are recorded, and nobody else may open the stream.

mod support;

use std::time::Duration;

use citadel_ca::policy_set::PolicySnapshot;
use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use citadel_proto::citadel::v1::{PolicyAck, PolicySet};
use support::{Harness, WEB};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

const NODE_A: &str = "spiffe://cluster.local/citadel/node/node-a";

const SHOP: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shop-allow, namespace: shop}
spec: {rules: [{from: [{source: {namespaces: [shop]}}]}]}
";

const MESH: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

/// A CA serving the policies of a fresh directory holding `files`.
async fn start_with_policies(files: &[(&str, &str)]) -> (Harness, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().to_owned();
    let h = Harness::start_custom(|s| s, move |c| c.policies_dir = Some(path)).await;
    (h, dir)
}

struct PolicyStream {
    acks: mpsc::Sender<PolicyAck>,
    sets: Streaming<PolicySet>,
}

impl PolicyStream {
    async fn open(h: &Harness, identity: (&str, &str)) -> Self {
        let (acks, rx) = mpsc::channel(8);
        acks.send(PolicyAck::default()).await.unwrap();
        let sets = h
            .policy_client(Some(identity))
            .await
            .watch_policies(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        PolicyStream { acks, sets }
    }

    async fn next(&mut self) -> PolicySet {
        tokio::time::timeout(Duration::from_secs(10), self.sets.message())
            .await
            .expect("no policy set within 10 s")
            .unwrap()
            .expect("the stream ended")
    }

    async fn ack(&self, version: &str) {
        self.acks
            .send(PolicyAck {
                applied_version: version.into(),
            })
            .await
            .unwrap();
    }
}

async fn wait_for_policy_ack(h: &Harness, agent: &str, version: &str) {
    for _ in 0..200 {
        let acks = h.store.list_policy_acks().await.unwrap();
        if acks
            .iter()
            .any(|a| a.agent_id == agent && a.version == version)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("acknowledgement of {version} by {agent} not recorded within 10 s");
}

#[tokio::test]
async fn node_agent_gets_the_policy_set_and_every_change_and_its_ack_is_recorded() {
    let (h, dir) = start_with_policies(&[("shop.yaml", SHOP), ("mesh.yaml", MESH)]).await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let mut stream = PolicyStream::open(&h, (&chain, &key)).await;
    let first = stream.next().await;
    let kinds: Vec<_> = first
        .objects
        .iter()
        .map(|o| (o.kind.as_str(), o.namespace.as_str(), o.name.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("AuthorizationPolicy", "shop", "shop-allow"),
            ("PeerAuthentication", "istio-system", "default"),
        ]
    );
    assert_eq!(first.objects[0].api_version, "security.istio.io/v1");
    let json: serde_json::Value = serde_json::from_str(&first.objects[0].json).unwrap();
    assert_eq!(
        json["spec"]["rules"][0]["from"][0]["source"]["namespaces"][0],
        "shop"
    );
    assert_eq!(
        first.version,
        PolicySnapshot::new(first.objects.clone()).version
    );

    // A version never sent is ignored; the real one is recorded.
    stream.ack(&"f".repeat(64)).await;
    stream.ack(&first.version).await;
    wait_for_policy_ack(&h, NODE_A, &first.version).await;
    assert_eq!(h.store.list_policy_acks().await.unwrap().len(), 1);

    // An edit reaches the open stream.
    std::fs::write(
        dir.path().join("shop.yaml"),
        SHOP.replace("[shop]", "[shop, bank]"),
    )
    .unwrap();
    let pushed = stream.next().await;
    assert_ne!(pushed.version, first.version);
    assert!(pushed.objects[0].json.contains("bank"));

    // An invalid file keeps the last good set: nothing is pushed and the metric counts it.
    std::fs::write(dir.path().join("bad.yaml"), SHOP.replace("rules", "rulez")).unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(600), stream.sets.message()).await;
    assert!(
        quiet.is_err(),
        "a set was pushed after an invalid edit: {quiet:?}"
    );
    let http = h.ca.as_ref().unwrap().http_addr;
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("citadel_policy_reload_errors_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("citadel_policy_objects 2"), "{metrics}");
    h.stop().await;
}

#[tokio::test]
async fn without_policies_the_ca_serves_the_empty_set() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let mut stream = PolicyStream::open(&h, (&chain, &key)).await;
    let set = stream.next().await;
    assert!(set.objects.is_empty());
    assert_eq!(set.version, PolicySnapshot::empty().version);
    h.stop().await;
}

#[tokio::test]
async fn workload_certificate_caller_is_refused_on_watch_policies() {
    let (h, _dir) = start_with_policies(&[("shop.yaml", SHOP)]).await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let mut node = connect(h.addr(), &h.bundle_pem, Some((&chain, &key)))
        .await
        .unwrap();
    let web = p256_csr(&[]).unwrap();
    let resp = create(&mut node, request(&web.pem, 0, None, Some(WEB)))
        .await
        .unwrap();
    let web_chain = resp.cert_chain.concat();
    let web_key = web.key.serialize_pem();
    let (acks, rx) = mpsc::channel(1);
    acks.send(PolicyAck::default()).await.unwrap();
    let err = h
        .policy_client(Some((&web_chain, &web_key)))
        .await
        .watch_policies(ReceiverStream::new(rx))
        .await
        .expect_err("a workload must not watch the policy set");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(h.store.list_policy_acks().await.unwrap().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn join_token_caller_is_refused_on_watch_policies() {
    let (h, _dir) = start_with_policies(&[("shop.yaml", SHOP)]).await;
    let token = h.join_token("node-a", &[WEB]).await;
    let (acks, rx) = mpsc::channel(1);
    acks.send(PolicyAck::default()).await.unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let err = h
        .policy_client(None)
        .await
        .watch_policies(req)
        .await
        .expect_err("a join token must not open the policy stream");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(h.store.list_policy_acks().await.unwrap().is_empty());
    // Anonymous callers are refused too.
    let (_acks, rx) = mpsc::channel::<PolicyAck>(1);
    let err = h
        .policy_client(None)
        .await
        .watch_policies(ReceiverStream::new(rx))
        .await
        .expect_err("an anonymous caller must not open the policy stream");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    h.stop().await;
}
