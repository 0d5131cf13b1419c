//! `citadel-mesh up` / `down` with the real binaries, as a new user would run
//! them: `up --json` starts the CA, the agent, frontend and backend behind
//! their own citadel-proxy; the printed allowed call gives 200 (and backend
//! names frontend's identity, verified over mutual TLS), the printed denied
//! call 403 `RBAC: access denied`, the printed `citadel policy check`
//! explains both; editing the sample policy turns the 403 into a 200 within
//! seconds; `down` stops every recorded process; a second `up` (text output)
//! reuses the data directory, the agent's saved identity and the edited
//! policy; a second `down` stops it again; with the agent's saved identity
//! damaged, a third `up` lets it re-join with a fresh token.
//!
//! As root the services run as two uids of their own (checked in
//! /proc/<pid>/status) and the first `up` runs from a data directory inside a
//! 0700 directory, so the socket and executables move to /run; otherwise the
//! fallback (one uid, executable paths) is checked instead.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use citadel_e2e::mesh::is_root;
use citadel_e2e::process::{binary, http_get};

const MESH_ALLOWED_BODY: &str =
    "backend: GET /api/hello\ncaller: spiffe://cluster.local/ns/demo/sa/frontend ";
const AUTHZ_PATHS_LINE: &str = "        paths: [\"/api/*\"]";

/// Runs `citadel-mesh down` when dropped, so a failing test leaves nothing
/// running.
struct DownOnDrop(PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = mesh(&["down", "--data-dir", &self.0.display().to_string()]);
    }
}

fn mesh(args: &[&str]) -> Output {
    Command::new(binary("citadel-mesh"))
        .args(args)
        .output()
        .expect("running citadel-mesh")
}

fn must(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `http://127.0.0.1:PORT/PATH` → (address, path).
fn split_url(url: &str) -> (SocketAddr, String) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').expect("a path");
    (host.parse().expect("host:port"), format!("/{path}"))
}

async fn call(url: &str) -> (u16, String) {
    let (addr, path) = split_url(url);
    tokio::time::timeout(Duration::from_secs(15), http_get(addr, &path))
        .await
        .expect("an answer within 15 s")
        .expect("an HTTP answer")
}

/// The curl commands of `up`'s text output, in order (the URL is the last word).
fn printed_curls(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl -sS -i http://"))
        .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
        .collect()
}

/// The uid a process runs as (`Uid:` of /proc/<pid>/status).
fn uid_of(pid: u64) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process alive");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a Uid line")
}

/// Gone: no such pid, or a zombie waiting to be reaped by whoever inherited it.
fn gone(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s == "Z" || s == "X"),
    }
}

fn pids(doc: &serde_json::Value) -> Vec<u64> {
    doc["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| p["pid"].as_u64().expect("pid"))
        .collect()
}

fn check_down(data_dir: &Path, pids: &[u64]) {
    let out = must(
        mesh(&["down", "--data-dir", &data_dir.display().to_string()]),
        "down",
    );
    assert_eq!(out.matches(" stopped").count(), 6, "{out}");
    for pid in pids {
        assert!(gone(*pid), "pid {pid} still running after down:\n{out}");
    }
    assert!(data_dir.join("logs/ca.log").exists(), "the data dir stays");
}

fn require_binaries() {
    for name in ["citadel", "citadel-agent", "citadel-proxy", "citadel-mesh"] {
        assert!(
            binary(name).exists(),
            "{} is missing: build with `cargo build -p citadel-ca -p citadel-agent -p citadel-proxy -p citadel-mesh` (cargo test --workspace builds it)",
            binary(name).display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_allowed_and_denied_calls_follows_policy_edits_and_down_stops_everything() {
    require_binaries();
    let tmp = tempfile::tempdir().unwrap();
    // As root, other uids cannot enter the data dir (until the second `up`).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let data_dir = tmp.path().join("mesh data");
    let data_arg = data_dir.display().to_string();
    let _down = DownOnDrop(data_dir.clone());

    let out = must(
        mesh(&["up", "--data-dir", &data_arg, "--json"]),
        "up --json",
    );
    let doc: serde_json::Value = serde_json::from_str(&out).expect("up --json prints JSON");
    let cmds = &doc["commands"];
    let allowed = cmds["allowed"]["url"].as_str().unwrap().to_owned();
    let denied = cmds["denied"]["url"].as_str().unwrap().to_owned();
    assert_eq!(
        cmds["allowed"]["command"].as_str().unwrap(),
        format!("curl -sS -i {allowed}")
    );
    assert_eq!(
        cmds["denied"]["command"].as_str().unwrap(),
        format!("curl -sS -i {denied}")
    );
    let first_pids = pids(&doc);
    assert_eq!(first_pids.len(), 6, "{doc}");
    for p in doc["processes"].as_array().unwrap() {
        let log = p["log"].as_str().unwrap();
        assert!(Path::new(log).starts_with(&data_dir), "{log}");
    }

    // The identities really differ.
    let proxy = |name: &str| {
        doc["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap()
    };
    let (fp, bp) = (proxy("frontend-proxy"), proxy("backend-proxy"));
    assert_eq!(
        fp["spiffe_id"],
        "spiffe://cluster.local/ns/demo/sa/frontend"
    );
    assert_eq!(bp["spiffe_id"], "spiffe://cluster.local/ns/demo/sa/backend");
    let (fuid, buid) = (
        uid_of(fp["pid"].as_u64().unwrap()),
        uid_of(bp["pid"].as_u64().unwrap()),
    );
    if is_root() {
        assert_eq!(doc["attestation"]["mode"], "uids", "{doc}");
        assert_ne!(fuid, buid);
        assert_eq!(
            u64::from(fuid),
            doc["attestation"]["frontend"].as_u64().unwrap()
        );
        assert_eq!(
            u64::from(buid),
            doc["attestation"]["backend"].as_u64().unwrap()
        );
        assert_ne!(fuid, 0);
        assert!(
            doc["runtime_note"]
                .as_str()
                .is_some_and(|n| n.contains("/run")),
            "the 0700 tempdir locks the service uids out of the data dir: {doc}"
        );
    } else {
        assert_eq!(doc["attestation"]["mode"], "executable_paths", "{doc}");
        assert!(
            doc["identities"]
                .as_str()
                .unwrap()
                .contains("no security boundary")
        );
    }

    // A second `up` while this one runs is refused and changes nothing.
    let twice = mesh(&["up", "--data-dir", &data_arg]);
    assert!(!twice.status.success());
    let err = String::from_utf8_lossy(&twice.stderr);
    assert!(err.contains("a mesh is already up"), "{err}");
    for pid in &first_pids {
        assert!(!gone(*pid), "pid {pid} survived the refused up");
    }

    // 1. Allowed: 200, and backend saw frontend's identity over mutual TLS.
    let (status, body) = call(&allowed).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with(MESH_ALLOWED_BODY), "{body}");
    // 2. Denied by the sample AuthorizationPolicy.
    let (status, body) = call(&denied).await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    // 3. The printed policy check explains both.
    let check = Command::new("sh")
        .arg("-c")
        .arg(cmds["policy_check"].as_str().unwrap())
        .output()
        .unwrap();
    let explained = must(check, "the printed policy check");
    assert!(
        explained.contains("allowed by ALLOW policy demo/backend rule 0"),
        "{explained}"
    );
    assert!(explained.contains("no ALLOW policy matched"), "{explained}");
    assert!(explained.contains("STRICT"), "{explained}");
    assert_eq!(explained.matches("decision:").count(), 2, "{explained}");

    // Editing the sample policy changes the next call within seconds.
    let policy_file = PathBuf::from(doc["policy_file"].as_str().unwrap());
    let yaml = std::fs::read_to_string(&policy_file).unwrap();
    assert!(yaml.contains(AUTHZ_PATHS_LINE), "{yaml}");
    std::fs::write(
        &policy_file,
        yaml.replace(AUTHZ_PATHS_LINE, "        paths: [\"/api/*\", \"/admin\"]"),
    )
    .unwrap();
    let edited = Instant::now();
    loop {
        let (status, body) = call(&denied).await;
        if status == 200 {
            assert!(body.starts_with("backend: GET /admin\n"), "{body}");
            break;
        }
        assert!(
            edited.elapsed() < Duration::from_secs(15),
            "still {status} 15 s after the policy edit"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("the edit applied after {:?}", edited.elapsed());

    check_down(&data_dir, &first_pids);
    let (status, _) = {
        let (addr, path) = split_url(&allowed);
        (http_get(addr, &path).await.map(|r| r.0).ok(), ())
    };
    assert_eq!(status, None, "nothing answers after down");

    // A second `up` reuses the data directory: the agent's saved identity, the
    // edited policy. As root, with the tempdir opened up, the runtime
    // directory comes back into the data directory.
    if is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let text = must(mesh(&["up", "--data-dir", &data_arg]), "second up");
    assert!(
        text.contains("reused its saved node identity (no token spent)"),
        "{text}"
    );
    assert!(!text.contains("Runtime:"), "{text}");
    assert!(
        text.contains("every 1s"),
        "up says how fast edits apply: {text}"
    );
    let urls = printed_curls(&text);
    assert_eq!(urls.len(), 2, "{text}");
    let (status, body) = call(&urls[0]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with(MESH_ALLOWED_BODY), "{body}");
    let (status, _) = call(&urls[1]).await;
    assert_eq!(status, 200, "the edited policy stayed: {text}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir.join("mesh.json")).unwrap())
            .unwrap();
    check_down(&data_dir, &pids(&state));
    let again = must(
        mesh(&["down", "--data-dir", &data_arg]),
        "down with nothing up",
    );
    assert!(again.contains("nothing to stop"), "{again}");

    // A damaged saved node identity: the agent exits 2 without a token, and
    // `up` lets it re-join with a fresh one.
    std::fs::write(
        data_dir.join("agent/data/node-identity.pem"),
        "-----BEGIN GARBAGE-----\n",
    )
    .unwrap();
    let text = must(mesh(&["up", "--data-dir", &data_arg]), "up after damage");
    assert!(text.contains("re-joined with a fresh token"), "{text}");
    let (status, body) = call(&printed_curls(&text)[0]).await;
    assert_eq!(status, 200, "{body}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir.join("mesh.json")).unwrap())
            .unwrap();
    check_down(&data_dir, &pids(&state));
}

#[test]
fn up_refuses_a_data_dir_it_did_not_make() {
    require_binaries();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("precious.txt"), "mine").unwrap();
    let out = mesh(&["up", "--data-dir", &tmp.path().display().to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a citadel-mesh data directory"), "{err}");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "nothing was written"
    );
}

/// The shell code blocks of README.md, in order.
fn readme_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(block.trim().to_owned());
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn readme_first_command_builds_every_binary_up_runs_and_the_second_is_cis_test_command() {
    let blocks = readme_commands();
    let first = blocks.first().expect("a first command");
    let (build, run) = first.split_once(" && ").expect("build && up");
    let packages: Vec<&str> = build
        .split_whitespace()
        .skip_while(|w| *w != "-p")
        .filter(|w| *w != "-p")
        .collect();
    assert!(build.starts_with("cargo build --release "), "{first}");
    // up runs citadel, citadel-agent and citadel-proxy from next to itself.
    assert_eq!(
        packages,
        [
            "citadel-ca",
            "citadel-agent",
            "citadel-proxy",
            "citadel-mesh"
        ],
        "{first}"
    );
    assert_eq!(run, "target/release/citadel-mesh up");
    let ci = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/run"))
        .expect(".ci/run");
    let last = ci.lines().rev().find(|l| !l.trim().is_empty()).unwrap();
    assert_eq!(blocks.get(1).map(String::as_str), Some(last.trim()));
}
