//! The proxy in-process over real TCP and TLS on 127.0.0.1: certificates from a
//! test CA, policies fed directly (no agent), a small echo application.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use citadel_proxy::config::{parse_inbound, parse_outbound};
use citadel_tls::testing::TestCa;
use citadel_tls::{ExpectedServer, SharedBundle, SpiffeServerVerifier, provider};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use support::{
    API, OTHER, Proxy, WEB, client_with, closed_by_peer, dead_port, echo_app, http_get,
    local_config, start_proxy, state,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#;

const DISABLE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: off, namespace: shop}
spec: {mtls: {mode: DISABLE}}
"#;

const PERMISSIVE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: both, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
"#;

const ONLY_WEB: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-web, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
"#;

const DENY_WEB: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-web, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
"#;

/// A proxy for `id` (labels app=`app`) holding a certificate from `ca`.
async fn proxy(
    ca: &TestCa,
    id: &str,
    app: &str,
    yaml: &str,
    inbound: &[String],
    outbound: &[String],
) -> Proxy {
    let mut config = local_config("/nonexistent".into());
    config.handshake_timeout = Duration::from_secs(2);
    config.inbound = inbound.iter().map(|s| parse_inbound(s).unwrap()).collect();
    for spec in &mut config.inbound {
        spec.port = 0;
    }
    config.outbound = outbound
        .iter()
        .map(|s| parse_outbound(s).unwrap())
        .collect();
    for spec in &mut config.outbound {
        spec.local_port = 0;
    }
    start_proxy(ca, id, app, yaml, config).await
}

/// The api workload's proxy (labels app=api) with `yaml`, one inbound port in front
/// of a new echo application; its certificate from `ca`.
async fn api_proxy(ca: &TestCa, yaml: &str) -> Proxy {
    let app = echo_app().await;
    proxy(ca, API, "api", yaml, &inbound_to(app), &[]).await
}

/// A mesh client for `id` with a certificate from `ca`, trusting `trust`'s roots and
/// expecting the server to be API; it offers our ALPN, as a citadel-proxy does.
fn client(ca: &TestCa, trust: &TestCa, id: &str) -> TlsConnector {
    client_with(ca, trust, id, &citadel_tls::alpn::CLIENT)
}

/// Writes `ping` and expects it echoed.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), String> {
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"ping" => Ok(()),
        Ok(Ok(_)) => Err(format!("echoed {buf:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no echo within 3 s".to_owned()),
    }
}

async fn mtls_conn(
    addr: SocketAddr,
    c: &TlsConnector,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    c.connect(ServerName::try_from("api").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())
}

async fn mtls_echo(addr: SocketAddr, c: &TlsConnector) -> Result<(), String> {
    let mut s = mtls_conn(addr, c).await?;
    echo(&mut s).await
}

async fn plain_echo(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    echo(&mut s).await
}

fn inbound_to(app: u16) -> Vec<String> {
    vec![format!("1:{app}")]
}

#[tokio::test]
async fn strict_port_refuses_plaintext() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, STRICT).await;
    assert!(
        plain_echo(p.inbound()).await.is_err(),
        "plaintext got through"
    );
    mtls_echo(p.inbound(), &client(&ca, &ca, WEB))
        .await
        .unwrap();
}

#[tokio::test]
async fn strict_port_refuses_a_client_without_a_certificate() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, STRICT).await;
    let verifier = SpiffeServerVerifier::new(
        SharedBundle::new(ca.bundle()),
        ExpectedServer::AnyInTrustDomain,
        provider(),
    );
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let c = TlsConnector::from(Arc::new(config));
    assert!(mtls_echo(p.inbound(), &c).await.is_err());
}

#[tokio::test]
async fn permissive_port_accepts_mtls_and_plaintext() {
    let ca = TestCa::new("cluster.local", "root");
    let app = echo_app().await;
    for yaml in [PERMISSIVE, ""] {
        let p = proxy(&ca, API, "api", yaml, &inbound_to(app), &[]).await;
        mtls_echo(p.inbound(), &client(&ca, &ca, WEB))
            .await
            .unwrap();
        plain_echo(p.inbound()).await.unwrap();
    }
}

/// A ClientHello as a TLS client with no mesh ALPN sends it (no certificate needed
/// to write one), offering `alpn`.
fn plain_client_hello(alpn: &[&[u8]]) -> Vec<u8> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let mut c =
        rustls::ClientConnection::new(Arc::new(config), "app.example".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    c.write_tls(&mut hello).unwrap();
    hello
}

/// Sends `bytes` and reads what comes back within 2 s.
async fn send_and_read(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back)).await {
        Ok(Ok(_)) => back,
        _ => Vec::new(),
    }
}

#[tokio::test]
async fn permissive_port_passes_tls_without_a_mesh_alpn_through_to_the_app() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, PERMISSIVE).await;
    // The echo application gets the ClientHello itself: the proxy did not
    // terminate TLS that is not a mesh peer's.
    for alpn in [&[][..], &[b"h2".as_slice(), b"http/1.1"][..]] {
        let hello = plain_client_hello(alpn);
        assert_eq!(send_and_read(p.inbound(), &hello).await, hello, "{alpn:?}");
    }
    // A mesh client is still terminated, and knows its peer is a proxy.
    let s = mtls_conn(p.inbound(), &client(&ca, &ca, WEB))
        .await
        .unwrap();
    assert_eq!(
        s.get_ref().1.alpn_protocol(),
        Some(citadel_tls::alpn::CITADEL)
    );
}

#[tokio::test]
async fn strict_port_terminates_tls_without_a_mesh_alpn_and_requires_a_certificate() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, STRICT).await;
    let hello = plain_client_hello(&[]);
    let back = send_and_read(p.inbound(), &hello).await;
    assert_ne!(back, hello, "STRICT passed TLS through to the app");
}

#[tokio::test]
async fn disable_port_refuses_tls() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, DISABLE).await;
    assert!(
        mtls_echo(p.inbound(), &client(&ca, &ca, WEB))
            .await
            .is_err()
    );
    plain_echo(p.inbound()).await.unwrap();
}

#[tokio::test]
async fn port_level_mtls_sets_the_mode_of_that_app_port_only() {
    let ca = TestCa::new("cluster.local", "root");
    let (a, b) = (echo_app().await, echo_app().await);
    let yaml = format!(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: api, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  mtls: {{mode: STRICT}}
  portLevelMtls:
    {b}: {{mode: PERMISSIVE}}
"#
    );
    let p = proxy(
        &ca,
        API,
        "api",
        &yaml,
        &[format!("1:{a}"), format!("2:{b}")],
        &[],
    )
    .await;
    assert!(plain_echo(p.running.inbound[0].1).await.is_err());
    plain_echo(p.running.inbound[1].1).await.unwrap();
}

#[tokio::test]
async fn allow_and_deny_at_l4_by_source_principal() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, ONLY_WEB).await;
    mtls_echo(p.inbound(), &client(&ca, &ca, WEB))
        .await
        .unwrap();
    assert!(
        mtls_echo(p.inbound(), &client(&ca, &ca, OTHER))
            .await
            .is_err()
    );
    assert!(
        plain_echo(p.inbound()).await.is_err(),
        "plaintext has no principal"
    );
    let m = p.running.metrics.encode();
    assert!(
        m.contains(r#"source_principal="cluster.local/ns/shop/sa/other",destination_port=""#)
            && m.contains(r#"decision="deny""#),
        "{m}"
    );
    assert!(m.contains(r#"decision="allow""#), "{m}");
}

#[tokio::test]
async fn deny_policy_refuses_its_principal_and_allows_the_rest() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, DENY_WEB).await;
    assert!(
        mtls_echo(p.inbound(), &client(&ca, &ca, WEB))
            .await
            .is_err()
    );
    mtls_echo(p.inbound(), &client(&ca, &ca, OTHER))
        .await
        .unwrap();
}

#[tokio::test]
async fn outbound_refuses_a_server_with_another_spiffe_id() {
    let ca = TestCa::new("cluster.local", "root");
    let api = api_proxy(&ca, STRICT).await;
    let upstream = api.inbound();
    let web = proxy(
        &ca,
        WEB,
        "web",
        "",
        &[],
        &[
            format!("1=127.0.0.1:{},{API}", upstream.port()),
            format!(
                "2=127.0.0.1:{},spiffe://cluster.local/ns/shop/sa/db",
                upstream.port()
            ),
        ],
    )
    .await;
    // The right identity: plain bytes in, mTLS across, echoed back.
    plain_echo(web.running.outbound[0].1).await.unwrap();
    // The upstream is api, not db: refused.
    assert!(plain_echo(web.running.outbound[1].1).await.is_err());
}

#[tokio::test]
async fn client_with_a_foreign_root_is_refused() {
    let ca = TestCa::new("cluster.local", "root");
    let foreign = TestCa::new("cluster.local", "foreign root");
    let p = api_proxy(&ca, STRICT).await;
    assert!(
        mtls_echo(p.inbound(), &client(&foreign, &ca, WEB))
            .await
            .is_err()
    );
    mtls_echo(p.inbound(), &client(&ca, &ca, WEB))
        .await
        .unwrap();
}

#[tokio::test]
async fn client_of_another_trust_domain_is_refused() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, STRICT).await;
    let other_td = TestCa::new("example.org", "root");
    assert!(
        mtls_echo(
            p.inbound(),
            &client(&other_td, &ca, "spiffe://example.org/ns/shop/sa/web")
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_is_closed_and_others_still_served() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, STRICT).await;
    for garbage in [
        &[0x16u8, 0x03, 0xff, 0xff, 0xff, 0x00, 0x01, 0x02][..],
        b"\x00\x00\x00\x00\x00\x00\x00\x00",
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(p.inbound()).await.unwrap();
        s.write_all(garbage).await.unwrap();
        assert!(
            closed_by_peer(&mut s, 3).await,
            "{garbage:?} was not closed"
        );
    }
    // A half ClientHello header that never completes: closed by the handshake timeout.
    let mut s = TcpStream::connect(p.inbound()).await.unwrap();
    s.write_all(&[0x16]).await.unwrap();
    mtls_echo(p.inbound(), &client(&ca, &ca, WEB))
        .await
        .unwrap();
    assert!(closed_by_peer(&mut s, 3).await);
    mtls_echo(p.inbound(), &client(&ca, &ca, WEB))
        .await
        .unwrap();
}

#[tokio::test]
async fn policy_change_closes_a_now_denied_open_connection() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, "").await;
    let mut web = mtls_conn(p.inbound(), &client(&ca, &ca, WEB))
        .await
        .unwrap();
    echo(&mut web).await.unwrap();
    let mut other = mtls_conn(p.inbound(), &client(&ca, &ca, OTHER))
        .await
        .unwrap();
    echo(&mut other).await.unwrap();
    assert_eq!(p.running.registry.len(), 2);

    p.policy
        .send_replace(Some(state(API, "api", "v2", DENY_WEB)));
    assert!(
        closed_by_peer(&mut web, 3).await,
        "web's open connection stayed open"
    );
    echo(&mut other).await.unwrap();
    assert_eq!(p.running.registry.len(), 1);
    assert!(
        mtls_echo(p.inbound(), &client(&ca, &ca, WEB))
            .await
            .is_err()
    );
    let m = p.running.metrics.encode();
    assert!(m.contains(r#"decision="closed_by_policy""#), "{m}");
    assert!(m.contains(r#"version="v2""#), "{m}");
}

#[tokio::test]
async fn app_refusing_connections_closes_the_client_connection() {
    let ca = TestCa::new("cluster.local", "root");
    let app = dead_port().await;
    let p = proxy(&ca, API, "api", "", &inbound_to(app), &[]).await;
    let mut s = mtls_conn(p.inbound(), &client(&ca, &ca, WEB))
        .await
        .unwrap();
    let _ = s.write_all(b"ping").await;
    assert!(closed_by_peer(&mut s, 3).await);
    assert!(p.running.registry.is_empty());
}

#[tokio::test]
async fn ready_once_certificate_bundle_and_policy_are_held() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, "").await;
    let r = http_get(p.running.admin, "/healthz/ready").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    p.policy.send_replace(None);
    let r = http_get(p.running.admin, "/healthz/ready").await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("policy version"), "{r}");
    let m = http_get(p.running.admin, "/metrics").await;
    assert!(
        m.contains("citadel_proxy_certificate_expiry_seconds"),
        "{m}"
    );
}

#[tokio::test]
async fn rotation_applies_to_new_handshakes_without_dropping_open_connections() {
    let ca = TestCa::new("cluster.local", "root");
    let p = api_proxy(&ca, STRICT).await;
    let mut open = mtls_conn(p.inbound(), &client(&ca, &ca, WEB))
        .await
        .unwrap();
    echo(&mut open).await.unwrap();

    // A renewed certificate: served on the next handshake, the open connection untouched.
    let renewed = ca.svid(API);
    let renewed_leaf = renewed.chain[0].clone();
    p.certs.set(renewed.chain, renewed.key_pkcs8).unwrap();
    echo(&mut open).await.unwrap();
    let fresh = mtls_conn(p.inbound(), &client(&ca, &ca, WEB))
        .await
        .unwrap();
    assert_eq!(
        fresh
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first()),
        Some(&renewed_leaf)
    );

    // A new root: clients of the old one are refused from now on, the open one stays.
    let next = TestCa::new("cluster.local", "next root");
    let svid = next.svid(API);
    p.certs.set(svid.chain, svid.key_pkcs8).unwrap();
    p.bundle.set(next.bundle());
    assert!(
        mtls_echo(p.inbound(), &client(&ca, &next, WEB))
            .await
            .is_err()
    );
    mtls_echo(p.inbound(), &client(&next, &next, WEB))
        .await
        .unwrap();
    echo(&mut open).await.unwrap();
}
