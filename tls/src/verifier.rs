//! SPIFFE peer verification for rustls: a peer is accepted when its chain
//! verifies against the trust bundle of the moment as an X509-SVID of our
//! trust domain (RFC 5280 path, exactly one URI SAN, the SVID leaf rules),
//! and, for a server, when it names the SPIFFE ID the client expects.
//! No DNS name is ever checked: in a mesh the identity is the SPIFFE ID.

use std::sync::Arc;

use citadel_identity::{PeerRole, SpiffeId, verify_chain_for};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::SharedBundle;

/// Which server a client accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedServer {
    /// Any SVID of the bundle's trust domain.
    AnyInTrustDomain,
    /// Exactly this SPIFFE ID (secure naming).
    Exactly(SpiffeId),
}

fn verify_peer(
    bundle: &SharedBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, rustls::Error> {
    let bundle = bundle
        .get()
        .ok_or_else(|| rustls::Error::General("no trust bundle yet".to_owned()))?;
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    verify_chain_for(&chain, &bundle, now.as_secs(), role)
        .map(|leaf| leaf.spiffe_id)
        .map_err(|e| rustls::Error::General(format!("peer is not a valid SVID: {e}")))
}

/// The handshake-signature methods every verifier here shares (each has a
/// `provider` field): TLS 1.3 only, with the provider's algorithms.
macro_rules! tls13_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// A client's verifier of mesh servers.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: SharedBundle,
    expected: ExpectedServer,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// Verifies servers against `bundle`, accepting `expected`.
    pub fn new(
        bundle: SharedBundle,
        expected: ExpectedServer,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            bundle,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = verify_peer(
            &self.bundle,
            end_entity,
            intermediates,
            now,
            PeerRole::Server,
        )?;
        match &self.expected {
            ExpectedServer::Exactly(want) if &id != want => Err(rustls::Error::General(format!(
                "server is {id}, expected {want}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    tls13_signature_checks!();
}

/// A server's verifier of mesh clients.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: SharedBundle,
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    /// Verifies client certificates against `bundle`; with `mandatory` a
    /// client without one is refused in the handshake.
    pub fn new(bundle: SharedBundle, mandatory: bool, provider: Arc<CryptoProvider>) -> Self {
        Self {
            bundle,
            mandatory,
            provider,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_peer(
            &self.bundle,
            end_entity,
            intermediates,
            now,
            PeerRole::Client,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_signature_checks!();
}

/// Asks for a client certificate without requiring one, and checks only
/// that the client holds the certificate's key (the handshake signature).
///
/// For the CA: the chain is judged after the handshake, against the trust
/// bundle of the moment, by the authenticator that decides what the caller
/// may do; until then a presented certificate proves nothing, and nothing
/// else reads it.
#[derive(Debug)]
pub struct PossessionOnlyClientVerifier {
    provider: Arc<CryptoProvider>,
}

impl PossessionOnlyClientVerifier {
    /// Uses `provider`'s signature algorithms.
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Self { provider }
    }
}

impl ClientCertVerifier for PossessionOnlyClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    tls13_signature_checks!();
}

/// The SPIFFE ID of a connection's verified peer (its leaf certificate's
/// URI SAN), or `None` when the peer presented no valid SVID.
pub fn peer_spiffe_id(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = peer_certificates?.first()?;
    citadel_identity::check_x509_svid(leaf)
        .ok()
        .map(|svid| svid.spiffe_id)
}
