//! The running CA follows the store: a root prepared and activated from the CLI's code
//! paths (on the store, no restart, no admin RPC) reaches the bundle the CA streams and
//! writes, its signer and its own serving certificate within the poll interval.

mod support;

use std::time::{Duration, Instant};

use citadel_ca::keystore::FileKeyStore;
use citadel_ca::root_cmd::{self, Outcome, PrepareArgs};
use citadel_e2e::client::{connect, create, request};
use citadel_e2e::unix_now;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use support::{Harness, WEB};

/// The last certificate of a PEM chain (the root).
fn last_cert(chain_pem: &str) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .filter_map(Result::ok)
        .last()
}

fn pem_count(text: &str) -> usize {
    text.matches("BEGIN CERTIFICATE").count()
}

async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_running_ca_switches_signer_serving_certificate_and_bundle_on_activation() {
    let mut h = Harness::start().await;
    let (first, _) = h.join("node-a", &[WEB]).await;
    let old_root = last_cert(&first).unwrap();

    let keys = FileKeyStore::open(h.data_dir.join("keys")).unwrap();
    let td = h.trust_domain();
    let new_id = root_cmd::prepare(
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
    // The prepared root reaches bundle.pem; nothing signs with it yet.
    let bundle_file = h.data_dir.join("bundle.pem");
    h.bundle_pem = eventually("the prepared root in bundle.pem", async || {
        let text = std::fs::read_to_string(&bundle_file).ok()?;
        (pem_count(&text) == 2).then_some(text)
    })
    .await;
    let (still_old, _) = h.join("node-b", &[WEB]).await;
    assert_eq!(last_cert(&still_old).unwrap(), old_root);

    let mut out = Vec::new();
    let outcome = root_cmd::activate(h.store.as_ref(), &new_id, false, 60, false, &mut out)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Done, "{}", String::from_utf8_lossy(&out));

    // New leaves chain to the new root.
    let mut n = 0;
    let new_root = eventually("a leaf of the new root", async || {
        n += 1;
        let (chain, _) = h.join(&format!("node-c{n}"), &[WEB]).await;
        let root = last_cert(&chain)?;
        (root != old_root).then_some(root)
    })
    .await;
    // The serving certificate is re-issued by the new root: a client trusting only the new
    // root connects.
    let new_only = CertificateDer::pem_slice_iter(h.bundle_pem.as_bytes())
        .filter_map(Result::ok)
        .find(|c| *c == new_root)
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .expect("the new root is in the bundle");
    let addr = h.addr();
    eventually("a serving certificate of the new root", async || {
        let mut client = connect(addr, &new_only, None).await.ok()?;
        // Any answer but a transport failure proves the TLS handshake succeeded.
        match create(&mut client, request("not a CSR", 0, None, None)).await {
            Err(status) if status.code() == tonic::Code::Unavailable => None,
            _ => Some(()),
        }
    })
    .await;
    h.stop().await;
}
