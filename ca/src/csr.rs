//! Certificate signing requests: parse, prove possession, judge the key.
//!
//! The CSR contributes exactly two things to a certificate: its public key,
//! and (through its signature) proof that the caller holds the private key.
//! Everything else in it is only checked, never copied: identities come from
//! authentication.

use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted, in bits.
pub const MAX_RSA_BITS: usize = 4096;

/// The kind of key a CSR carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// RSA with a modulus of this many bits.
    Rsa(usize),
    /// Ed25519.
    Ed25519,
}

impl KeyKind {
    /// Whether the key is RSA (and so may encipher keys).
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyKind::Rsa(_))
    }
}

/// A CSR whose signature has been verified and whose key is acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    /// DER SubjectPublicKeyInfo of the requested key.
    pub spki_der: Vec<u8>,
    /// What kind of key it is.
    pub key_kind: KeyKind,
    /// URI SANs the CSR asks for (checked against the caller, never copied).
    pub requested_uris: Vec<String>,
    /// Any other SANs the CSR asks for (DNS names, IPs, e-mail…), rendered for errors.
    pub requested_other_sans: Vec<String>,
}

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not one well-formed PEM `CERTIFICATE REQUEST` block.
    #[error("csr is not a PEM-encoded CERTIFICATE REQUEST")]
    MalformedPem,
    /// The DER inside does not parse as PKCS#10.
    #[error("csr does not parse as PKCS#10: {0}")]
    MalformedDer(String),
    /// The signature does not verify with the enclosed key.
    #[error("csr signature does not verify with its own public key (proof of possession failed)")]
    BadSignature,
    /// RSA key outside the accepted range.
    #[error(
        "csr has an RSA key of {bits} bits; accepted sizes are {MIN_RSA_BITS} to {MAX_RSA_BITS}"
    )]
    RsaKeySize {
        /// Modulus size.
        bits: usize,
    },
    /// A curve or algorithm we do not issue for.
    #[error("csr key type is not accepted: {0}; use ECDSA P-256/P-384, RSA 2048-4096 or Ed25519")]
    UnsupportedKey(String),
}

/// Parses a PEM CSR, verifies its signature and judges its key.
pub fn parse_and_verify(pem: &str) -> Result<VerifiedCsr, CsrError> {
    let mut blocks = CertificateSigningRequestDer::pem_slice_iter(pem.as_bytes());
    let der = match (blocks.next(), blocks.next()) {
        (Some(Ok(der)), None) => der,
        _ => return Err(CsrError::MalformedPem),
    };
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrError::MalformedDer(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::MalformedDer(
            "trailing bytes after the request".into(),
        ));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let key_kind = judge_key(spki)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut requested_uris = Vec::new();
    let mut requested_other_sans = Vec::new();
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => requested_uris.push((*uri).to_owned()),
                        GeneralName::DNSName(dns) => {
                            requested_other_sans.push(format!("DNS:{dns}"))
                        }
                        GeneralName::RFC822Name(m) => {
                            requested_other_sans.push(format!("email:{m}"))
                        }
                        GeneralName::IPAddress(ip) => {
                            requested_other_sans.push(format!("IP:{ip:02x?}"))
                        }
                        other => requested_other_sans.push(format!("{other:?}")),
                    }
                }
            }
        }
    }
    Ok(VerifiedCsr {
        spki_der: spki.raw.to_vec(),
        key_kind,
        requested_uris,
        requested_other_sans,
    })
}

fn judge_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<KeyKind, CsrError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(CsrError::MalformedDer(
                "RSA public key does not parse".into(),
            ));
        };
        let bits = rsa.key_size();
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(CsrError::RsaKeySize { bits });
        }
        return Ok(KeyKind::Rsa(bits));
    }
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(KeyKind::EcdsaP256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(KeyKind::EcdsaP384),
            Some(c) => Err(CsrError::UnsupportedKey(format!("EC curve {c}"))),
            None => Err(CsrError::UnsupportedKey(
                "EC key without a named curve".into(),
            )),
        };
    }
    if *alg == OID_SIG_ED25519 {
        return Ok(KeyKind::Ed25519);
    }
    Err(CsrError::UnsupportedKey(format!("algorithm {alg}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType};

    fn csr_for(key: &KeyPair, uris: &[&str]) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn accepts_p256_csr_and_reports_requested_uri() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = parse_and_verify(&csr_for(&key, &["spiffe://td/ns/a/sa/b"])).unwrap();
        assert_eq!(csr.key_kind, KeyKind::EcdsaP256);
        assert_eq!(
            csr.requested_uris,
            vec!["spiffe://td/ns/a/sa/b".to_string()]
        );
        assert_eq!(csr.spki_der, key.subject_public_key_info());
    }

    #[test]
    fn accepts_p384_and_ed25519_csrs() {
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert_eq!(
            parse_and_verify(&csr_for(&p384, &[])).unwrap().key_kind,
            KeyKind::EcdsaP384
        );
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            parse_and_verify(&csr_for(&ed, &[])).unwrap().key_kind,
            KeyKind::Ed25519
        );
    }

    #[test]
    fn rejects_malformed_pem() {
        assert_eq!(parse_and_verify("not a csr"), Err(CsrError::MalformedPem));
        assert_eq!(
            parse_and_verify(
                "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n"
            ),
            Err(CsrError::MalformedPem)
        );
    }

    #[test]
    fn rejects_two_csrs_in_one_pem() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let one = csr_for(&key, &[]);
        assert_eq!(
            parse_and_verify(&format!("{one}{one}")),
            Err(CsrError::MalformedPem)
        );
    }

    #[test]
    fn rejects_der_garbage_inside_valid_pem() {
        let pem =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAECAwQF\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(
            parse_and_verify(pem),
            Err(CsrError::MalformedDer(_))
        ));
    }

    #[test]
    fn rejects_csr_with_bad_signature() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = csr_for(&key, &["spiffe://td/ns/a/sa/b"]);
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        // The signature BIT STRING is the last element: flip its final byte.
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
        assert_eq!(parse_and_verify(&tampered), Err(CsrError::BadSignature));
    }

    const RSA_1024_CSR: &str = include_str!("../tests/fixtures/rsa1024.csr.pem");
    const RSA_2048_CSR: &str = include_str!("../tests/fixtures/rsa2048.csr.pem");

    #[test]
    fn rejects_rsa_key_below_2048_bits() {
        assert_eq!(
            parse_and_verify(RSA_1024_CSR),
            Err(CsrError::RsaKeySize { bits: 1024 })
        );
    }

    #[test]
    fn accepts_rsa_2048() {
        assert_eq!(
            parse_and_verify(RSA_2048_CSR).unwrap().key_kind,
            KeyKind::Rsa(2048)
        );
    }
}
