//! Certificate signing requests as workloads and agents make them.

use rcgen::{CertificateParams, KeyPair, SanType};

/// A key and a PEM CSR for it.
pub struct TestCsr {
    /// The private key.
    pub key: KeyPair,
    /// The CSR, PEM.
    pub pem: String,
}

/// A P-256 CSR asking for the given URI SANs (Istio's agent asks for its own ID).
pub fn p256_csr(uris: &[&str]) -> anyhow::Result<TestCsr> {
    csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, uris, &[])
}

/// A CSR for a key of `alg`, with URI and DNS SANs.
pub fn csr_with(
    alg: &'static rcgen::SignatureAlgorithm,
    uris: &[&str],
    dns: &[&str],
) -> anyhow::Result<TestCsr> {
    let key = KeyPair::generate_for(alg)?;
    let mut params = CertificateParams::default();
    for u in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*u).try_into()?));
    }
    for d in dns {
        params
            .subject_alt_names
            .push(SanType::DnsName((*d).try_into()?));
    }
    let pem = params.serialize_request(&key)?.pem()?;
    Ok(TestCsr { key, pem })
}
