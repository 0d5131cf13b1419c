//! Plug-in CA sets entering the authority lifecycle: a set whose signing certificate has a
//! repeated DN attribute is refused by the probe with a clear message, a good one enters as
//! `prepared`, and importing `--ca-dir` again never undoes an activation made from the CLI.
//! The sets are made with OpenSSL, which (unlike rcgen) can write repeated attributes.
//!
//! A running CA watches `--ca-dir`: a replaced set enters as prepared and takes over once the
//! (agent-like) acknowledger holds its root; a bad set is rejected, counted and changes
//! nothing.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use citadel_ca::authorities::{import_ca_dir, record_of, save_key};
use citadel_ca::authority::Authority;
use citadel_ca::keystore::{KeyStore, MemoryKeyStore};
use citadel_ca::root_cmd::{PrepareArgs, prepare};
use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use citadel_e2e::unix_now;
use citadel_identity::TrustDomain;
use citadel_store::memory::MemoryStore;
use citadel_store::{AuthorityRecord, AuthorityState, AuthorityStore, Store};
use support::{Harness, WEB, chain_der};

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

/// An Istio `cacerts` directory whose intermediate has subject `subject`, under a new root.
fn make_cacerts(dir: &Path, subject: &str) {
    make_root(dir);
    make_intermediate(dir, dir, subject);
    std::fs::remove_file(dir.join("root-key.pem")).unwrap();
}

/// A self-signed root (`root-cert.pem`, `root-key.pem`) in `dir`.
fn make_root(dir: &Path) {
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
}

/// An Istio `cacerts` directory in `dir` whose intermediate (subject `subject`) is signed by
/// the root made by [`make_root`] in `root_dir`.
fn make_intermediate(dir: &Path, root_dir: &Path, subject: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let root_cert = root_dir.join("root-cert.pem");
    let root_key = root_dir.join("root-key.pem");
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
            root_cert.to_str().unwrap(),
            "-CAkey",
            root_key.to_str().unwrap(),
            "-CAcreateserial",
            "-out",
            "ca-cert.pem",
            "-days",
            "365",
            "-extfile",
            "ext.cnf",
        ],
    );
    if root_dir != dir {
        std::fs::copy(&root_cert, dir.join("root-cert.pem")).unwrap();
    }
    let chain = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();
    std::fs::set_permissions(
        dir.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
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

/// Copies the CA files of `from` into `to`, one file at a time (as an operator would).
fn copy_set(from: &Path, to: &Path) {
    for name in [
        "ca-cert.pem",
        "cert-chain.pem",
        "root-cert.pem",
        "ca-key.pem",
    ] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
    std::fs::set_permissions(
        to.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

/// A CA signing with the operator's set in `<tmp>/live` (renewal off, 100 ms rounds).
async fn plugin_harness(tmp: &Path) -> Harness {
    let live = tmp.join("live");
    make_cacerts(&live, "/O=Operator/OU=mesh/CN=Operator Intermediate CA");
    Harness::start_custom(
        |s| s,
        |c| {
            c.ca_dir = Some(live.clone());
            c.root_renewal = None;
        },
    )
    .await
}

async fn authorities(h: &Harness) -> Vec<AuthorityRecord> {
    h.store.list_authorities().await.unwrap()
}

async fn rejected_total(h: &Harness) -> u64 {
    let addr = h.ca.as_ref().unwrap().http_addr;
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("citadel_ca_dir_rejected_total "))
        .unwrap_or_else(|| panic!("no citadel_ca_dir_rejected_total in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits up to `secs` for `what` to hold of the store's authorities.
async fn wait_for(
    h: &Harness,
    secs: u64,
    what: &str,
    cond: impl Fn(&[AuthorityRecord]) -> bool,
) -> Vec<AuthorityRecord> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let records = authorities(h).await;
        if cond(&records) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {secs} s: {:?}",
            records.iter().map(|r| (&r.id, r.state)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state_of(records: &[AuthorityRecord], id: &str) -> Option<AuthorityState> {
    records.iter().find(|r| r.id == id).map(|r| r.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_ca_dir_is_prepared_then_activated_once_propagated_and_signs() {
    let tmp = tempfile::tempdir().unwrap();
    let h = plugin_harness(tmp.path()).await;
    let first = authorities(&h).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].state, AuthorityState::Active);
    let original = first[0].id.clone();

    // An agent-like acknowledger, holding back (heartbeats with its old sequence) while
    // `hold` is set, as an agent whose proxies have not ACKed the new bundle yet.
    const AGENT: &str = "spiffe://cluster.local/citadel/node/acker";
    let hold = Arc::new(AtomicBool::new(true));
    let (acker_store, acker_hold) = (h.store.clone(), hold.clone());
    let acker = tokio::spawn(async move {
        let mut acked = acker_store.bundle_sequence().await.unwrap();
        loop {
            if !acker_hold.load(Ordering::SeqCst) {
                acked = acker_store.bundle_sequence().await.unwrap();
            }
            acker_store
                .record_bundle_ack(AGENT, acked, unix_now())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // The operator replaces the files with an intermediate under a new root.
    let next = tmp.path().join("next");
    make_cacerts(&next, "/O=Operator/OU=mesh/CN=Operator Intermediate CA 2");
    let (next_ca, _) = Authority::import_dir(&next).unwrap();
    let next_id = next_ca.id().to_owned();
    copy_set(&next, &tmp.path().join("live"));

    let records = wait_for(&h, 10, "the new set prepared", |r| {
        state_of(r, &next_id).is_some()
    })
    .await;
    assert_eq!(state_of(&records, &next_id), Some(AuthorityState::Prepared));
    // A live agent behind blocks activation: 1 s is ten rounds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = authorities(&h).await;
    assert_eq!(
        state_of(&during, &next_id),
        Some(AuthorityState::Prepared),
        "activated before the live agent held the new root"
    );
    assert_eq!(state_of(&during, &original), Some(AuthorityState::Active));

    hold.store(false, Ordering::SeqCst);
    let records = wait_for(&h, 10, "the new set activated", |r| {
        state_of(r, &next_id) == Some(AuthorityState::Active)
    })
    .await;
    assert_eq!(state_of(&records, &original), Some(AuthorityState::Retired));
    acker.abort();

    // The CA signs with it (its serving certificate too: the bundle file now holds both roots).
    let deadline = Instant::now() + Duration::from_secs(10);
    let chain = loop {
        let bundle_pem = std::fs::read_to_string(h.data_dir.join("bundle.pem")).unwrap();
        let csr = p256_csr(&[WEB]).unwrap();
        let token = h.tokens.token("shop", "web");
        if let Ok(mut client) = connect(h.addr(), &bundle_pem, None).await
            && let Ok(resp) = create(&mut client, request(&csr.pem, 0, Some(&token), None)).await
        {
            let chain = chain_der(&resp.cert_chain);
            if chain.get(1) == Some(next_ca.signer()) {
                break chain;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the CA does not sign with the new set"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(chain.last(), Some(next_ca.root()));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ca_dir_set_is_rejected_counted_once_and_changes_nothing_until_a_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let h = plugin_harness(tmp.path()).await;
    let before = authorities(&h).await;
    let seq_before = h.store.bundle_sequence().await.unwrap();
    assert_eq!(rejected_total(&h).await, 0);

    // A key that does not match the signing certificate (as when only ca-key.pem of a new
    // set has been copied).
    let other = tmp.path().join("other");
    make_cacerts(&other, "/O=Operator/OU=mesh/CN=Another Intermediate CA");
    let live = tmp.path().join("live");
    std::fs::copy(other.join("ca-key.pem"), live.join("ca-key.pem")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rejected_total(&h).await == 0 {
        assert!(Instant::now() < deadline, "the bad set was not rejected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Ten more rounds: counted (and logged) once, nothing changed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rejected_total(&h).await, 1);
    assert_eq!(authorities(&h).await, before);
    assert_eq!(h.store.bundle_sequence().await.unwrap(), seq_before);

    // A good set is taken afterwards; with no agents it signs at once.
    let (other_ca, _) = Authority::import_dir(&other).unwrap();
    copy_set(&other, &live);
    let records = wait_for(&h, 10, "the good set activated", |r| {
        state_of(r, other_ca.id()) == Some(AuthorityState::Active)
    })
    .await;
    assert_eq!(
        state_of(&records, &before[0].id),
        Some(AuthorityState::Retired)
    );
    assert_eq!(rejected_total(&h).await, 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_or_restarted_ca_never_undoes_a_cli_activation_away_from_its_ca_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    make_cacerts(&live, "/O=Operator/OU=mesh/CN=Operator Intermediate CA");
    let data_dir = tmp.path().join("data");
    let start = || {
        let (live, data_dir) = (live.clone(), data_dir.clone());
        Harness::start_custom(
            |s| s,
            move |c| {
                c.ca_dir = Some(live);
                c.data_dir = data_dir;
                c.root_renewal = None;
            },
        )
    };
    let h = start().await;
    let plugin = authorities(&h).await[0].id.clone();
    // The operator rotates away from the CA directory's set from the CLI.
    let keys = citadel_ca::keystore::FileKeyStore::open(data_dir.join("keys")).unwrap();
    let td = td();
    let cli = prepare(
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
    let mut out = Vec::new();
    citadel_ca::root_cmd::activate(h.store.as_ref(), &cli, false, 60, true, &mut out)
        .await
        .unwrap();
    // Twenty rounds of the watch: the directory's set stays retired.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records = authorities(&h).await;
    assert_eq!(state_of(&records, &cli), Some(AuthorityState::Active));
    assert_eq!(state_of(&records, &plugin), Some(AuthorityState::Retired));
    h.stop().await;
    // Nor does a restart with the same directory.
    let h = start().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let records = authorities(&h).await;
    assert_eq!(state_of(&records, &cli), Some(AuthorityState::Active));
    assert_eq!(state_of(&records, &plugin), Some(AuthorityState::Retired));
    h.stop().await;
}

#[tokio::test]
async fn only_the_lease_holder_imports_the_ca_dir_and_a_repeated_import_changes_nothing() {
    use citadel_ca::ca_dir_watch::CaDirWatch;
    use citadel_ca::rotation::{Plan, RenewalPlan, Transition};
    use citadel_ca::rotation_driver::RenewalDriver;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cacerts");
    make_cacerts(&dir, "/O=Operator/OU=mesh/CN=Operator Intermediate CA");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let keys: Arc<dyn KeyStore> = Arc::new(MemoryKeyStore::default());
    let td = td();
    let now = unix_now();
    let (first, key) = Authority::create_root(&td, now, 86_400 * 365).unwrap();
    let key_ref = save_key(keys.as_ref(), &first, &key).await.unwrap();
    store
        .insert_authority(&record_of(&first, AuthorityState::Active, &key_ref, now))
        .await
        .unwrap();
    let driver = |holder: &str| RenewalDriver {
        store: store.clone(),
        keys: keys.clone(),
        trust_domain: td.clone(),
        policy: None,
        ca_dir: Some(CaDirWatch::new(dir.clone(), Default::default())),
        root_lifetime_secs: 86_400,
        stale_after_secs: 60,
        interval: Duration::from_secs(1),
        leadership: Arc::new(citadel_ca::leadership::StoreLease::new(
            store.clone(),
            citadel_ca::rotation_driver::RENEWAL_LEASE,
            holder.into(),
            citadel_ca::rotation_driver::lease_secs(Duration::from_secs(1)),
        )),
    };
    let (mut a, mut b) = (driver("a"), driver("b"));
    // a takes the lease; the set is new to its watch: it settles for one round.
    assert_eq!(a.round().await.unwrap(), None);
    for _ in 0..3 {
        assert_eq!(b.round().await.unwrap(), None, "b acted without the lease");
    }
    assert_eq!(b.ca_dir.as_ref().unwrap().authority(), None, "b imported");
    assert_eq!(store.list_authorities().await.unwrap().len(), 1);
    // Second round: imported as prepared, and (no agents) activated in the same round.
    let plugin = match a.round().await.unwrap() {
        Some(RenewalPlan::Step(Plan::Next(Transition::Activate(id)))) => id,
        other => panic!("{other:?}"),
    };
    let records = store.list_authorities().await.unwrap();
    assert_eq!(
        records.iter().find(|r| r.id == plugin).map(|r| r.state),
        Some(AuthorityState::Active)
    );
    // Importing the same set again (a restart, another replica) changes nothing.
    let sequence = store.bundle_sequence().await.unwrap();
    let again = import_ca_dir(store.as_ref(), keys.as_ref(), &td, &dir, unix_now())
        .await
        .unwrap();
    assert_eq!(again, plugin);
    assert_eq!(store.list_authorities().await.unwrap(), records);
    assert_eq!(store.bundle_sequence().await.unwrap(), sequence);
    // Later rounds: nothing to do.
    assert_eq!(a.round().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_intermediate_under_the_same_root_takes_over_with_the_bundle_roots_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let root_dir = tmp.path().join("root");
    make_root(&root_dir);
    let live = tmp.path().join("live");
    make_intermediate(&live, &root_dir, "/O=Operator/OU=mesh/CN=Intermediate 1");
    let h = Harness::start_custom(
        |s| s,
        |c| {
            c.ca_dir = Some(live.clone());
            c.root_renewal = None;
        },
    )
    .await;
    let original = authorities(&h).await[0].id.clone();
    let next = tmp.path().join("next");
    make_intermediate(&next, &root_dir, "/O=Operator/OU=mesh/CN=Intermediate 2");
    let (next_ca, _) = Authority::import_dir(&next).unwrap();
    copy_set(&next, &live);
    // No agents: it signs as soon as it is recorded.
    let records = wait_for(&h, 10, "the new intermediate activated", |r| {
        state_of(r, next_ca.id()) == Some(AuthorityState::Active)
    })
    .await;
    assert_eq!(state_of(&records, &original), Some(AuthorityState::Retired));
    // One root, published once.
    let bundle_pem = std::fs::read_to_string(h.data_dir.join("bundle.pem")).unwrap();
    assert_eq!(
        bundle_pem.matches("BEGIN CERTIFICATE").count(),
        1,
        "{bundle_pem}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let csr = p256_csr(&[WEB]).unwrap();
        let token = h.tokens.token("shop", "web");
        let mut client = connect(h.addr(), &bundle_pem, None).await.unwrap();
        let resp = create(&mut client, request(&csr.pem, 0, Some(&token), None))
            .await
            .unwrap();
        if chain_der(&resp.cert_chain).get(1) == Some(next_ca.signer()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the CA does not sign with the new intermediate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.stop().await;
}
