//! Setup shared by the proxy's integration tests: identities, a policy state, an
//! echo application, the in-process proxy with a test CA's certificate, a mesh
//! client, and small socket helpers.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use citadel_identity::SpiffeId;
use citadel_policy::{MeshConfig, load_str};
use citadel_proxy::app::{Inputs, RunningProxy, start_with};
use citadel_proxy::config::ProxyConfig;
use citadel_proxy::decide::PolicyState;
use citadel_tls::testing::TestCa;
use citadel_tls::{CertResolver, ExpectedServer, SharedBundle, SpiffeServerVerifier, provider};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

pub const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";

/// The policy state of workload `id` (namespace shop, labels app=`app`) with `yaml`.
pub fn state(id: &str, app: &str, version: &str, yaml: &str) -> Arc<PolicyState> {
    Arc::new(PolicyState {
        version: version.to_owned(),
        spiffe_id: id.to_owned(),
        namespace: "shop".to_owned(),
        labels: vec![("app".to_owned(), app.to_owned())],
        set: load_str("test.yaml", yaml, &MeshConfig::default()).unwrap(),
    })
}

/// An application that echoes every byte; returns its port.
pub async fn echo_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// A port nothing listens on.
pub async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// A proxy configuration on `agent_socket`, listening on 127.0.0.1 with its admin
/// on a free port.
pub fn local_config(agent_socket: PathBuf) -> ProxyConfig {
    let mut config = ProxyConfig::new(agent_socket);
    config.inbound_bind = [127, 0, 0, 1].into();
    config.admin = "127.0.0.1:0".parse().unwrap();
    config
}

/// A certificate resolver holding `ca`'s SVID for `id`.
pub fn svid_certs(ca: &TestCa, id: &str) -> Arc<CertResolver> {
    let svid = ca.svid(id);
    let certs = Arc::new(CertResolver::new(provider()));
    certs.set(svid.chain, svid.key_pkcs8).unwrap();
    certs
}

/// An in-process proxy fed directly: its certificate, bundle and policy.
pub struct Proxy {
    pub running: RunningProxy,
    pub policy: watch::Sender<Option<Arc<PolicyState>>>,
    pub certs: Arc<CertResolver>,
    pub bundle: SharedBundle,
}

impl Proxy {
    pub fn inbound(&self) -> SocketAddr {
        self.running.inbound[0].1
    }
}

/// Starts `config` for `id` (labels app=`app`, policy `yaml` as v1) holding a
/// certificate from `ca` and trusting `ca`'s bundle.
pub async fn start_proxy(
    ca: &TestCa,
    id: &str,
    app: &str,
    yaml: &str,
    config: ProxyConfig,
) -> Proxy {
    let certs = svid_certs(ca, id);
    let (tx, rx) = watch::channel(Some(state(id, app, "v1", yaml)));
    let bundle = SharedBundle::new(ca.bundle());
    let inputs = Inputs {
        certs: certs.clone(),
        bundle: bundle.clone(),
        policy: rx,
        not_after: Arc::new(AtomicI64::new(0)),
    };
    Proxy {
        running: start_with(config, inputs).await.unwrap(),
        policy: tx,
        certs,
        bundle,
    }
}

/// A mesh client for `id` with a certificate from `ca`, trusting `trust`'s roots,
/// expecting the server to be API and offering `alpn`.
pub fn client_with(ca: &TestCa, trust: &TestCa, id: &str, alpn: &[&[u8]]) -> TlsConnector {
    let certs = svid_certs(ca, id);
    let verifier = SpiffeServerVerifier::new(
        SharedBundle::new(trust.bundle()),
        ExpectedServer::Exactly(SpiffeId::parse(API).unwrap()),
        provider(),
    );
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(certs);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// Whether the peer closes `s` (EOF or error) within `secs`; bytes before the end
/// (a TLS alert) are read and ignored.
pub async fn closed_by_peer<S: AsyncRead + Unpin>(s: &mut S, secs: u64) -> bool {
    let mut buf = [0u8; 1024];
    let until_closed = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), until_closed)
        .await
        .is_ok()
}

/// `GET path` with `Connection: close`; the whole answer as text.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
