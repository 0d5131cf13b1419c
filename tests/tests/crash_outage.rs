//! Crash and outage tests with the real binaries (issue 14, item 2): the CA killed with SIGKILL
//! in the middle of a burst, PostgreSQL restarted under load, the node agent killed and
//! restarted, and the CA's data directory running out of space. After each: every certificate
//! a client received is in the ledger, `citadel ledger verify` passes (chain and signed
//! checkpoint), and the service recovers.
//!
//! PostgreSQL runs as a private server per test ([`PrivatePostgres`]): the shared one on
//! 127.0.0.1:5432 serves other tests in parallel and is never stopped.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use citadel_e2e::csr::p256_csr;
use citadel_e2e::faults::{
    Burst, BurstOutcome, PrivatePostgres, Received, SmallTmpfs, is_root, ledger_certificates,
    ledger_verify,
};
use citadel_e2e::mesh::{AgentOptions, AgentProcess, create_join_token};
use citadel_e2e::process::CaProcess;
use citadel_e2e::tokens::{TEST_ISSUER, TokenIssuer};
use futures::StreamExt;
use spiffe::WorkloadApiClient;

/// The issue's burst: 10,000 requests. The CA is killed once half of them were answered.
const BURST: usize = 10_000;
/// Concurrent requests in a burst (over 4 HTTP/2 connections).
const CONCURRENCY: usize = 64;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// Writes a JWKS for `tokens` and returns the serve flags that trust it.
fn jwt_flags(dir: &Path, tokens: &TokenIssuer) -> Vec<String> {
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, tokens.jwks()).unwrap();
    vec![
        "--jwt-issuer".into(),
        TEST_ISSUER.into(),
        "--jwt-jwks".into(),
        jwks.display().to_string(),
        // Checkpoints every second, so some are signed while the load runs.
        "--ledger-checkpoint-interval".into(),
        "1s".into(),
    ]
}

/// 16 workloads' (CSR, token) pairs, reused round-robin: the CA signs each request anew.
fn workload_requests(tokens: &TokenIssuer) -> Arc<Vec<(String, String)>> {
    Arc::new(
        (0..16)
            .map(|i| {
                let sa = format!("w{i}");
                let id = format!("spiffe://cluster.local/ns/shop/sa/{sa}");
                (p256_csr(&[&id]).unwrap().pem, tokens.token("shop", &sa))
            })
            .collect(),
    )
}

/// `--data-dir DIR [--database-url URL]`.
fn store_args(data: &Path, url: Option<&str>) -> Vec<String> {
    let mut args = vec!["--data-dir".to_owned(), data.display().to_string()];
    if let Some(url) = url {
        args.extend(["--database-url".to_owned(), url.to_owned()]);
    }
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Every certificate in `received` is in the ledger, and the ledger verifies.
fn assert_ledger_holds(store: &[String], received: &[Received], when: &str) {
    let (ok, out) = ledger_verify(&strs(store)).unwrap();
    assert!(ok, "ledger verify {when}: {out}");
    let ledger: BTreeSet<Received> = ledger_certificates(&strs(store))
        .unwrap()
        .into_iter()
        .collect();
    let missing: Vec<&Received> = received.iter().filter(|r| !ledger.contains(r)).collect();
    assert!(
        missing.is_empty(),
        "{when}: {} of {} certificates clients received are not in the ledger, e.g. {:?}",
        missing.len(),
        received.len(),
        missing.first()
    );
    eprintln!(
        "{when}: {} received certificate(s) all in the ledger ({} rows); {}",
        received.len(),
        ledger.len(),
        out.trim()
    );
}

fn codes(outcome: &BurstOutcome) -> Vec<(tonic::Code, usize)> {
    let mut counts = std::collections::BTreeMap::<i32, (tonic::Code, usize)>::new();
    for (code, _) in &outcome.failures {
        counts.entry(*code as i32).or_insert((*code, 0)).1 += 1;
    }
    counts.into_values().collect()
}

async fn wait_until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILL mid-burst; then the ledger holds every certificate handed out, verifies, and the CA
/// restarts on the same store and issues again.
async fn ca_killed_mid_burst(url: Option<&str>) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
    let mut flags = jwt_flags(tmp.path(), &tokens);
    if let Some(url) = url {
        flags.extend(["--database-url".to_owned(), url.to_owned()]);
    }
    let store = store_args(&data, url);
    let mut ca = CaProcess::start(&data, &strs(&flags)).await.unwrap();
    let bundle = ca.bundle_pem().unwrap();
    let requests = workload_requests(&tokens);

    let mut burst = Burst::new(requests.clone(), BURST, CONCURRENCY);
    burst.stop_after_failure = true;
    let progress = burst.progress.clone();
    let started = Instant::now();
    let (addr, b) = (ca.grpc_addr, bundle.clone());
    let load = tokio::spawn(async move { burst.run(addr, &b).await });
    wait_until(600, "half of the burst answered", || {
        progress.load(Ordering::SeqCst) >= BURST / 2
    })
    .await;
    let answered_at_kill = progress.load(Ordering::SeqCst);
    let elapsed = started.elapsed();
    ca.kill().unwrap();
    let outcome = load.await.unwrap().unwrap();
    eprintln!(
        "killed after {answered_at_kill} answers in {elapsed:?} ({:.0} answers/s); received {}, failures {:?}",
        answered_at_kill as f64 / elapsed.as_secs_f64(),
        outcome.received.len(),
        codes(&outcome)
    );
    assert!(
        outcome.received.len() >= BURST / 2 - CONCURRENCY,
        "{:?}",
        codes(&outcome)
    );
    assert!(
        outcome.received.len() < BURST,
        "the kill came after the burst: nothing was in flight"
    );
    let unique: BTreeSet<&Received> = outcome.received.iter().collect();
    assert_eq!(
        unique.len(),
        outcome.received.len(),
        "a serial was handed out twice"
    );
    assert_ledger_holds(&store, &outcome.received, "after SIGKILL");

    // A clean restart on the same store, issuing again.
    let ca2 = CaProcess::start(&data, &strs(&flags)).await.unwrap();
    assert_eq!(
        ca2.bundle_pem().unwrap(),
        bundle,
        "the restart changed the root"
    );
    let again = Burst::new(requests, 50, 8)
        .run(ca2.grpc_addr, &bundle)
        .await
        .unwrap();
    assert!(again.failures.is_empty(), "{:?}", again.failures.first());
    let mut all = outcome.received;
    all.extend(again.received);
    assert_ledger_holds(&store, &all, "after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_killed_mid_burst_on_sqlite_keeps_every_certificate_it_handed_out() {
    ca_killed_mid_burst(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_killed_mid_burst_on_postgres_keeps_every_certificate_it_handed_out() {
    let Some(pg) = PrivatePostgres::start().unwrap() else {
        return;
    };
    ca_killed_mid_burst(Some(&pg.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_answers_unavailable_then_recovers_without_a_ca_restart() {
    let Some(pg) = PrivatePostgres::start().unwrap() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
    let mut flags = jwt_flags(tmp.path(), &tokens);
    let url = pg.url();
    flags.extend(["--database-url".to_owned(), url.clone()]);
    let store = store_args(&data, Some(&url));
    let ca = CaProcess::start(&data, &strs(&flags)).await.unwrap();
    let bundle = ca.bundle_pem().unwrap();
    let requests = workload_requests(&tokens);

    // Steady load for the whole test.
    let load = Burst::new(requests.clone(), usize::MAX, 16);
    let (progress, stop) = (load.progress.clone(), load.stop.clone());
    let (addr, b) = (ca.grpc_addr, bundle.clone());
    let load = tokio::spawn(async move { load.run(addr, &b).await });
    wait_until(120, "load running", || {
        progress.load(Ordering::SeqCst) >= 200
    })
    .await;

    pg.stop_server().unwrap();
    // While the database is down, every request is refused as Unavailable.
    let down = Burst::new(requests.clone(), 40, 8)
        .run(addr, &bundle)
        .await
        .unwrap();
    eprintln!(
        "while PostgreSQL is down: {} ok, failures {:?}",
        down.received.len(),
        codes(&down)
    );
    assert!(
        down.received.is_empty(),
        "a certificate was issued without its ledger row"
    );
    assert!(
        down.failures
            .iter()
            .all(|(code, _)| *code == tonic::Code::Unavailable),
        "{:?}",
        down.failures
    );
    assert!(
        down.failures
            .iter()
            .all(|(_, m)| m.contains("ledger unavailable")),
        "{:?}",
        down.failures.first()
    );

    // Back up: the same CA process issues again, without a restart.
    pg.start_server().unwrap();
    let recovered_at = Instant::now();
    let mut recovered = BurstOutcome::default();
    while recovered.received.is_empty() {
        assert!(
            recovered_at.elapsed() < Duration::from_secs(60),
            "the CA did not recover within 60 s of PostgreSQL's return: {:?}",
            recovered.failures.last()
        );
        let probe = Burst::new(requests.clone(), 1, 1)
            .run(addr, &bundle)
            .await
            .unwrap();
        recovered.received.extend(probe.received);
        recovered.failures.extend(probe.failures);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "recovered {:?} after PostgreSQL's return",
        recovered_at.elapsed()
    );
    let before = progress.load(Ordering::SeqCst);
    wait_until(60, "load going again", || {
        progress.load(Ordering::SeqCst) >= before + 200
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let load = load.await.unwrap().unwrap();
    eprintln!(
        "load: {} ok, failures {:?}",
        load.received.len(),
        codes(&load)
    );
    assert!(
        load.failures
            .iter()
            .all(|(code, _)| *code == tonic::Code::Unavailable),
        "the outage surfaced as something else than Unavailable: {:?}",
        load.failures
            .iter()
            .find(|(c, _)| *c != tonic::Code::Unavailable)
    );
    let mut all = load.received;
    all.extend(recovered.received);
    assert_ledger_holds(&store, &all, "after the PostgreSQL restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_and_restarted_serves_workloads_again_without_a_new_join_token() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("ca"), &[]).await.unwrap();
    let uid = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
    };
    let entries = format!("entries:\n  - spiffe_id: {WEB}\n    uid: {uid}\n");
    let token = create_join_token(&ca.data_dir, "node-a", &[WEB], "10m").unwrap();
    let dir = tmp.path().join("agent");
    let agent = AgentProcess::start(&ca, &AgentOptions::new(&dir, &entries, Some(&token)))
        .await
        .unwrap();
    let socket = format!("unix://{}", agent.socket.display());
    let client = WorkloadApiClient::connect_to(&socket).await.unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.default_svid().unwrap().spiffe_id().to_string(), WEB);
    let first_leaf = first.default_svid().unwrap().leaf().as_bytes().to_vec();

    // SIGKILL: no shutdown path runs; the workload's stream breaks.
    agent.signal("-KILL").unwrap();
    let mut agent = agent;
    agent.wait_exit(10).await.unwrap();
    let broken = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream of a killed agent did not end");
    assert!(
        !matches!(broken, Some(Ok(_))),
        "a killed agent sent an update"
    );
    drop(agent);

    // Restarted with its data directory and without a token (the one it joined with is used).
    let agent = AgentProcess::start(&ca, &AgentOptions::new(&dir, &entries, None))
        .await
        .unwrap();
    // The workload's client reconnects on its own channel and streams again.
    let mut stream = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(s) = client.stream_x509_contexts().await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the workload could not reopen its stream");
    let ctx = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let svid = ctx.default_svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), WEB);
    assert_ne!(
        svid.leaf().as_bytes(),
        first_leaf.as_slice(),
        "expected a fresh certificate"
    );
    drop(agent);
    let (ok, out) = ledger_verify(&strs(&store_args(&ca.data_dir, None))).unwrap();
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_dir_answers_unavailable_keeps_the_ledger_intact_and_recovers() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "mounting a tmpfs needs root (CI is set)"
        );
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    let fs = SmallTmpfs::mount("16m").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = fs.path().join("data");
    let tokens = TokenIssuer::new(TEST_ISSUER).unwrap();
    let flags = jwt_flags(tmp.path(), &tokens);
    let store = store_args(&data, None);
    let mut ca = CaProcess::start(&data, &strs(&flags)).await.unwrap();
    let bundle = ca.bundle_pem().unwrap();
    let requests = workload_requests(&tokens);
    let before = Burst::new(requests.clone(), 100, 8)
        .run(ca.grpc_addr, &bundle)
        .await
        .unwrap();
    assert!(before.failures.is_empty(), "{:?}", before.failures.first());

    let filler = fs.path().join("filler");
    let filled = fs.fill(&filler).unwrap();
    // Go on until the ledger cannot grow any more (SQLite first fills the room it has).
    let mut full = Burst::new(requests.clone(), 20_000, 8);
    full.stop_after_failure = true;
    let full = full.run(ca.grpc_addr, &bundle).await.unwrap();
    eprintln!(
        "filled {filled} bytes; then {} ok, failures {:?}",
        full.received.len(),
        codes(&full)
    );
    let (code, message) = full
        .failures
        .first()
        .expect("a full disk went unnoticed")
        .clone();
    assert_eq!(code, tonic::Code::Unavailable, "{message}");
    assert!(
        message.contains("full"),
        "the error does not say the disk is full: {message}"
    );

    // Space comes back: the same process issues again.
    std::fs::remove_file(&filler).unwrap();
    let recovered_at = Instant::now();
    let mut after = BurstOutcome::default();
    while after.received.is_empty() {
        assert!(
            recovered_at.elapsed() < Duration::from_secs(60),
            "no recovery within 60 s of freeing space: {:?}",
            after.failures.last()
        );
        let probe = Burst::new(requests.clone(), 1, 1)
            .run(ca.grpc_addr, &bundle)
            .await
            .unwrap();
        after.received.extend(probe.received);
        after.failures.extend(probe.failures);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut all = before.received;
    all.extend(full.received);
    all.extend(after.received);
    assert_ledger_holds(&store, &all, "after the disk was full");
    // And a clean stop and start on the same data directory.
    assert!(ca.stop().await.unwrap().success());
    let ca = CaProcess::start(&data, &strs(&flags)).await.unwrap();
    let last = Burst::new(requests, 10, 2)
        .run(ca.grpc_addr, &bundle)
        .await
        .unwrap();
    assert!(last.failures.is_empty(), "{:?}", last.failures.first());
    all.extend(last.received);
    assert_ledger_holds(&store, &all, "after the restart");
}
