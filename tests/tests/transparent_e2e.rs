//! Transparent capture end to end, across network namespaces: two "pods" (a
//! namespace each on one bridge) with a plain HTTP server and client that know
//! nothing of TLS, a `citadel-proxy run --transparent` as its own uid, and the
//! rules of `citadel-proxy iptables --apply`; a third namespace with no proxy;
//! an address outside `--mesh-cidr`. The CA and the agent run in the host
//! namespace (the agent socket is reached by path). A `tcpdump` in the
//! bridge's namespace shows what crossed the wire.
//!
//! These tests need root, `ip`, `iptables` and `tcpdump`. Under `CI` they fail
//! when network namespaces cannot be made; elsewhere they skip loudly.

use std::net::SocketAddr;
use std::path::Path;

use citadel_e2e::mesh::{
    AgentOptions, AgentProcess, CitadelProxyProcess, MESH_API, MESH_API_UID, MESH_WEB,
    MESH_WEB_UID, create_join_token, start_ca_with_policies, web_api_entries,
};
use citadel_e2e::netns::{
    Capture, Lan, Netns, echo_app, echo_in, eventually, http_app, http_get_in, netns_available,
};
use citadel_e2e::process::binary;

/// Whether to run: `false` (after a loud message) only outside CI.
fn can_run() -> bool {
    match netns_available() {
        Ok(()) => true,
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but network namespaces cannot be created: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: transparent capture tests need network namespaces ({why})");
            false
        }
    }
}

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: shop-mtls, namespace: shop}
spec: {mtls: {mode: STRICT}}
";

const PERMISSIVE: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: shop-mtls, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
";

const DENY_WEB: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-deny-web, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]
";

const MESH_CIDR: &str = "10.77.0.0/25";

fn apply_rules(pod: &Netns, uid: u32) {
    let uid = uid.to_string();
    let proxy = binary("citadel-proxy");
    let proxy = proxy.to_str().unwrap();
    pod.exec(&[proxy, "iptables", "--apply", "--proxy-uid", &uid])
        .unwrap();
}

fn transparent_proxy(
    dir: &Path,
    pod: &Netns,
    name: &str,
    uid: u32,
    agent_socket: &Path,
    extra: &[String],
) -> CitadelProxyProcess {
    let mut args: Vec<String> = ["--transparent", "--mesh-cidr", MESH_CIDR]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend_from_slice(extra);
    let mut p =
        CitadelProxyProcess::spawn_in(pod.name(), dir, name, Some(uid), agent_socket, &args)
            .unwrap();
    p.wait_ready_in(pod.name(), 30).unwrap();
    p
}

fn write_policies(dir: &Path, yaml: &str) {
    // Written whole then renamed, so the CA never reads half a file.
    let tmp = dir.join(".next.tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, dir.join("mesh.yaml")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_between_netns_pods_is_mutual_tls_authorized_and_captured() {
    if !can_run() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ca, policies) = start_ca_with_policies(tmp.path(), "mesh.yaml", STRICT, &[])
        .await
        .unwrap();
    let token = create_join_token(&ca.data_dir, "node-a", &[MESH_WEB, MESH_API], "10m").unwrap();
    let entries = web_api_entries();
    let agent = AgentProcess::start(
        &ca,
        &AgentOptions::new(&tmp.path().join("agent"), &entries, Some(&token)),
    )
    .await
    .unwrap();

    let mut lan = Lan::create().unwrap();
    let a = lan.add_pod("a", 2).unwrap();
    let b = lan.add_pod("b", 3).unwrap();
    let c = lan.add_pod("c", 4).unwrap();
    let x = lan.add_pod("x", 200).unwrap();
    let (pod_a, ip_a) = (&lan.pods[a].0, lan.pods[a].1);
    let (pod_b, ip_b) = (&lan.pods[b].0, lan.pods[b].1);
    let pod_c = &lan.pods[c].0;
    let (pod_x, ip_x) = (&lan.pods[x].0, lan.pods[x].1);

    http_app(pod_a.name(), 8080, "A").unwrap();
    http_app(pod_b.name(), 8080, "B").unwrap();
    echo_app(pod_b.name(), 9000).unwrap();
    let outside_seen = http_app(pod_x.name(), 8080, "X").unwrap();

    apply_rules(pod_a, MESH_WEB_UID);
    apply_rules(pod_b, MESH_API_UID);
    // Secure naming for A: B's address must present api's identity.
    let peers = tmp.path().join("peers-a");
    std::fs::write(&peers, format!("{ip_b} {MESH_API}\n")).unwrap();
    let peers_flag = vec!["--peers".to_owned(), peers.display().to_string()];
    let proxy_a = transparent_proxy(
        tmp.path(),
        pod_a,
        "proxy-a",
        MESH_WEB_UID,
        &agent.socket,
        &peers_flag,
    );
    let proxy_b = transparent_proxy(
        tmp.path(),
        pod_b,
        "proxy-b",
        MESH_API_UID,
        &agent.socket,
        &[],
    );
    let logs = || {
        format!(
            "proxy A:\n{}\nproxy B:\n{}",
            proxy_a.log_text(),
            proxy_b.log_text()
        )
    };

    let b_app = SocketAddr::from((ip_b, 8080));
    let x_app = SocketAddr::from((ip_x, 8080));
    let mut capture = Capture::start(&lan.switch, "any", &tmp.path().join("wire.pcap")).unwrap();

    // A's plain client dials B's address and gets B's answer; B's proxy saw A's identity.
    let (status, body) = http_get_in(pod_a.name(), b_app, "/hello")
        .unwrap_or_else(|e| panic!("A -> B failed: {e:#}\n{}", logs()));
    assert_eq!(status, 200, "{body}\n{}", logs());
    assert!(body.starts_with("pod=B "), "{body}");
    assert!(
        body.contains(&format!("URI={MESH_WEB}")) && body.contains(&format!("By={MESH_API}")),
        "B's proxy did not pass A's SPIFFE ID: {body}"
    );
    let metrics = proxy_b.metrics_in(pod_b.name()).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("citadel_proxy_inbound_requests_total")
                && l.contains("source_principal=\"cluster.local/ns/shop/sa/web\"")
                && l.contains("destination_port=\"8080\"")
                && l.contains("decision=\"allow\"")),
        "{metrics}"
    );

    // Outside --mesh-cidr: through A's proxy unchanged, in plaintext.
    let (status, body) = http_get_in(pod_a.name(), x_app, "/outside")
        .unwrap_or_else(|e| panic!("A -> outside failed: {e:#}\n{}", logs()));
    assert_eq!((status, body.as_str()), (200, "pod=X xfcc=- path=/outside"));
    assert!(
        outside_seen
            .lock()
            .unwrap()
            .iter()
            .any(|h| h.starts_with("GET /outside HTTP/1.1"))
    );

    let segments = capture.stop().unwrap();
    let a_to_b: Vec<_> = segments
        .iter()
        .filter(|s| s.src.ip() == ip_a && s.dst == b_app)
        .collect();
    assert!(
        !a_to_b.is_empty(),
        "no A -> B:8080 traffic captured; flows seen: {:?}",
        segments
            .iter()
            .map(|s| (s.src, s.dst))
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert_eq!(
        a_to_b[0].payload.first(),
        Some(&0x16),
        "the first bytes A sent to B are not a TLS handshake record"
    );
    for s in segments
        .iter()
        .filter(|s| [s.src.ip(), s.dst.ip()].contains(&std::net::IpAddr::V4(ip_b)))
    {
        let text = String::from_utf8_lossy(&s.payload);
        assert!(
            !text.contains("HTTP/1.1") && !text.contains("/hello") && !text.contains("pod=B"),
            "plaintext HTTP between A and B on the wire: {text:?}"
        );
    }
    assert!(
        segments.iter().any(|s| s.src.ip() == ip_a
            && s.dst == x_app
            && s.payload.starts_with(b"GET /outside HTTP/1.1")),
        "the request to the address outside the mesh was not plain HTTP on the wire"
    );

    // STRICT: a client in a namespace without a proxy is refused.
    let refused = http_get_in(pod_c.name(), b_app, "/strict");
    assert!(
        refused.is_err(),
        "plaintext got through STRICT: {refused:?}"
    );

    // An AuthorizationPolicy denying A's identity: 403 in A's client.
    write_policies(&policies, &format!("{STRICT}---\n{DENY_WEB}"));
    let denied = eventually(20, || {
        let got = http_get_in(pod_a.name(), b_app, "/hello")?;
        anyhow::ensure!(got.0 == 403, "still {got:?}");
        Ok(got)
    })
    .unwrap_or_else(|e| panic!("no 403: {e:#}\n{}", logs()));
    assert_eq!(denied.1, "RBAC: access denied");

    // PERMISSIVE: the client without a proxy gets through in plaintext, and
    // bytes that are neither TLS nor HTTP pass as opaque TCP.
    write_policies(&policies, PERMISSIVE);
    let (status, body) = eventually(20, || http_get_in(pod_c.name(), b_app, "/permissive"))
        .unwrap_or_else(|e| panic!("PERMISSIVE refused plaintext: {e:#}\n{}", logs()));
    assert_eq!(status, 200);
    assert_eq!(body, "pod=B xfcc=- path=/permissive");
    let opaque = b"\x00\x01\x02 neither TLS nor HTTP \xff\xfe";
    let back = echo_in(pod_c.name(), SocketAddr::from((ip_b, 9000)), opaque)
        .unwrap_or_else(|e| panic!("opaque bytes refused: {e:#}\n{}", logs()));
    assert_eq!(back, opaque);

    drop(proxy_a);
    drop(proxy_b);
    drop(lan);
    drop(agent);
}

#[test]
fn rejects_redirect_loop_even_when_the_rules_capture_the_proxy_itself() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut lan = Lan::create().unwrap();
    let a = lan.add_pod("la", 2).unwrap();
    let x = lan.add_pod("lx", 200).unwrap();
    let (pod_a, pod_x, ip_x) = (&lan.pods[a].0, &lan.pods[x].0, lan.pods[x].1);
    http_app(pod_x.name(), 8080, "X").unwrap();
    // Wrong on purpose: the proxy runs as MESH_WEB_UID, the rules exclude
    // another uid, so the proxy's own upstream connection is captured again.
    apply_rules(pod_a, 4242);
    // No agent: capture needs none to refuse a loop.
    let mut args: Vec<String> = ["--transparent", "--mesh-cidr", MESH_CIDR]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push("--connect-timeout-secs".to_owned());
    args.push("2".to_owned());
    let proxy = CitadelProxyProcess::spawn_in(
        pod_a.name(),
        tmp.path(),
        "proxy-loop",
        Some(MESH_WEB_UID),
        &tmp.path().join("no-agent.sock"),
        &args,
    )
    .unwrap();
    // The capture listeners are up once the outbound port accepts.
    eventually(10, || {
        anyhow::ensure!(
            proxy.log_text().contains("proxy listening"),
            "not listening yet"
        );
        Ok(())
    })
    .unwrap();
    let started = std::time::Instant::now();
    let got = http_get_in(pod_a.name(), SocketAddr::from((ip_x, 8080)), "/loop");
    assert!(got.is_err(), "got an answer through a loop: {got:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the looping connection was not refused at once"
    );
    let metrics = proxy.metrics_in(pod_a.name()).unwrap();
    let loops: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("outcome=\"loop\""))
        .collect();
    assert_eq!(loops.len(), 1, "{metrics}");
    assert!(loops[0].ends_with(" 1"), "the loop went round: {loops:?}");
    assert!(
        proxy.log_text().contains("refused as a redirect loop"),
        "{}",
        proxy.log_text()
    );
}

#[test]
fn iptables_apply_is_idempotent_and_clean_removes_every_rule() {
    if !can_run() {
        return;
    }
    let pod = Netns::create("ipt").unwrap();
    let save = || {
        let out = pod.exec(&["iptables-save", "-t", "nat"]).unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let before = save();
    apply_rules(&pod, 1337);
    let once = save();
    assert!(
        once.iter()
            .any(|l| l == "-A OUTPUT -p tcp -j CITADEL_OUTPUT"),
        "{once:?}"
    );
    assert!(
        once.iter()
            .any(|l| l == "-A CITADEL_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
        "{once:?}"
    );
    apply_rules(&pod, 1337);
    assert_eq!(save(), once, "a second --apply changed the rules");
    let proxy = binary("citadel-proxy");
    pod.exec(&[proxy.to_str().unwrap(), "iptables", "--clean"])
        .unwrap();
    let cleaned = save();
    assert!(
        !cleaned.iter().any(|l| l.contains("CITADEL")),
        "{cleaned:?}"
    );
    assert_eq!(cleaned, before);
    pod.exec(&[proxy.to_str().unwrap(), "iptables", "--clean"])
        .unwrap();
}
