//! TLS for the CSR API: rustls, TLS 1.3 with AES-GCM suites, ALPN `h2`, a
//! hot-swappable serving certificate, and optional client certificates
//! (the pieces come from `citadel-tls`).

use std::sync::Arc;

use citadel_tls::PossessionOnlyClientVerifier;
pub use citadel_tls::{CertResolver, provider};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;

/// The server configuration of the CSR API.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    resolver: Arc<CertResolver>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(PossessionOnlyClientVerifier::new(provider)))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
