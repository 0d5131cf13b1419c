//! Other gRPC implementations as clients of the agent's socket, each with
//! its own defaults: Python `grpcio` (gRPC C-core, the engine of py-spiffe;
//! its `:authority` for a `unix:` target is the percent-encoded socket
//! path) and Node's `@grpc/grpc-js`. They run as child processes against an
//! in-process agent with the fake CA; the child has the test's uid, which
//! the entries map to `WEB`.
//!
//! `.ci/run` installs both (`.venv-tools` with grpcio/grpcio-tools, and
//! `npm ci` in `tests/interop/node`). Without them these tests skip with a
//! loud line, except under `CI`, where they fail.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::{Harness, TD, WEB};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate lives in the workspace")
        .to_owned()
}

fn proto_root() -> PathBuf {
    repo_root().join("proto/proto")
}

fn skip_or_fail(what: &str) -> Option<()> {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is missing, and CI is set: .ci/run must install it");
    }
    eprintln!("SKIPPED: {what} is missing (run .ci/run once to install it)");
    None
}

/// The virtualenv's python with grpcio and grpcio-tools.
fn python() -> Option<PathBuf> {
    let python = std::env::var_os("CITADEL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv-tools/bin/python"));
    let ok = std::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(python)
    } else {
        skip_or_fail(&format!(
            "{} with grpcio and grpcio-tools",
            python.display()
        ))
        .map(|()| python)
    }
}

/// The Node interop client, with `@grpc/grpc-js` installed beside it.
fn node_client() -> Option<PathBuf> {
    let dir = repo_root().join("tests/interop/node");
    let installed = dir.join("node_modules/@grpc/grpc-js").is_dir()
        && std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if installed {
        Some(dir.join("fetch_x509svid.js"))
    } else {
        skip_or_fail("node with @grpc/grpc-js in tests/interop/node/node_modules").map(|()| dir)
    }
}

/// Runs `program args…`, returning the JSON line it prints.
async fn run_client(program: &std::path::Path, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("the client did not finish within 60 s")
        .expect("the client could not be started");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

async fn python_call(h: &Harness, python: &std::path::Path, call: &str) -> serde_json::Value {
    let script = repo_root().join("tests/interop/python/workload_client.py");
    let proto = proto_root();
    run_client(
        python,
        &[
            script.as_os_str(),
            proto.as_os_str(),
            h.socket.as_os_str(),
            std::ffi::OsStr::new(call),
        ],
    )
    .await
}

/// An X509SVIDResponse as the clients print it: one SVID for WEB, with a
/// chain, a key and the bundle.
fn assert_svid_for_web(result: &serde_json::Value) {
    assert_eq!(result["code"], "OK", "{result}");
    let svids = result["svids"].as_array().expect("svids");
    assert_eq!(svids.len(), 1, "{result}");
    assert_eq!(svids[0]["spiffe_id"], WEB);
    for field in ["x509_svid_len", "x509_svid_key_len", "bundle_len"] {
        assert!(
            svids[0][field].as_u64().unwrap_or(0) > 0,
            "{field}: {result}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_fetches_x509_svid_with_its_default_authority() {
    let Some(python) = python() else { return };
    let h = Harness::start().await;
    assert_svid_for_web(&python_call(&h, &python, "x509svid").await);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_fetches_x509_bundles() {
    let Some(python) = python() else { return };
    let h = Harness::start().await;
    let result = python_call(&h, &python, "bundles").await;
    assert_eq!(result["code"], "OK", "{result}");
    let key = format!("spiffe://{TD}");
    assert!(
        result["bundles"][&key].as_u64().unwrap_or(0) > 0,
        "{result}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_streams_sds_secrets() {
    let Some(python) = python() else { return };
    let h = Harness::start().await;
    let result = python_call(&h, &python, "sds").await;
    assert_eq!(result["code"], "OK", "{result}");
    assert_eq!(result["type_url"], citadel_proto::SECRET_TYPE_URL);
    let secrets = result["secrets"].as_array().expect("secrets");
    assert_eq!(secrets.len(), 1, "{result}");
    assert_eq!(secrets[0]["name"], "default");
    assert!(
        secrets[0]["certificates"].as_u64().unwrap_or(0) >= 1,
        "{result}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_without_security_header_gets_invalid_argument() {
    let Some(python) = python() else { return };
    let h = Harness::start().await;
    let result = python_call(&h, &python, "no-header").await;
    assert_eq!(result["code"], "INVALID_ARGUMENT", "{result}");
    assert_eq!(
        h.manager.csrs_sent(),
        0,
        "nothing is issued for a refused call"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_grpc_js_fetches_x509_svid() {
    let Some(client) = node_client() else { return };
    let h = Harness::start().await;
    let proto = proto_root();
    let result = run_client(
        std::path::Path::new("node"),
        &[client.as_os_str(), proto.as_os_str(), h.socket.as_os_str()],
    )
    .await;
    assert_svid_for_web(&result);
    h.stop().await;
}

/// grpc-java and grpc-swift send the raw socket path as `:authority`;
/// grpc-js lets a client choose it, so it stands in for them here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_grpc_js_with_the_socket_path_as_authority_fetches_x509_svid() {
    let Some(client) = node_client() else { return };
    let h = Harness::start().await;
    let proto = proto_root();
    let result = run_client(
        std::path::Path::new("node"),
        &[
            client.as_os_str(),
            proto.as_os_str(),
            h.socket.as_os_str(),
            h.socket.as_os_str(),
        ],
    )
    .await;
    assert_svid_for_web(&result);
    h.stop().await;
}
