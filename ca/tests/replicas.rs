//! Two CA replicas on one PostgreSQL database (and one key directory) switch to a root
//! activated from the CLI's code paths together, within their poll interval, without a
//! restart. Under `CI` an unreachable PostgreSQL fails the test; elsewhere it skips loudly.

mod support;

use std::time::{Duration, Instant};

use citadel_ca::keystore::FileKeyStore;
use citadel_ca::root_cmd::{self, Outcome, PrepareArgs};
use citadel_e2e::unix_now;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sqlx::Executor;
use support::{Harness, WEB};

fn last_cert(chain_pem: &str) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .filter_map(Result::ok)
        .last()
}

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
        "citadel_replicas_{}",
        unix_now() ^ i64::from(std::process::id())
    );
    admin
        .execute(format!("CREATE SCHEMA {schema}").as_str())
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgresql_switch_to_an_activated_root_together() {
    let Some(url) = postgres_schema().await else {
        return;
    };
    let shared = tempfile::tempdir().unwrap();
    let data_dir = shared.path().join("data");
    let configure = |c: &mut citadel_ca::serve::ServeConfig| {
        c.database_url = Some(url.clone());
        c.data_dir = data_dir.clone();
    };
    let mut a = Harness::start_custom(|s| s, configure).await;
    let mut b = Harness::start_custom(|s| s, configure).await;
    let (chain, _) = a.join("node-a", &[WEB]).await;
    let old_root = last_cert(&chain).unwrap();
    let (chain, _) = b.join("node-b", &[WEB]).await;
    assert_eq!(
        last_cert(&chain).unwrap(),
        old_root,
        "both replicas share one root"
    );

    let keys = FileKeyStore::open(data_dir.join("keys")).unwrap();
    let td = a.trust_domain();
    let new_id = root_cmd::prepare(
        a.store.as_ref(),
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
    // Both replicas publish the new root (they write the same bundle.pem).
    let deadline = Instant::now() + Duration::from_secs(10);
    let bundle = loop {
        let text = std::fs::read_to_string(data_dir.join("bundle.pem")).unwrap_or_default();
        if text.matches("BEGIN CERTIFICATE").count() == 2 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the prepared root was not published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    a.bundle_pem = bundle.clone();
    b.bundle_pem = bundle;
    let mut out = Vec::new();
    let outcome = root_cmd::activate(b.store.as_ref(), &new_id, false, 60, false, &mut out)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Done, "{}", String::from_utf8_lossy(&out));

    // Within a few poll intervals both sign with the new root.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    let mut switched = [false, false];
    while switched != [true, true] {
        assert!(
            Instant::now() < deadline,
            "replicas switched: {switched:?} after 10 s"
        );
        for (i, h) in [&a, &b].into_iter().enumerate() {
            n += 1;
            let (chain, _) = h.join(&format!("node-x{n}"), &[WEB]).await;
            switched[i] = last_cert(&chain).unwrap() != old_root;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
    b.stop().await;
}
