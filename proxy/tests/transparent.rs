//! Transparent capture in-process on 127.0.0.1, with the original destination
//! given by the fake of the `SO_ORIGINAL_DST` seam (the real one needs iptables:
//! see `tests/tests/transparent_e2e.rs`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use citadel_identity::SpiffeId;
use citadel_proxy::app::{Inputs, RunningProxy, start_with_original_dst};
use citadel_proxy::config::TransparentConfig;
use citadel_proxy::original_dst::FixedOriginalDst;
use citadel_tls::SharedBundle;
use citadel_tls::testing::TestCa;
use support::{API, WEB, closed_by_peer, echo_app, local_config, state, svid_certs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const PERMISSIVE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: both, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
"#;

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#;

const NO_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"#;

struct Proxy {
    running: RunningProxy,
    _policy: watch::Sender<Option<Arc<citadel_proxy::decide::PolicyState>>>,
}

impl Proxy {
    fn capture_in(&self) -> SocketAddr {
        self.running.capture.unwrap().0
    }
    fn capture_out(&self) -> SocketAddr {
        self.running.capture.unwrap().1
    }
    fn metrics(&self) -> String {
        self.running.metrics.encode()
    }
}

/// A transparent proxy for `id` whose captured connections all had `original`
/// as their destination.
async fn transparent(
    ca: &TestCa,
    id: &str,
    app: &str,
    yaml: &str,
    t: TransparentConfig,
    original: Result<SocketAddr, std::io::ErrorKind>,
) -> Proxy {
    let mut config = local_config("/nonexistent".into());
    config.handshake_timeout = Duration::from_secs(2);
    config.transparent = Some(t);
    let (tx, rx) = watch::channel(Some(state(id, app, "v1", yaml)));
    let inputs = Inputs {
        certs: svid_certs(ca, id),
        bundle: SharedBundle::new(ca.bundle()),
        policy: rx,
        not_after: Arc::new(AtomicI64::new(0)),
    };
    let running = start_with_original_dst(config, inputs, Arc::new(FixedOriginalDst(original)))
        .await
        .unwrap();
    Proxy {
        running,
        _policy: tx,
    }
}

fn ephemeral() -> TransparentConfig {
    TransparentConfig {
        inbound_port: 0,
        outbound_port: 0,
        mesh_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
        ..TransparentConfig::default()
    }
}

/// An HTTP/1.1 application answering `200 path=<path> xfcc=<header or ->`.
async fn http_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if !matches!(s.read(&mut b).await, Ok(1)) {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let text = String::from_utf8_lossy(&head).to_lowercase();
                    let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let xfcc = text
                        .lines()
                        .find_map(|l| l.strip_prefix("x-forwarded-client-cert:"))
                        .map_or("-".to_owned(), |v| v.trim().to_owned());
                    let body = format!("path={path} xfcc={xfcc}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(answer.as_bytes()).await.is_err()
                        || text.contains("connection: close")
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    out
}

#[tokio::test]
async fn rejects_a_captured_connection_whose_original_destination_cannot_be_read() {
    let ca = TestCa::new("cluster.local", "root");
    let p = transparent(
        &ca,
        API,
        "api",
        PERMISSIVE,
        ephemeral(),
        Err(std::io::ErrorKind::NotFound),
    )
    .await;
    for addr in [p.capture_in(), p.capture_out()] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(
            closed_by_peer(&mut s, 3).await,
            "{addr} kept the connection"
        );
    }
    let m = p.metrics();
    assert!(
        m.contains(r#"citadel_proxy_captured_connections_total{direction="inbound",outcome="no_original_dst"} 1"#)
            && m.contains(r#"citadel_proxy_captured_connections_total{direction="outbound",outcome="no_original_dst"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn rejects_a_captured_connection_whose_original_destination_is_a_capture_listener() {
    // A connection straight to the capture port (no NAT): forwarding it would
    // connect the proxy to itself, again and again.
    let ca = TestCa::new("cluster.local", "root");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut t = ephemeral();
    t.outbound_port = port;
    let own = SocketAddr::from(([127, 0, 0, 1], port));
    let p = transparent(&ca, WEB, "web", PERMISSIVE, t, Ok(own)).await;
    let mut s = TcpStream::connect(p.capture_out()).await.unwrap();
    let _ = s.write_all(b"ping").await;
    assert!(closed_by_peer(&mut s, 3).await);
    let m = p.metrics();
    assert!(
        m.contains(
            r#"citadel_proxy_captured_connections_total{direction="outbound",outcome="loop"} 1"#
        ),
        "{m}"
    );
    assert!(!m.contains(r#"outcome="mesh""#), "{m}");
}

#[tokio::test]
async fn captured_inbound_http_is_detected_and_decided_per_request() {
    let ca = TestCa::new("cluster.local", "root");
    let app = http_app().await;
    let p = transparent(
        &ca,
        API,
        "api",
        &format!("{PERMISSIVE}---\n{NO_ADMIN}"),
        ephemeral(),
        Ok(app),
    )
    .await;
    let ok = get(p.capture_in(), "/info").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with("path=/info xfcc=-"), "{ok}");
    let denied = get(p.capture_in(), "/admin").await;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(denied.ends_with("RBAC: access denied"), "{denied}");
}

#[tokio::test]
async fn tcp_ports_are_never_sniffed_for_http() {
    let ca = TestCa::new("cluster.local", "root");
    let app = http_app().await;
    let mut t = ephemeral();
    t.tcp_ports = vec![app.port()];
    let p = transparent(
        &ca,
        API,
        "api",
        &format!("{PERMISSIVE}---\n{NO_ADMIN}"),
        t,
        Ok(app),
    )
    .await;
    // Opaque TCP: one decision per connection without HTTP attributes, so the
    // DENY rule on paths matches everything (Istio's rule for HTTP-only fields
    // on TCP), and even `/info`, answered on a sniffed port, is refused.
    let refused = get(p.capture_in(), "/info").await;
    assert!(refused.is_empty(), "{refused}");
    let m = p.metrics();
    assert!(
        m.contains(&format!(
            r#"citadel_proxy_inbound_connections_total{{source_principal="plaintext",destination_port="{}",decision="deny"}} 1"#,
            app.port()
        )),
        "{m}"
    );
}

#[tokio::test]
async fn opaque_bytes_on_permissive_pass_as_tcp_when_policy_allows() {
    let ca = TestCa::new("cluster.local", "root");
    let echo = SocketAddr::from(([127, 0, 0, 1], echo_app().await));
    let p = transparent(&ca, API, "api", PERMISSIVE, ephemeral(), Ok(echo)).await;
    let bytes = b"\x00\x01\x02 neither TLS nor HTTP \xff";
    let mut s = TcpStream::connect(p.capture_in()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, bytes);
    // The same bytes on STRICT are refused.
    let strict = transparent(&ca, API, "api", STRICT, ephemeral(), Ok(echo)).await;
    let mut s = TcpStream::connect(strict.capture_in()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    assert!(closed_by_peer(&mut s, 3).await);
}

#[tokio::test]
async fn captured_outbound_originates_mtls_to_mesh_peers_with_secure_naming() {
    let ca = TestCa::new("cluster.local", "root");
    let app = http_app().await;
    let api = transparent(&ca, API, "api", STRICT, ephemeral(), Ok(app)).await;
    // Web's outbound: every captured connection was for api's inbound capture
    // (as if iptables on api's side had redirected it there).
    let web = transparent(&ca, WEB, "web", STRICT, ephemeral(), Ok(api.capture_in())).await;
    let answer = get(web.capture_out(), "/hello").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&format!("xfcc=by={API};uri={WEB}")),
        "api's proxy did not see web's identity: {answer}"
    );

    // --peers pins the address to another identity: api's certificate is refused.
    let mut t = ephemeral();
    t.peers = vec![(
        [127, 0, 0, 1].into(),
        SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/other").unwrap(),
    )];
    let pinned = transparent(&ca, WEB, "web", STRICT, t, Ok(api.capture_in())).await;
    let refused = get(pinned.capture_out(), "/hello").await;
    assert!(refused.is_empty(), "secure naming ignored: {refused}");

    // Outside --mesh-cidr the bytes pass unchanged (here: plaintext to STRICT api, refused,
    // while the same request straight to the app is answered).
    let mut t = ephemeral();
    t.mesh_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    let outside = transparent(&ca, WEB, "web", STRICT, t, Ok(app)).await;
    let plain = get(outside.capture_out(), "/plain").await;
    assert!(plain.ends_with("path=/plain xfcc=-"), "{plain}");
    assert!(outside.metrics().contains(
        r#"citadel_proxy_captured_connections_total{direction="outbound",outcome="passthrough"} 1"#
    ));
}
