//! Authority keys sealed in the store under a key-encryption key (`--key-encryption-key-file`):
//! the sealed key store on both backends, what the database really holds, and two CA replicas
//! with different data directories signing with a root that either prepared.
//!
//! PostgreSQL: `CITADEL_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! a fresh schema per test. Under `CI` an unreachable server fails the test; elsewhere it skips
//! loudly.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use citadel_ca::authority::Authority;
use citadel_ca::keystore::{KeyStore, KeyStoreError};
use citadel_ca::root_cmd::{self, Outcome, PrepareArgs};
use citadel_ca::sealed_keystore::{Kek, SealedKeyStore, open_key_store};
use citadel_e2e::unix_now;
use citadel_identity::TrustDomain;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sqlx::Executor;
use support::{Harness, WEB};

/// A fresh schema on the test server: its URL, or `None` when there is no server (outside CI).
async fn postgres_schema() -> Option<String> {
    sqlx::any::install_default_drivers();
    let base = std::env::var("CITADEL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let admin = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&base)
        .await;
    let admin = match admin {
        Ok(pool) => pool,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("PostgreSQL not reachable at {base} (CI is set): {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: PostgreSQL not reachable at {base} ({e})");
            return None;
        }
    };
    let schema = format!(
        "citadel_sealed_{}_{}",
        std::process::id(),
        unix_now().rem_euclid(1_000_000) * 1000 + i64::from(rand_u16() % 1000)
    );
    admin
        .execute(format!("CREATE SCHEMA {schema}").as_str())
        .await
        .unwrap();
    admin.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

fn rand_u16() -> u16 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 2];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    u16::from_le_bytes(b)
}

/// A KEK file (0600) in `dir` holding `byte` × 32.
fn kek_file(dir: &Path, byte: u8) -> PathBuf {
    let path = dir.join(format!("kek-{byte}"));
    std::fs::write(&path, format!("{}\n", STANDARD.encode([byte; 32]))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("citadel.db").display())
}

async fn sealed(url: &str, byte: u8) -> SealedKeyStore {
    let blobs = citadel_store::connect_key_blobs(url).await.unwrap();
    SealedKeyStore::new(Kek::from_bytes(&[byte; 32]).unwrap(), blobs)
}

async fn raw_rows(url: &str) -> Vec<(String, String)> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    let rows = sqlx::query_as("SELECT key_ref, sealed FROM sealed_keys ORDER BY key_ref")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

async fn raw_sql(url: &str, sql: &str) {
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    pool.execute(sql).await.unwrap();
    pool.close().await;
}

/// The DER of a PKCS#8 PEM key.
fn der_of(pem: &str) -> Vec<u8> {
    pem::parse(pem).unwrap().into_contents()
}

// ---------------------------------------------------------------------------------------------
// One body per property, run on SQLite and PostgreSQL
// ---------------------------------------------------------------------------------------------

async fn never_plaintext(url: String) {
    let td = TrustDomain::new("cluster.local").unwrap();
    let (authority, key) = Authority::create_root(&td, unix_now(), 86_400).unwrap();
    let key_ref = format!("{}.key.pem", authority.id());
    let store = sealed(&url, 3).await;
    store.save(&key_ref, &key).await.unwrap();
    assert_eq!(
        store.load(&key_ref).await.unwrap().expose(),
        key.expose(),
        "the key round-trips"
    );

    let der = der_of(key.expose());
    let pem_body: String = key
        .expose()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let rows = raw_rows(&url).await;
    assert_eq!(rows.len(), 1);
    let (stored_ref, text) = &rows[0];
    assert_eq!(stored_ref, &key_ref);
    assert!(text.starts_with("citadel-sealed-key:v1:"), "{text}");
    assert!(!text.contains("PRIVATE KEY"));
    for line in key.expose().lines().filter(|l| l.len() > 16) {
        assert!(
            !text.contains(line),
            "a PEM line of the key is in the store"
        );
    }
    assert!(!text.contains(&pem_body[..32]));
    // Neither the DER nor any 16-byte window of it is in the decoded blob.
    let body = STANDARD.decode(text.rsplit(':').next().unwrap()).unwrap();
    for window in der.windows(16) {
        assert!(
            !body.windows(16).any(|w| w == window),
            "key bytes are in the stored blob"
        );
    }
    assert!(!body.windows(der.len()).any(|w| w == der.as_slice()));
}

async fn conformance(url: String) {
    let store = sealed(&url, 5).await;
    let key = citadel_ca::keystore::KeyPem::new("-----BEGIN PRIVATE KEY-----\nAA\n".into());
    assert!(matches!(
        store.load("a.key.pem").await,
        Err(KeyStoreError::NotFound(_))
    ));
    store.save("a.key.pem", &key).await.unwrap();
    assert!(matches!(
        store.save("a.key.pem", &key).await,
        Err(KeyStoreError::Exists(_))
    ));
    // Another process with the same KEK reads it; one with another KEK is told so.
    assert_eq!(
        sealed(&url, 5)
            .await
            .load("a.key.pem")
            .await
            .unwrap()
            .expose(),
        key.expose()
    );
    let err = sealed(&url, 6).await.load("a.key.pem").await.unwrap_err();
    assert!(err.to_string().contains("same KEK"), "{err}");
    // A blob copied under another reference behind the store's back does not open.
    raw_sql(
        &url,
        "INSERT INTO sealed_keys (key_ref, sealed, created_at) \
         SELECT 'b.key.pem', sealed, created_at FROM sealed_keys WHERE key_ref = 'a.key.pem'",
    )
    .await;
    let err = store.load("b.key.pem").await.unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    // So does an edited one.
    let (_, text) = raw_rows(&url).await.remove(0);
    let (head, body) = text.rsplit_once(':').unwrap();
    let mut raw = STANDARD.decode(body).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 0x80;
    raw_sql(
        &url,
        &format!(
            "UPDATE sealed_keys SET sealed = '{head}:{}' WHERE key_ref = 'a.key.pem'",
            STANDARD.encode(&raw)
        ),
    )
    .await;
    let err = store.load("a.key.pem").await.unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
}

async fn on_sqlite<F: std::future::Future<Output = ()>>(body: impl FnOnce(String) -> F) {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    drop(citadel_store::connect(&url).await.unwrap());
    body(url).await;
}

async fn on_postgres<F: std::future::Future<Output = ()>>(body: impl FnOnce(String) -> F) {
    if let Some(url) = postgres_schema().await {
        body(url).await;
    }
}

#[tokio::test]
async fn wrapped_keys_never_contain_plaintext_in_the_store() {
    on_sqlite(never_plaintext).await;
    on_postgres(never_plaintext).await;
}

#[tokio::test]
async fn sealed_key_store_conformance_on_sqlite() {
    on_sqlite(conformance).await;
}

#[tokio::test]
async fn sealed_key_store_conformance_on_postgresql() {
    on_postgres(conformance).await;
}

#[tokio::test]
async fn without_a_kek_keys_stay_files_in_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let keys = open_key_store(dir.path(), &url, None, true).await.unwrap();
    keys.save("k.key.pem", &citadel_ca::keystore::KeyPem::new("x".into()))
        .await
        .unwrap();
    assert!(dir.path().join("keys").join("k.key.pem").is_file());
    assert!(
        !dir.path().join("citadel.db").exists(),
        "the file key store does not open the database"
    );
}

// ---------------------------------------------------------------------------------------------
// Replicas
// ---------------------------------------------------------------------------------------------

fn last_cert(chain_pem: &str) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .filter_map(Result::ok)
        .last()
}

/// Waits until `h` publishes a bundle of `roots` roots, and takes it as the client's trust.
async fn await_bundle(h: &mut Harness, roots: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(h.data_dir.join("bundle.pem")).unwrap_or_default();
        if text.matches("BEGIN CERTIFICATE").count() == roots {
            h.bundle_pem = text;
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the prepared root was not published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until both replicas sign under a root other than `old_root`; returns it.
async fn await_switch(
    a: &Harness,
    b: &Harness,
    old_root: &CertificateDer<'static>,
    n: &mut u32,
) -> CertificateDer<'static> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "replicas did not switch in 10 s");
        let mut roots = Vec::new();
        for h in [a, b] {
            *n += 1;
            let (chain, _) = h.join(&format!("node-x{n}"), &[WEB]).await;
            roots.push(last_cert(&chain).unwrap());
        }
        if roots.iter().all(|r| r != old_root) {
            assert_eq!(roots[0], roots[1], "both replicas sign with one root");
            return roots.remove(0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn key_files(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("keys"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_different_data_dirs_and_one_kek_sign_with_a_root_either_prepared() {
    let Some(url) = postgres_schema().await else {
        return;
    };
    let secrets = tempfile::tempdir().unwrap();
    let kek = kek_file(secrets.path(), 9);
    let start = |kek: PathBuf, url: String| async move {
        Harness::start_custom(
            |s| s,
            move |c| {
                c.database_url = Some(url);
                c.key_encryption_key_file = Some(kek);
            },
        )
        .await
    };
    // Each harness has its own temporary data directory.
    let mut a = start(kek.clone(), url.clone()).await;
    let mut b = start(kek.clone(), url.clone()).await;
    assert_ne!(a.data_dir, b.data_dir);
    let (chain, _) = a.join("node-a", &[WEB]).await;
    let first_root = last_cert(&chain).unwrap();
    let (chain, _) = b.join("node-b", &[WEB]).await;
    assert_eq!(
        last_cert(&chain).unwrap(),
        first_root,
        "B signs with the root A created, its key read from the store"
    );
    let td = a.trust_domain();
    let prepare = |data_dir: PathBuf| {
        let (url, kek, td) = (url.clone(), kek.clone(), td.clone());
        async move {
            // What `citadel root prepare --key-encryption-key-file` does on that host.
            let keys: Arc<dyn KeyStore> = open_key_store(&data_dir, &url, Some(&kek), false)
                .await
                .unwrap();
            let store = citadel_store::connect(&url).await.unwrap();
            root_cmd::prepare(
                store.as_ref(),
                keys.as_ref(),
                &PrepareArgs {
                    trust_domain: &td,
                    ca_dir: None,
                    root_lifetime_secs: 86_400 * 365,
                },
                unix_now(),
            )
            .await
            .unwrap()
        }
    };
    let activate = |id: String| {
        let url = url.clone();
        async move {
            let store = citadel_store::connect(&url).await.unwrap();
            let mut out = Vec::new();
            let outcome = root_cmd::activate(store.as_ref(), &id, false, 60, false, &mut out)
                .await
                .unwrap();
            assert_eq!(outcome, Outcome::Done, "{}", String::from_utf8_lossy(&out));
        }
    };
    let mut n = 0;

    // B prepares, both switch to it.
    let from_b = prepare(b.data_dir.clone()).await;
    await_bundle(&mut a, 2).await;
    await_bundle(&mut b, 2).await;
    activate(from_b).await;
    let second_root = await_switch(&a, &b, &first_root, &mut n).await;

    // A prepares, both switch to it.
    let from_a = prepare(a.data_dir.clone()).await;
    await_bundle(&mut a, 3).await;
    await_bundle(&mut b, 3).await;
    activate(from_a).await;
    await_switch(&a, &b, &second_root, &mut n).await;

    // No key ever touched either data directory; the store holds three sealed authority keys
    // and the one ledger checkpoint key both replicas share.
    assert_eq!(key_files(&a.data_dir), Vec::<String>::new());
    assert_eq!(key_files(&b.data_dir), Vec::<String>::new());
    let refs: Vec<String> = raw_rows(&url).await.into_iter().map(|(r, _)| r).collect();
    assert_eq!(refs.len(), 4, "{refs:?}");
    assert!(
        refs.iter()
            .any(|r| r == citadel_ca::checkpoint::LEDGER_KEY_REF),
        "{refs:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_replica_with_another_kek_cannot_load_the_active_authority_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let store = citadel_store::connect(&url).await.unwrap();
    let td = TrustDomain::new("cluster.local").unwrap();
    let loader = |byte: u8| {
        let url = url.clone();
        async move {
            citadel_ca::authorities::AuthorityLoader {
                keys: Arc::new(sealed(&url, byte).await),
                ca_dir: None,
            }
        }
    };
    // The path `citadel serve` takes at start-up.
    let first = citadel_ca::authorities::load_or_create(
        store.as_ref(),
        &loader(1).await,
        &td,
        86_400 * 365,
        unix_now(),
    )
    .await
    .unwrap();
    let err = citadel_ca::authorities::load_or_create(
        store.as_ref(),
        &loader(2).await,
        &td,
        86_400 * 365,
        unix_now(),
    )
    .await
    .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains(first.id()) && err.contains("same KEK"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The CLI flag
// ---------------------------------------------------------------------------------------------

fn citadel(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_citadel"))
        .args(args)
        .env_remove("CITADEL_TRUST_DOMAIN")
        .env_remove("CITADEL_DATABASE_URL")
        .env_remove("CITADEL_DATA_DIR")
        .env_remove("CITADEL_KEY_ENCRYPTION_KEY_FILE")
        .output()
        .expect("run citadel")
}

#[tokio::test]
async fn root_prepare_with_a_kek_file_seals_the_key_and_refuses_a_loose_kek_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    drop(citadel_store::connect(&url).await.unwrap());
    let kek = kek_file(dir.path(), 4);
    let data_dir = dir.path().to_str().unwrap();

    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = citadel(&[
        "root",
        "prepare",
        "--data-dir",
        data_dir,
        "--key-encryption-key-file",
        kek.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--key-encryption-key-file") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    assert!(raw_rows(&url).await.is_empty(), "nothing was stored");

    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = citadel(&[
        "root",
        "prepare",
        "--data-dir",
        data_dir,
        "--key-encryption-key-file",
        kek.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let rows = raw_rows(&url).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, format!("{id}.key.pem"));
    assert_eq!(key_files(dir.path()), Vec::<String>::new(), "no key file");
    // The CA's key store with the same KEK loads it.
    sealed(&url, 4).await.load(&rows[0].0).await.unwrap();
}
