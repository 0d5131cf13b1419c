//! Real TLS 1.3 handshakes (in memory) between configurations built from
//! the crate's verifiers and resolver: each SPIFFE rule of mesh TLS is a
//! named case.

use std::sync::Arc;

use citadel_identity::SpiffeId;
use citadel_tls::testing::{TestCa, TestSvid};
use citadel_tls::{
    CertResolver, ExpectedServer, SharedBundle, SpiffeClientVerifier, SpiffeServerVerifier,
    peer_spiffe_id, provider,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "cluster.local";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

struct Side {
    resolver: Arc<CertResolver>,
    bundle: SharedBundle,
}

impl Side {
    fn new(svid: Option<&TestSvid>, bundle: SharedBundle) -> Side {
        let resolver = Arc::new(CertResolver::new(provider()));
        if let Some(s) = svid {
            resolver.set(s.chain.clone(), s.key_pkcs8.clone()).unwrap();
        }
        Side { resolver, bundle }
    }

    fn server_config(&self, mandatory: bool) -> Arc<rustls::ServerConfig> {
        let p = provider();
        let config = rustls::ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                self.bundle.clone(),
                mandatory,
                p,
            )))
            .with_cert_resolver(self.resolver.clone());
        Arc::new(config)
    }

    fn client_config(&self, expected: ExpectedServer) -> Arc<rustls::ClientConfig> {
        let p = provider();
        let config = rustls::ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                self.bundle.clone(),
                expected,
                p,
            )))
            .with_client_cert_resolver(self.resolver.clone());
        Arc::new(config)
    }
}

type ClientStream = tokio_rustls::client::TlsStream<tokio::io::DuplexStream>;
type ServerStream = tokio_rustls::server::TlsStream<tokio::io::DuplexStream>;

/// Connects; on success returns both ends.
async fn connect(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Result<(ClientStream, ServerStream), String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    let name = ServerName::try_from("mesh.local").unwrap();
    let (c, s) = tokio::join!(connector.connect(name, a), acceptor.accept(b));
    match (c, s) {
        (Ok(c), Ok(s)) => Ok((c, s)),
        (c, s) => Err(format!(
            "client: {:?}; server: {:?}",
            c.err().map(|e| e.to_string()),
            s.err().map(|e| e.to_string())
        )),
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn server_seen_client(s: &ServerStream) -> Option<SpiffeId> {
    peer_spiffe_id(s.get_ref().1.peer_certificates())
}

#[tokio::test]
async fn accepts_svids_of_our_trust_domain_both_ways() {
    let ca = TestCa::new(TD, "root");
    let bundle = SharedBundle::new(ca.bundle());
    let server = Side::new(Some(&ca.svid(API)), bundle.clone());
    let client = Side::new(Some(&ca.svid(WEB)), bundle);
    let (c, s) = connect(
        server.server_config(true),
        client.client_config(ExpectedServer::Exactly(id(API))),
    )
    .await
    .unwrap();
    assert_eq!(server_seen_client(&s), Some(id(WEB)));
    assert_eq!(
        peer_spiffe_id(c.get_ref().1.peer_certificates()),
        Some(id(API))
    );
}

#[tokio::test]
async fn rejects_server_with_another_spiffe_id_than_expected() {
    let ca = TestCa::new(TD, "root");
    let bundle = SharedBundle::new(ca.bundle());
    let server = Side::new(Some(&ca.svid(API)), bundle.clone());
    let client = Side::new(Some(&ca.svid(WEB)), bundle);
    let err = connect(
        server.server_config(true),
        client.client_config(ExpectedServer::Exactly(id(WEB))),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("expected spiffe://cluster.local/ns/shop/sa/web"),
        "{err}"
    );
}

#[tokio::test]
async fn rejects_server_from_a_foreign_root() {
    let ours = TestCa::new(TD, "ours");
    let foreign = TestCa::new(TD, "foreign");
    let server = Side::new(
        Some(&foreign.svid(API)),
        SharedBundle::new(foreign.bundle()),
    );
    let client = Side::new(Some(&ours.svid(WEB)), SharedBundle::new(ours.bundle()));
    assert!(
        connect(
            server.server_config(false),
            client.client_config(ExpectedServer::AnyInTrustDomain)
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn rejects_client_from_a_foreign_root() {
    let ours = TestCa::new(TD, "ours");
    let foreign = TestCa::new(TD, "foreign");
    let server = Side::new(Some(&ours.svid(API)), SharedBundle::new(ours.bundle()));
    // The client trusts our root, but presents a certificate of another.
    let client = Side::new(Some(&foreign.svid(WEB)), SharedBundle::new(ours.bundle()));
    let err = connect(
        server.server_config(true),
        client.client_config(ExpectedServer::AnyInTrustDomain),
    )
    .await
    .unwrap_err();
    assert!(err.contains("server: Some"), "{err}");
}

#[tokio::test]
async fn rejects_client_of_another_trust_domain() {
    let ca = TestCa::new(TD, "root");
    let bundle = SharedBundle::new(ca.bundle());
    let server = Side::new(Some(&ca.svid(API)), bundle.clone());
    let client = Side::new(Some(&ca.svid("spiffe://other.example/ns/a/sa/b")), bundle);
    let err = connect(
        server.server_config(true),
        client.client_config(ExpectedServer::AnyInTrustDomain),
    )
    .await
    .unwrap_err();
    assert!(err.contains("server: Some"), "{err}");
}

#[tokio::test]
async fn rejects_certificate_with_two_uri_sans() {
    let ca = TestCa::new(TD, "root");
    let bundle = SharedBundle::new(ca.bundle());
    let server = Side::new(Some(&ca.leaf_with_uris(&[API, WEB])), bundle.clone());
    let client = Side::new(Some(&ca.svid(WEB)), bundle);
    assert!(
        connect(
            server.server_config(false),
            client.client_config(ExpectedServer::AnyInTrustDomain)
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn rejects_client_without_certificate_when_mandatory() {
    let ca = TestCa::new(TD, "root");
    let bundle = SharedBundle::new(ca.bundle());
    let server = Side::new(Some(&ca.svid(API)), bundle.clone());
    let client = Side::new(None, bundle);
    assert!(
        connect(
            server.server_config(true),
            client.client_config(ExpectedServer::AnyInTrustDomain)
        )
        .await
        .is_err()
    );
    // Optional: accepted, and the server sees no identity.
    let (_c, s) = connect(
        server.server_config(false),
        client.client_config(ExpectedServer::AnyInTrustDomain),
    )
    .await
    .unwrap();
    assert_eq!(server_seen_client(&s), None);
}

#[tokio::test]
async fn refuses_every_peer_before_a_bundle_is_set() {
    let ca = TestCa::new(TD, "root");
    let server = Side::new(Some(&ca.svid(API)), SharedBundle::new(ca.bundle()));
    let client = Side::new(Some(&ca.svid(WEB)), SharedBundle::default());
    assert!(
        connect(
            server.server_config(true),
            client.client_config(ExpectedServer::AnyInTrustDomain)
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn new_bundle_applies_to_the_next_handshake() {
    let old = TestCa::new(TD, "old");
    let new = TestCa::new(TD, "new");
    let server_bundle = SharedBundle::new(old.bundle());
    let server = Side::new(Some(&old.svid(API)), server_bundle.clone());
    let client = Side::new(Some(&new.svid(WEB)), SharedBundle::new(old.bundle()));
    let (server_cfg, client_cfg) = (
        server.server_config(true),
        client.client_config(ExpectedServer::AnyInTrustDomain),
    );
    assert!(
        connect(server_cfg.clone(), client_cfg.clone())
            .await
            .is_err()
    );
    // Both roots trusted (a rotation in progress): the same configs now work.
    let mut both = old.bundle().roots().to_vec();
    both.extend(new.bundle().roots().iter().cloned());
    server_bundle.set(
        citadel_identity::TrustBundle::new(old.bundle().trust_domain().clone(), both).unwrap(),
    );
    connect(server_cfg, client_cfg).await.unwrap();
}

#[tokio::test]
async fn new_certificate_applies_to_the_next_handshake_and_open_connections_go_on() {
    let ca = TestCa::new(TD, "root");
    let bundle = SharedBundle::new(ca.bundle());
    let server = Side::new(Some(&ca.svid(API)), bundle.clone());
    let client = Side::new(Some(&ca.svid(WEB)), bundle);
    let (server_cfg, client_cfg) = (
        server.server_config(true),
        client.client_config(ExpectedServer::AnyInTrustDomain),
    );
    let (mut c, mut s) = connect(server_cfg.clone(), client_cfg.clone())
        .await
        .unwrap();
    let first = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    let renewed = ca.svid(WEB);
    client
        .resolver
        .set(renewed.chain.clone(), renewed.key_pkcs8.clone())
        .unwrap();
    // The open connection keeps working.
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    // The next handshake presents the new certificate.
    let (_c2, s2) = connect(server_cfg, client_cfg).await.unwrap();
    let second = s2.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(first, second);
    assert_eq!(second, renewed.chain[0]);
}

#[test]
fn resolver_refuses_a_key_it_cannot_use_and_keeps_the_current_one() {
    let ca = TestCa::new(TD, "root");
    let svid = ca.svid(WEB);
    let resolver = CertResolver::new(provider());
    resolver
        .set(svid.chain.clone(), svid.key_pkcs8.clone())
        .unwrap();
    assert!(
        resolver
            .set(svid.chain.clone(), b"not a key".to_vec())
            .is_err()
    );
    assert!(resolver.current().is_some());
    resolver.clear();
    assert!(resolver.current().is_none());
}
