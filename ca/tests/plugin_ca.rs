//! Plug-in CA sets entering the authority lifecycle: a set whose signing certificate has a
//! repeated DN attribute is refused by the probe with a clear message, a good one enters as
//! `prepared`, and importing `--ca-dir` again never undoes an activation made from the CLI.
//! The sets are made with OpenSSL, which (unlike rcgen) can write repeated attributes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use citadel_ca::authorities::{import_ca_dir, record_of, save_key};
use citadel_ca::authority::Authority;
use citadel_ca::keystore::{KeyStore, MemoryKeyStore};
use citadel_ca::root_cmd::{PrepareArgs, prepare};
use citadel_e2e::unix_now;
use citadel_identity::TrustDomain;
use citadel_store::memory::MemoryStore;
use citadel_store::{AuthorityState, Store};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An Istio `cacerts` directory whose intermediate has subject `subject`.
fn make_cacerts(dir: &Path, subject: &str) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "root-key.pem",
            "-out",
            "root-cert.pem",
            "-days",
            "3650",
            "-subj",
            "/O=Operator/CN=Operator Root CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ca-key.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "ca-key.pem",
            "-out",
            "ca.csr",
            "-subj",
            subject,
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-out",
            "ca-cert.pem",
            "-days",
            "365",
            "-extfile",
            "ext.cnf",
        ],
    );
    let chain = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();
    std::fs::set_permissions(
        dir.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::remove_file(dir.join("root-key.pem")).unwrap();
}

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

#[tokio::test]
async fn rejects_a_plugin_ca_whose_subject_repeats_an_attribute() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cacerts");
    make_cacerts(
        &dir,
        "/O=Operator/OU=mesh/OU=security/CN=Operator Intermediate CA",
    );
    let store = MemoryStore::new();
    let keys = MemoryKeyStore::default();
    let td = td();
    let err = prepare(
        &store,
        &keys,
        &PrepareArgs {
            trust_domain: &td,
            ca_dir: Some(&dir),
            root_lifetime_secs: 86_400,
        },
        unix_now(),
    )
    .await
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("does not verify") && msg.contains("repeated attribute"),
        "{msg}"
    );
    assert!(
        store.list_authorities().await.unwrap().is_empty(),
        "nothing stored"
    );
    // The same probe runs when the CA starts with --ca-dir.
    let err = import_ca_dir(&store, &keys, &td, &dir, unix_now())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("repeated attribute"), "{err:#}");
}

#[tokio::test]
async fn a_plugin_ca_enters_as_prepared_and_a_restart_never_undoes_a_cli_activation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cacerts");
    make_cacerts(&dir, "/O=Operator/OU=mesh/CN=Operator Intermediate CA");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let keys = MemoryKeyStore::default();
    let td = td();
    let now = unix_now();
    // A self-signed root signs already.
    let (first, key) = Authority::create_root(&td, now, 86_400 * 365).unwrap();
    let key_ref = save_key(&keys, &first, &key).await.unwrap();
    store
        .insert_authority(&record_of(&first, AuthorityState::Active, &key_ref, now))
        .await
        .unwrap();

    // Starting with --ca-dir adds the operator's CA as prepared; the active one stays.
    let plugin = import_ca_dir(store.as_ref(), &keys, &td, &dir, now)
        .await
        .unwrap();
    let state = |id: String| {
        let store = store.clone();
        async move {
            store
                .list_authorities()
                .await
                .unwrap()
                .into_iter()
                .find(|a| a.id == id)
                .map(|a| a.state)
        }
    };
    assert_eq!(state(plugin.clone()).await, Some(AuthorityState::Prepared));
    assert_eq!(
        state(first.id().to_owned()).await,
        Some(AuthorityState::Active)
    );
    // Its key was copied into the key store, so the CA needs the directory no more.
    let rec = store
        .list_authorities()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.id == plugin)
        .unwrap();
    assert!(keys.load(&rec.key_ref).await.is_ok());

    // The operator activates it, then rotates away from it from the CLI.
    store
        .set_authority_state(&plugin, AuthorityState::Active)
        .await
        .unwrap();
    let later = prepare(
        store.as_ref(),
        &keys,
        &PrepareArgs {
            trust_domain: &td,
            ca_dir: None,
            root_lifetime_secs: 86_400 * 365,
        },
        now,
    )
    .await
    .unwrap();
    store
        .set_authority_state(&later, AuthorityState::Active)
        .await
        .unwrap();
    // A restart with the same --ca-dir changes nothing.
    import_ca_dir(store.as_ref(), &keys, &td, &dir, now)
        .await
        .unwrap();
    assert_eq!(state(later).await, Some(AuthorityState::Active));
    assert_eq!(state(plugin).await, Some(AuthorityState::Retired));
}
