//! Small PEM helpers shared by the CA's modules.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Encodes one DER certificate as PEM.
pub fn cert_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Parses every `CERTIFICATE` block of a PEM text; any other block or a bad
/// block is an error naming `what`.
pub fn certs_from_pem(text: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for item in CertificateDer::pem_slice_iter(text.as_bytes()) {
        out.push(item.map_err(|e| format!("{what}: {e}"))?);
    }
    Ok(out)
}

/// SHA-256 of some bytes.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
