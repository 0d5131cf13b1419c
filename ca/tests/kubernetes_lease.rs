//! Leader election with a `coordination.k8s.io/v1` Lease against the fake Kubernetes API
//! server: one replica leads; a replica that steps down or stops renewing is replaced; only
//! the leader publishes the trust-bundle ConfigMaps and runs the automatic root renewal.

mod support;

use std::sync::Arc;
use std::time::Duration;

use citadel_ca::authorities::{record_of, save_key};
use citadel_ca::authority::Authority;
use citadel_ca::k8s::lease::{KubeLease, LEASE_NAME};
use citadel_ca::k8s::{KubeConnection, KubernetesConfig};
use citadel_ca::keystore::MemoryKeyStore;
use citadel_ca::leadership::Leadership;
use citadel_ca::rotation::RenewalPolicy;
use citadel_ca::rotation_driver::RenewalDriver;
use citadel_e2e::fake_kube::resources::{CONFIGMAPS, LEASES, NAMESPACES};
use citadel_e2e::fake_kube::{FakeKube, namespace};
use citadel_e2e::unix_now;
use citadel_identity::TrustDomain;
use citadel_store::memory::MemoryStore;
use citadel_store::{AuthorityState, Store};
use serde_json::{Value, json};
use support::Harness;

const NS: &str = "citadel-system";

fn lease(fake: &FakeKube, holder: &str) -> KubeLease {
    KubeLease::new(fake.client().unwrap(), NS, holder.into(), 1)
}

fn lease_spec(fake: &FakeKube) -> Value {
    fake.get(LEASES, NS, LEASE_NAME).unwrap()["spec"].clone()
}

#[tokio::test]
async fn one_replica_leads_and_another_takes_over_when_it_steps_down() {
    let fake = FakeKube::start().await.unwrap();
    let (a, b) = (lease(&fake, "a"), lease(&fake, "b"));
    let now = unix_now();
    assert!(a.lead(now).await.unwrap());
    assert!(!b.lead(now).await.unwrap());
    assert!(a.lead(now).await.unwrap(), "the holder renews");
    assert_eq!(lease_spec(&fake)["holderIdentity"], "a");
    a.step_down().await;
    assert!(
        b.lead(now).await.unwrap(),
        "a released lease is taken at once"
    );
    let spec = lease_spec(&fake);
    assert_eq!(
        (
            spec["holderIdentity"].as_str(),
            spec["leaseTransitions"].as_i64()
        ),
        (Some("b"), Some(1))
    );
    assert!(!a.lead(now).await.unwrap());
}

#[tokio::test]
async fn a_holder_that_stops_renewing_loses_the_lease_after_its_duration() {
    let fake = FakeKube::start().await.unwrap();
    let (a, b) = (lease(&fake, "a"), lease(&fake, "b"));
    let t0 = unix_now();
    assert!(a.lead(t0).await.unwrap());
    assert!(!b.lead(t0).await.unwrap(), "b first sees a's record");
    // By b's own clock a has not renewed for the lease duration (1 s): b takes over.
    assert!(b.lead(t0 + 1).await.unwrap());
    // a comes back: it follows, and so stops the leader's jobs.
    assert!(!a.lead(t0 + 1).await.unwrap());
}

#[tokio::test]
async fn of_two_contenders_writing_at_once_exactly_one_leads() {
    let fake = FakeKube::start().await.unwrap();
    let contenders: Vec<KubeLease> = (0..5).map(|i| lease(&fake, &format!("r{i}"))).collect();
    let now = unix_now();
    let outcomes = futures::future::join_all(contenders.iter().map(|c| c.lead(now))).await;
    let leaders = outcomes
        .into_iter()
        .filter(|o| matches!(o, Ok(true)))
        .count();
    assert_eq!(leaders, 1);
}

async fn configmap_in(fake: &FakeKube, ns: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if fake.get(CONFIGMAPS, ns, "istio-ca-root-cert").is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn only_the_lease_holder_publishes_configmaps_and_a_new_leader_takes_over() {
    let fake = FakeKube::start().await.unwrap();
    fake.insert(NAMESPACES, namespace("shop")).unwrap();
    // Another replica holds the Lease and keeps renewing it.
    let renew = |fake: &FakeKube| {
        fake.insert(
            LEASES,
            json!({"metadata": {"name": LEASE_NAME, "namespace": NS},
                   "spec": {"holderIdentity": "other-replica", "leaseDurationSeconds": 1,
                            "renewTime": k8s_openapi::jiff::Timestamp::now().to_string()}}),
        )
        .unwrap();
    };
    renew(&fake);
    let mut k8s = KubernetesConfig::new(KubeConnection::Config(Box::new(fake.config())));
    k8s.lease_duration_secs = 1;
    k8s.configmap_resync = Duration::from_millis(200);
    let _h = Harness::start_custom(
        |s| s,
        |c| {
            c.jwt = None;
            c.kubernetes = Some(k8s);
        },
    )
    .await;
    for _ in 0..10 {
        renew(&fake);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        fake.get(CONFIGMAPS, "shop", "istio-ca-root-cert").is_none(),
        "a follower wrote a ConfigMap"
    );
    // The other replica stops renewing: this one takes over and publishes.
    assert!(
        configmap_in(&fake, "shop", Duration::from_secs(10)).await,
        "the new leader published"
    );
    assert_ne!(lease_spec(&fake)["holderIdentity"], "other-replica");
}

#[tokio::test]
async fn only_the_kubernetes_lease_holder_renews_a_due_root() {
    let fake = FakeKube::start().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let td = TrustDomain::new("cluster.local").unwrap();
    let keys = Arc::new(MemoryKeyStore::default());
    // A root that began long ago and ends soon: due.
    let now = unix_now();
    let (root, key) = Authority::create_root(&td, now - 1_000, 1_010).unwrap();
    let key_ref = save_key(keys.as_ref(), &root, &key).await.unwrap();
    store
        .insert_authority(&record_of(
            &root,
            AuthorityState::Active,
            &key_ref,
            now - 1_000,
        ))
        .await
        .unwrap();
    let driver = |holder: &str| RenewalDriver {
        store: store.clone(),
        keys: keys.clone(),
        trust_domain: td.clone(),
        policy: Some(RenewalPolicy::new(0.5).unwrap()),
        ca_dir: None,
        root_lifetime_secs: 3_600,
        stale_after_secs: 60,
        interval: Duration::from_secs(1),
        leadership: Arc::new(lease(&fake, holder)),
    };
    let (mut a, mut b) = (driver("a"), driver("b"));
    assert!(a.round().await.unwrap().is_some(), "the leader acts");
    assert_eq!(b.round().await.unwrap(), None, "b acted without the Lease");
    let prepared = store
        .list_authorities()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.state == AuthorityState::Prepared)
        .count();
    assert_eq!(prepared, 1, "exactly one new root");
}
