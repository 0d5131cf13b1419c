//! Authority keys in the Kubernetes Secret `citadel-ca-keys` (through the fake API server):
//! two replicas sharing a store sign with one root whose key only the Secret holds, and
//! concurrent saves never lose or overwrite a key.

mod support;

use citadel_ca::k8s::secret_keystore::{SECRET_NAME, SecretKeyStore};
use citadel_ca::k8s::{KubeConnection, KubernetesConfig};
use citadel_ca::keystore::{KeyPem, KeyStore, KeyStoreError};
use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use citadel_e2e::fake_kube::resources::{PODS, SECRETS};
use citadel_e2e::fake_kube::{FakeKube, pod, service_account_token};
use citadel_e2e::unix_now;
use serde_json::Value;
use support::Harness;

#[tokio::test]
async fn two_replicas_share_one_root_whose_key_lives_in_the_secret() {
    let fake = FakeKube::start().await.unwrap();
    let shared = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", shared.path().join("citadel.db").display());
    let replica = |name: &str| {
        let k8s = KubernetesConfig::new(KubeConnection::Config(Box::new(fake.config())));
        let data_dir = shared.path().join(name);
        let url = url.clone();
        move |c: &mut citadel_ca::serve::ServeConfig| {
            c.jwt = None;
            c.kubernetes = Some(k8s);
            c.data_dir = data_dir;
            c.database_url = Some(url);
        }
    };
    let a = Harness::start_custom(|s| s, replica("a")).await;
    let secret = fake
        .get(SECRETS, "citadel-system", SECRET_NAME)
        .expect("the key Secret");
    // The root's key and the ledger checkpoint key.
    assert_eq!(
        secret["data"].as_object().map(|d| {
            let mut names: Vec<&str> = d.keys().map(String::as_str).collect();
            names.sort_by_key(|n| *n == citadel_ca::checkpoint::LEDGER_KEY_REF);
            (names.len(), names.last().copied())
        }),
        Some((2, Some(citadel_ca::checkpoint::LEDGER_KEY_REF))),
        "{secret}"
    );
    assert!(
        !shared.path().join("a/keys").exists()
            || std::fs::read_dir(shared.path().join("a/keys"))
                .unwrap()
                .next()
                .is_none(),
        "no key file in the data directory"
    );
    let b = Harness::start_custom(|s| s, replica("b")).await;
    assert_eq!(a.bundle_pem, b.bundle_pem, "one root");

    // Replica b signs with it: it loaded the key from the Secret.
    let web = fake
        .insert(PODS, pod("shop", "web-1", "web", "node-a", "Running"))
        .unwrap();
    let uid = web
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap();
    let t = service_account_token(
        "shop",
        "web",
        Some(("web-1", uid)),
        Some("node-a"),
        &["istio-ca"],
        unix_now() + 3600,
    );
    fake.register_token(&t.token, t.info.clone());
    let csr = p256_csr(&[]).unwrap();
    let mut client = connect(b.addr(), &b.bundle_pem, None).await.unwrap();
    let chain = create(&mut client, request(&csr.pem, 0, Some(&t.token), None))
        .await
        .unwrap()
        .cert_chain;
    assert!(chain.len() >= 2);
}

#[tokio::test]
async fn concurrent_saves_keep_every_key_and_a_key_is_never_overwritten() {
    let fake = FakeKube::start().await.unwrap();
    let keys = SecretKeyStore::new(fake.client().unwrap(), "citadel-system");
    let saves = (0..10).map(|i| {
        let keys = &keys;
        async move {
            keys.save(&format!("key-{i}"), &KeyPem::new(format!("PEM {i}")))
                .await
        }
    });
    for out in futures::future::join_all(saves).await {
        out.unwrap();
    }
    for i in 0..10 {
        assert_eq!(
            keys.load(&format!("key-{i}")).await.unwrap().expose(),
            format!("PEM {i}")
        );
    }
    let again = keys.save("key-3", &KeyPem::new("other".into())).await;
    assert!(matches!(again, Err(KeyStoreError::Exists(_))), "{again:?}");
    assert_eq!(keys.load("key-3").await.unwrap().expose(), "PEM 3");
    let missing = keys.load("nope").await;
    assert!(
        matches!(missing, Err(KeyStoreError::NotFound(_))),
        "{missing:?}"
    );
}
