//! A TLS client that authenticates a server by SPIFFE rules (chain to the
//! trust bundle, any SPIFFE ID; no DNS name) and presents a client
//! certificate, for talking to mesh listeners.

use std::net::SocketAddr;
use std::sync::Arc;

use citadel_identity::TrustBundle;
use citadel_tls::{ExpectedServer, SharedBundle, SpiffeServerVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /` over mutual TLS: the HTTP status and body, or the TLS/IO error.
pub async fn mtls_get(
    addr: SocketAddr,
    bundle: &TrustBundle,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<(u16, String)> {
    let provider = citadel_tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            SharedBundle::new(bundle.clone()),
            ExpectedServer::AnyInTrustDomain,
            provider,
        )))
        .with_client_auth_cert(chain, key)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("mesh.local")?, tcp)
        .await?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: mesh.local\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await?;
    crate::process::parse_http_response(&buf)
}
