//! Citadel's TLS pieces, one implementation each, shared by the CA, the
//! agent, the proxy and the test kit:
//!
//! - [`provider`]: the one rustls crypto provider (ring, TLS 1.3 AES-GCM);
//! - [`SharedBundle`]: the trust bundle of the moment, swapped on rotation;
//! - [`SpiffeServerVerifier`] / [`SpiffeClientVerifier`]: a peer is a valid
//!   X509-SVID of our trust domain chaining to the current bundle (and, for
//!   servers, the SPIFFE ID expected: secure naming);
//! - [`PossessionOnlyClientVerifier`]: the CA's "prove you hold the key,
//!   the chain is judged later" verifier;
//! - [`CertResolver`]: the certificate of the moment, for servers and
//!   clients, swapped on renewal without touching open connections;
//! - [`peer_spiffe_id`]: the verified peer's SPIFFE ID after a handshake;
//! - [`alpn`]: the ALPN values of mesh connections.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod alpn;
mod bundle;
mod resolver;
mod verifier;

#[cfg(feature = "test-util")]
pub mod testing;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub use bundle::SharedBundle;
pub use resolver::CertResolver;
pub use verifier::{
    ExpectedServer, PossessionOnlyClientVerifier, SpiffeClientVerifier, SpiffeServerVerifier,
    peer_spiffe_id,
};

/// ring with only the TLS 1.3 AES-GCM suites: what the CA serves with, and
/// what mesh connections use.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(p)
}
