//! Workload certificates the agent holds: a fresh key and CSR per issuance,
//! and the checks a CA answer must pass before anything is served.

use std::fmt;

use citadel_identity::{SpiffeId, TrustBundle, verify_chain};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType};
use rustls_pki_types::CertificateDer;

/// A PKCS#8 private key held in memory, with its PEM form made once (every
/// SDS push serves it). Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey {
    der: Vec<u8>,
    pem: String,
}

impl PrivateKey {
    fn from_pkcs8_der(der: Vec<u8>) -> PrivateKey {
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der.clone()));
        PrivateKey { der, pem }
    }

    /// The unencrypted PKCS#8 DER, for serving to the workload it belongs to.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.der
    }

    /// The key as PEM (`PRIVATE KEY`).
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A workload's certificate, its chain and its key, checked. The wire forms
/// of the chain are made once, at issuance, not on every push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSvid {
    /// The identity the certificate carries.
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates; roots of the trust bundle left out.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKey,
    /// The leaf's serial, lowercase hex.
    pub serial_hex: String,
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
    chain_der: Vec<u8>,
    chain_pem: String,
}

impl WorkloadSvid {
    /// The chain as concatenated DER (Workload API form).
    pub fn chain_der(&self) -> &[u8] {
        &self.chain_der
    }

    /// The chain as PEM (SDS form).
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }
}

/// The ID the CA gives the authority whose signing certificate is `der`: lowercase hex of
/// the first 16 bytes of its SHA-256.
pub fn authority_id_of(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The ID of the authority that signed `svid`'s leaf: the certificate after the leaf in
/// its chain, or, when the chain is the leaf alone (signed by a root), the root of `roots`
/// whose subject is the leaf's issuer. `None` when neither is found.
pub fn signer_authority_id(
    svid: &WorkloadSvid,
    roots: &[CertificateDer<'static>],
) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    if let Some(signer) = svid.chain.get(1) {
        return Some(authority_id_of(signer));
    }
    let (_, leaf) = X509Certificate::from_der(svid.chain.first()?).ok()?;
    let issuer = leaf.issuer().as_raw();
    roots.iter().find_map(|root| {
        let (_, cert) = X509Certificate::from_der(root).ok()?;
        (cert.subject().as_raw() == issuer).then(|| authority_id_of(root))
    })
}

/// Whether a certificate signed by `signer` must be re-issued because `active` signs now
/// (pure). Nothing is re-issued while the CA names no active authority, nor when the signer
/// is unknown (the bundle check catches certificates that no longer verify).
pub fn signed_by_another_authority(signer: Option<&str>, active: &str) -> bool {
    !active.is_empty() && signer.is_some_and(|s| s != active)
}

/// A key generated for one issuance and the CSR that names it.
pub struct PendingKey {
    key: KeyPair,
    /// The CSR, PEM.
    pub csr_pem: String,
}

impl fmt::Debug for PendingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingKey").finish_non_exhaustive()
    }
}

/// Why a key or CSR could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot generate key or CSR: {0}")]
pub struct KeyGenError(String);

impl PendingKey {
    /// A new ECDSA P-256 key and a CSR for it naming `spiffe_id` (or no
    /// SAN at all, when the identity is not known before issuance).
    pub fn generate(spiffe_id: Option<&SpiffeId>) -> Result<PendingKey, KeyGenError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| KeyGenError(e.to_string()))?;
        let mut params = CertificateParams::default();
        if let Some(id) = spiffe_id {
            let uri = id
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| KeyGenError(e.to_string()))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        let csr_pem = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|e| KeyGenError(e.to_string()))?;
        Ok(PendingKey { key, csr_pem })
    }

    /// Wraps an existing PKCS#8 key (the node key read back from disk); the
    /// CSR names no SAN.
    pub fn from_pkcs8(der: &[u8]) -> Result<PendingKey, KeyGenError> {
        let key = KeyPair::try_from(der).map_err(|e| KeyGenError(e.to_string()))?;
        let csr_pem = CertificateParams::default()
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|e| KeyGenError(e.to_string()))?;
        Ok(PendingKey { key, csr_pem })
    }

    /// The key as PKCS#8 DER.
    pub fn private_key(&self) -> PrivateKey {
        PrivateKey::from_pkcs8_der(self.key.serialize_der())
    }

    fn spki_der(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }
}

/// Why a CA answer is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainRejected {
    /// The answer holds no certificate, or text that is not PEM certificates.
    #[error("the CA answer is not a PEM certificate chain: {0}")]
    Malformed(String),
    /// The chain does not verify against the trust bundle.
    #[error("the certificate chain does not verify against the trust bundle: {0}")]
    Untrusted(String),
    /// The leaf names another identity.
    #[error("the CA issued {got} but {wanted} was requested")]
    WrongIdentity {
        /// Requested.
        wanted: String,
        /// Received.
        got: String,
    },
    /// The leaf certifies another key.
    #[error("the certificate is not for the key the agent generated")]
    WrongKey,
}

/// Checks a CA answer (`cert_chain` entries, each PEM, leaf first) for the
/// key in `pending`: it must parse, verify against `bundle` at `now`, name
/// `wanted` (when given, else any identity is taken) and certify the key.
pub fn accept_chain(
    pending: &PendingKey,
    wanted: Option<&SpiffeId>,
    cert_chain: &[String],
    bundle: &TrustBundle,
    now: i64,
) -> Result<WorkloadSvid, ChainRejected> {
    let mut chain: Vec<CertificateDer<'static>> = Vec::new();
    for block in cert_chain {
        for p in pem::parse_many(block).map_err(|e| ChainRejected::Malformed(e.to_string()))? {
            if p.tag() != "CERTIFICATE" {
                return Err(ChainRejected::Malformed(format!(
                    "unexpected {} block",
                    p.tag()
                )));
            }
            chain.push(CertificateDer::from(p.into_contents()));
        }
    }
    if chain.is_empty() {
        return Err(ChainRejected::Malformed("no certificate".to_owned()));
    }
    let leaf = verify_chain(&chain, bundle, now.max(0) as u64)
        .map_err(|e| ChainRejected::Untrusted(e.to_string()))?;
    if let Some(wanted) = wanted
        && &leaf.spiffe_id != wanted
    {
        return Err(ChainRejected::WrongIdentity {
            wanted: wanted.to_string(),
            got: leaf.spiffe_id.to_string(),
        });
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| ChainRejected::Malformed(e.to_string()))?;
    if parsed.tbs_certificate.subject_pki.raw != pending.spki_der().as_slice() {
        return Err(ChainRejected::WrongKey);
    }
    chain.retain(|c| !bundle.contains(c));
    let chain_der = chain.iter().flat_map(|c| c.iter().copied()).collect();
    let chain_pem = chain
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect();
    Ok(WorkloadSvid {
        spiffe_id: leaf.spiffe_id,
        chain,
        key: pending.private_key(),
        serial_hex: leaf.serial_hex,
        not_before: leaf.not_before,
        not_after: leaf.not_after,
        chain_der,
        chain_pem,
    })
}
