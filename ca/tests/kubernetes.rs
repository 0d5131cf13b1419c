//! `citadel serve --kubernetes` in process, against the fake Kubernetes API
//! server through the real `kube` client: TokenReview authentication and node
//! authorization from the pod index, over the real CSR gRPC API.

mod support;

use std::time::Duration;

use citadel_ca::k8s::{KubeConnection, KubernetesConfig};
use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use citadel_e2e::fake_kube::resources::{CONFIGMAPS, NAMESPACES, PODS};
use citadel_e2e::fake_kube::{Availability, FakeKube, namespace, pod, service_account_token};
use citadel_e2e::unix_now;
use serde_json::Value;
use support::{Harness, WEB};
use tonic::Code;
use x509_parser::prelude::*;

const AGENT_NS: &str = "citadel-system";
const AGENT_SA: &str = "citadel-agent";

async fn harness(fake: &FakeKube) -> Harness {
    let mut k8s = KubernetesConfig::new(KubeConnection::Config(Box::new(fake.config())));
    k8s.token_review_timeout = Duration::from_secs(1);
    k8s.configmap_resync = Duration::from_millis(300);
    Harness::start_custom(
        |s| s,
        |c| {
            // TokenReview only: no local JWKS.
            c.jwt = None;
            c.kubernetes = Some(k8s);
        },
    )
    .await
}

fn uid_of(obj: &Value) -> String {
    obj.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap()
        .to_owned()
}

/// Registers a pod-bound token of `ns/sa` for pod `pod_obj` and returns it.
fn token_for(fake: &FakeKube, ns: &str, sa: &str, pod_obj: &Value, aud: &[&str]) -> String {
    let name = pod_obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap();
    let node = pod_obj
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap();
    let uid = uid_of(pod_obj);
    let t = service_account_token(
        ns,
        sa,
        Some((name, &uid)),
        Some(node),
        aud,
        unix_now() + 3600,
    );
    fake.register_token(&t.token, t.info.clone());
    t.token
}

fn spiffe_id_of(chain: &[String]) -> String {
    let pem = ::pem::parse(chain[0].as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(pem.contents()).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .unwrap()
}

async fn ask(
    h: &Harness,
    token: &str,
    impersonate: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let csr = p256_csr(&[]).unwrap();
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    create(&mut client, request(&csr.pem, 0, Some(token), impersonate))
        .await
        .map(|r| r.cert_chain)
}

#[tokio::test]
async fn a_workload_pods_token_accepted_by_token_review_yields_its_certificate() {
    let fake = FakeKube::start().await.unwrap();
    let web = fake
        .insert(PODS, pod("shop", "web-1", "web", "node-a", "Running"))
        .unwrap();
    let token = token_for(&fake, "shop", "web", &web, &["istio-ca"]);
    let h = harness(&fake).await;
    let chain = ask(&h, &token, None).await.unwrap();
    assert_eq!(spiffe_id_of(&chain), WEB);
    assert_eq!(fake.token_review_calls(), 1);
    let review = fake
        .requests()
        .into_iter()
        .find(|r| r.starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews"));
    assert!(review.is_some(), "{:?}", fake.requests());
}

#[tokio::test]
async fn a_token_the_api_server_does_not_authenticate_is_unauthenticated() {
    let fake = FakeKube::start().await.unwrap();
    let h = harness(&fake).await;
    let msg = h
        .refuse_token("eyJhbGciOiJSUzI1NiJ9.e30.bm90LXZhbGlk")
        .await;
    assert!(msg.contains("did not authenticate"), "{msg}");
}

#[tokio::test]
async fn a_token_for_another_audience_is_unauthenticated() {
    let fake = FakeKube::start().await.unwrap();
    let web = fake
        .insert(PODS, pod("shop", "web-1", "web", "node-a", "Running"))
        .unwrap();
    let token = token_for(
        &fake,
        "shop",
        "web",
        &web,
        &["https://kubernetes.default.svc"],
    );
    let h = harness(&fake).await;
    let msg = h.refuse_token(&token).await;
    assert!(msg.contains("audiences"), "{msg}");
}

#[tokio::test]
async fn an_api_server_that_ignores_the_requested_audiences_is_not_trusted() {
    let fake = FakeKube::start().await.unwrap();
    fake.ignore_requested_audiences(true);
    let web = fake
        .insert(PODS, pod("shop", "web-1", "web", "node-a", "Running"))
        .unwrap();
    let token = token_for(
        &fake,
        "shop",
        "web",
        &web,
        &["istio-ca", "https://kubernetes.default.svc.cluster.local"],
    );
    let h = harness(&fake).await;
    let msg = h.refuse_token(&token).await;
    assert!(msg.contains("none of [istio-ca]"), "{msg}");
}

#[tokio::test]
async fn an_api_server_that_is_down_makes_requests_unavailable_not_unauthenticated() {
    let fake = FakeKube::start().await.unwrap();
    let web = fake
        .insert(PODS, pod("shop", "web-1", "web", "node-a", "Running"))
        .unwrap();
    let token = token_for(&fake, "shop", "web", &web, &["istio-ca"]);
    let h = harness(&fake).await;
    for mode in [Availability::Unavailable, Availability::Refusing] {
        fake.set_availability(mode);
        let csr = p256_csr(&[]).unwrap();
        let msg = h
            .expect_refusal(request(&csr.pem, 0, Some(&token), None), Code::Unavailable)
            .await;
        assert!(msg.contains("TokenReview"), "{mode:?}: {msg}");
    }
    // Unavailability is not cached: once the server is back, the same token works.
    fake.set_availability(Availability::Up);
    let chain = ask(&h, &token, None).await.unwrap();
    assert_eq!(spiffe_id_of(&chain), WEB);
}

/// A cluster: a node agent on node-a, web on node-a, db on node-b.
struct Cluster {
    fake: FakeKube,
    agent_token: String,
}

async fn cluster() -> Cluster {
    let fake = FakeKube::start().await.unwrap();
    let agent = fake
        .insert(
            PODS,
            pod(AGENT_NS, "citadel-agent-a", AGENT_SA, "node-a", "Running"),
        )
        .unwrap();
    fake.insert(
        PODS,
        pod(AGENT_NS, "citadel-agent-b", AGENT_SA, "node-b", "Running"),
    )
    .unwrap();
    fake.insert(PODS, pod("shop", "web-1", "web", "node-a", "Running"))
        .unwrap();
    fake.insert(PODS, pod("shop", "db-1", "db", "node-b", "Running"))
        .unwrap();
    let agent_token = token_for(&fake, AGENT_NS, AGENT_SA, &agent, &["istio-ca"]);
    Cluster { fake, agent_token }
}

/// Polls until `ask` gives the expected outcome (the pod index follows a watch).
async fn eventually(
    h: &Harness,
    token: &str,
    target: &str,
    allowed: bool,
) -> Result<Vec<String>, tonic::Status> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = ask(h, token, Some(target)).await;
        let done = match &out {
            Ok(_) => allowed,
            Err(s) => !allowed && s.code() == Code::PermissionDenied,
        };
        if done || tokio::time::Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_node_agent_gets_certificates_only_for_pods_on_its_own_node() {
    let c = cluster().await;
    let h = harness(&c.fake).await;
    let chain = eventually(&h, &c.agent_token, WEB, true).await.unwrap();
    assert_eq!(spiffe_id_of(&chain), WEB);
    let err = ask(
        &h,
        &c.agent_token,
        Some("spiffe://cluster.local/ns/shop/sa/db"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("no running pod of service account shop/db is on node node-a"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn impersonation_stops_when_the_workloads_pod_is_deleted() {
    let c = cluster().await;
    let h = harness(&c.fake).await;
    eventually(&h, &c.agent_token, WEB, true).await.unwrap();
    c.fake.remove(PODS, "shop", "web-1").unwrap();
    let err = eventually(&h, &c.agent_token, WEB, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn a_workload_that_is_not_a_trusted_agent_may_not_impersonate() {
    let c = cluster().await;
    let web = c.fake.get(PODS, "shop", "web-1").unwrap();
    let web_token = token_for(&c.fake, "shop", "web", &web, &["istio-ca"]);
    let h = harness(&c.fake).await;
    eventually(&h, &c.agent_token, WEB, true).await.unwrap();
    let err = ask(&h, &web_token, Some("spiffe://cluster.local/ns/shop/sa/db"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("not a trusted node agent"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn an_agent_token_whose_pod_is_gone_may_not_impersonate() {
    let c = cluster().await;
    let h = harness(&c.fake).await;
    eventually(&h, &c.agent_token, WEB, true).await.unwrap();
    c.fake.remove(PODS, AGENT_NS, "citadel-agent-a").unwrap();
    let err = eventually(&h, &c.agent_token, WEB, false)
        .await
        .unwrap_err();
    assert!(
        err.message().contains("is not a running pod"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn the_pod_index_resumes_after_410_gone_and_learns_what_changed_meanwhile() {
    let c = cluster().await;
    let h = harness(&c.fake).await;
    eventually(&h, &c.agent_token, WEB, true).await.unwrap();
    // The watch breaks and its resourceVersion is too old when it comes back; meanwhile web
    // left node-a and api arrived. Only a re-list can tell the index.
    c.fake.expire_next_watch(PODS);
    c.fake.compact();
    c.fake.disconnect_watches();
    c.fake.remove(PODS, "shop", "web-1").unwrap();
    c.fake
        .insert(PODS, pod("shop", "api-1", "api", "node-a", "Running"))
        .unwrap();
    c.fake.compact();
    let api = "spiffe://cluster.local/ns/shop/sa/api";
    let chain = eventually(&h, &c.agent_token, api, true).await.unwrap();
    assert_eq!(spiffe_id_of(&chain), api);
    eventually(&h, &c.agent_token, WEB, false)
        .await
        .unwrap_err();
    let lists = c
        .fake
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
        .count();
    assert!(lists >= 2, "the index re-listed: {:?}", c.fake.requests());
}

#[tokio::test]
async fn a_burst_of_1000_requests_with_50_distinct_tokens_costs_50_reviews() {
    use citadel_ca::auth::token_review::{TokenReviewAuthenticator, TokenReviewConfig};
    use citadel_ca::auth::{Authenticator, Credentials};
    let fake = FakeKube::start().await.unwrap();
    // Reviews take a while, so that many requests for one token are in flight together.
    fake.set_token_review_delay(Duration::from_millis(200));
    let tokens: Vec<String> = (0..50)
        .map(|i| {
            let p = fake
                .insert(
                    PODS,
                    pod("shop", &format!("web-{i}"), "web", "node-a", "Running"),
                )
                .unwrap();
            token_for(&fake, "shop", "web", &p, &["istio-ca"])
        })
        .collect();
    let td = citadel_identity::TrustDomain::new("cluster.local").unwrap();
    let auth = TokenReviewAuthenticator::new(
        fake.client().unwrap(),
        TokenReviewConfig::new(vec!["istio-ca".into()], td),
    );
    let now = unix_now();
    let started = std::time::Instant::now();
    let burst = (0..1000).map(|i| {
        let auth = &auth;
        let token = tokens[i % tokens.len()].as_str();
        async move {
            auth.authenticate(&Credentials {
                bearer_token: Some(token),
                peer_chain: None,
                now,
            })
            .await
        }
    });
    let outcomes = futures::future::join_all(burst).await;
    let elapsed = started.elapsed();
    assert!(
        outcomes.iter().all(|o| matches!(o, Ok(Some(_)))),
        "{:?}",
        outcomes.iter().find(|o| !matches!(o, Ok(Some(_))))
    );
    assert_eq!(fake.token_review_calls(), 50);
    assert_eq!(auth.cached(), 50);
    println!(
        "1000 authentications, 50 tokens: {} reviews in {elapsed:?}",
        fake.token_review_calls()
    );
    // Later requests are served from the cache.
    for t in &tokens {
        auth.authenticate(&Credentials {
            bearer_token: Some(t),
            peer_chain: None,
            now,
        })
        .await
        .unwrap();
    }
    assert_eq!(fake.token_review_calls(), 50);
}

/// The `root-cert.pem` of namespace `ns`'s root ConfigMap, once it satisfies `ok`.
async fn root_configmap(fake: &FakeKube, ns: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pem = fake
            .get(CONFIGMAPS, ns, "istio-ca-root-cert")
            .and_then(|cm| {
                cm.pointer("/data/root-cert.pem")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        if let Some(pem) = pem.filter(|p| ok(p)) {
            return pem;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ConfigMap in {ns} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_trust_bundle_configmap_appears_in_every_namespace_and_follows_the_bundle() {
    use citadel_ca::k8s::secret_keystore::SecretKeyStore;
    use citadel_ca::root_cmd::{self, PrepareArgs};
    let fake = FakeKube::start().await.unwrap();
    for ns in ["shop", "kube-public"] {
        fake.insert(NAMESPACES, namespace(ns)).unwrap();
    }
    let h = harness(&fake).await;
    let pem = root_configmap(&fake, "shop", |_| true).await;
    assert_eq!(pem, h.bundle_pem);
    let cm = fake.get(CONFIGMAPS, "shop", "istio-ca-root-cert").unwrap();
    assert_eq!(
        cm.pointer("/metadata/labels/istio.io~1config")
            .and_then(Value::as_str),
        Some("true")
    );

    // A namespace created later gets it too.
    fake.insert(NAMESPACES, namespace("late")).unwrap();
    root_configmap(&fake, "late", |p| p == h.bundle_pem).await;

    // A deleted ConfigMap comes back at the next resync.
    fake.remove(CONFIGMAPS, "shop", "istio-ca-root-cert")
        .unwrap();
    root_configmap(&fake, "shop", |p| p == h.bundle_pem).await;

    // A new root in the bundle reaches every namespace.
    // On Kubernetes the CA's keys live in the Secret: the new root's key goes there too.
    let keys = SecretKeyStore::new(fake.client().unwrap(), "citadel-system");
    let td = h.trust_domain();
    root_cmd::prepare(
        h.store.as_ref(),
        &keys,
        &PrepareArgs {
            trust_domain: &td,
            ca_dir: None,
            root_lifetime_secs: 86_400 * 365,
        },
        unix_now(),
    )
    .await
    .unwrap();
    for ns in ["shop", "late"] {
        let two = root_configmap(&fake, ns, |p| p.matches("BEGIN CERTIFICATE").count() == 2).await;
        assert!(
            two.contains(h.bundle_pem.trim()),
            "the old root stays beside the new one"
        );
    }
    assert!(
        fake.get(CONFIGMAPS, "kube-public", "istio-ca-root-cert")
            .is_none()
    );
}
