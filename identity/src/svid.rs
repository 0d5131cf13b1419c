//! X509-SVID checks: the SPIFFE leaf and signing-certificate rules
//! (`spiffe/spiffe` `standards/X509-SVID.md`), Citadel's stricter issuing
//! profile, and chain verification against a [`TrustBundle`].
//!
//! None of the profile checks verifies a signature; [`verify_chain`] does the
//! RFC 5280 path validation (signatures, validity periods, CA constraints) and
//! then applies the leaf profile.

use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION;

use crate::bundle::TrustBundle;
use crate::lifetime::SignerWindow;
use crate::spiffe_id::{SpiffeId, SpiffeIdError};
use crate::x509::{ExtensionProblem, KnownExtensions, known_extensions, parse_certificate};

/// RFC 5280 §4.1.2.2: serial numbers are at most 20 octets.
const MAX_SERIAL_LEN: usize = 20;

/// What a valid X509-SVID leaf says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSvid {
    /// The SPIFFE ID from the certificate's only URI SAN.
    pub spiffe_id: SpiffeId,
    /// The serial number as lowercase hex without leading zero bytes (`"0"`
    /// for zero; a negative serial, which only the SPIFFE profile tolerates,
    /// appears as its two's-complement bytes).
    pub serial_hex: String,
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
    /// The DNS-name SANs, in certificate order.
    pub dns_names: Vec<String>,
}

/// Which rule a certificate or chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The DER does not parse as one X.509 certificate.
    #[error("certificate is not valid DER X.509: {reason}")]
    Malformed {
        /// What the parser reported.
        reason: String,
    },
    /// An extension appears more than once.
    #[error("certificate has a duplicate {extension} extension")]
    DuplicateExtension {
        /// Name (or OID) of the extension.
        extension: String,
    },
    /// An extension this crate reads does not decode.
    #[error("certificate has a malformed {extension} extension")]
    MalformedExtension {
        /// Name of the extension.
        extension: String,
    },
    /// The leaf has no URI SAN.
    #[error("X509-SVID must have exactly one URI SAN, found none")]
    MissingUriSan,
    /// The leaf has more than one URI SAN.
    #[error("X509-SVID must have exactly one URI SAN, found {count}")]
    MultipleUriSans {
        /// How many URI SANs there are.
        count: usize,
    },
    /// A URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(SpiffeIdError),
    /// The leaf's SPIFFE ID has no path (it names a trust domain, not a workload).
    #[error("X509-SVID leaf SPIFFE ID {id} has no path; leaf IDs must name a workload")]
    LeafIdIsRoot {
        /// The offending ID.
        id: String,
    },
    /// The leaf says basicConstraints cA=true.
    #[error("X509-SVID leaf must not be a CA (basicConstraints cA is true)")]
    LeafIsCa,
    /// The leaf has no keyUsage extension.
    #[error("X509-SVID leaf must have a keyUsage extension")]
    MissingKeyUsage,
    /// The leaf's keyUsage extension is not critical.
    #[error("X509-SVID leaf keyUsage extension must be critical")]
    KeyUsageNotCritical,
    /// The leaf's keyUsage lacks digitalSignature.
    #[error("X509-SVID leaf keyUsage must include digitalSignature")]
    MissingDigitalSignature,
    /// The leaf's keyUsage has keyCertSign.
    #[error("X509-SVID leaf keyUsage must not include keyCertSign")]
    LeafHasKeyCertSign,
    /// The leaf's keyUsage has cRLSign.
    #[error("X509-SVID leaf keyUsage must not include cRLSign")]
    LeafHasCrlSign,
    /// The leaf's extKeyUsage is present without serverAuth.
    #[error("X509-SVID leaf extKeyUsage must include serverAuth when present")]
    EkuMissingServerAuth,
    /// The leaf's extKeyUsage is present without clientAuth.
    #[error("X509-SVID leaf extKeyUsage must include clientAuth when present")]
    EkuMissingClientAuth,
    /// The subject is empty and the subjectAltName extension is not critical.
    #[error("subjectAltName extension must be critical when the subject is empty")]
    SanNotCritical,
    /// Citadel profile: no basicConstraints extension.
    #[error("Citadel leaf must have a basicConstraints extension")]
    MissingBasicConstraints,
    /// Citadel profile: basicConstraints is not critical.
    #[error("Citadel leaf basicConstraints extension must be critical")]
    BasicConstraintsNotCritical,
    /// Citadel profile: no extKeyUsage extension.
    #[error("Citadel leaf must have an extKeyUsage extension with serverAuth and clientAuth")]
    MissingExtendedKeyUsage,
    /// Citadel profile: keyEncipherment on a key that is not RSA.
    #[error("Citadel leaf keyUsage may include keyEncipherment only for RSA keys")]
    KeyEnciphermentWithoutRsa,
    /// Citadel profile: a key usage other than digitalSignature/keyEncipherment.
    #[error("Citadel leaf keyUsage must not include {usage}")]
    UnexpectedKeyUsage {
        /// The name of the unexpected usage bit.
        usage: &'static str,
    },
    /// Citadel profile: no subjectKeyIdentifier.
    #[error("Citadel leaf must have a subjectKeyIdentifier extension")]
    MissingSubjectKeyIdentifier,
    /// Citadel profile: no authorityKeyIdentifier with a key identifier.
    #[error("Citadel leaf must have an authorityKeyIdentifier extension with a key identifier")]
    MissingAuthorityKeyIdentifier,
    /// Citadel profile: serial number is zero.
    #[error("Citadel leaf serial number must not be zero")]
    ZeroSerial,
    /// Citadel profile: serial number is negative.
    #[error("Citadel leaf serial number must be positive, but it is negative")]
    NegativeSerial,
    /// Citadel profile: serial number longer than 20 octets.
    #[error("Citadel leaf serial number is {len} octets; the maximum is {MAX_SERIAL_LEN}")]
    SerialTooLong {
        /// Encoded length of the serial.
        len: usize,
    },
    /// Signing certificate: basicConstraints missing or cA not true.
    #[error("signing certificate must be a CA (basicConstraints cA=true)")]
    SigningCertNotCa,
    /// Signing certificate: keyUsage missing or without keyCertSign.
    #[error("signing certificate must have keyUsage with keyCertSign")]
    SigningCertMissingKeyCertSign,
    /// Signing certificate: its SPIFFE ID has a path.
    #[error("signing certificate SPIFFE ID {id} must not have a path")]
    SigningCertIdHasPath {
        /// The offending ID.
        id: String,
    },
    /// `verify_chain` was given no certificates.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// A certificate in the chain has expired.
    #[error("a certificate in the chain expired at {not_after} (now {now})")]
    Expired {
        /// The expired certificate's notAfter, unix seconds.
        not_after: u64,
        /// The verification time, unix seconds.
        now: u64,
    },
    /// A certificate in the chain is not valid yet.
    #[error("a certificate in the chain is not valid until {not_before} (now {now})")]
    NotYetValid {
        /// The certificate's notBefore, unix seconds.
        not_before: u64,
        /// The verification time, unix seconds.
        now: u64,
    },
    /// No path leads from the leaf to a root of the bundle (foreign root or missing intermediate).
    #[error(
        "no path from the certificate to a root of trust domain {trust_domain} \
         (unknown issuer or missing intermediate)"
    )]
    UnknownIssuer {
        /// The bundle's trust domain.
        trust_domain: String,
    },
    /// A signature in the chain does not verify.
    #[error("a signature in the certificate chain is invalid")]
    BadSignature,
    /// Path validation failed for another reason.
    #[error("certificate chain validation failed: {reason}")]
    PathValidation {
        /// What the path validator reported.
        reason: String,
    },
    /// An intermediate on the validated path breaks the signing-certificate rules.
    #[error(
        "intermediate {index} on the validated path is not a valid signing certificate: {reason}"
    )]
    InvalidIntermediate {
        /// Position on the path, 0 = the leaf's issuer.
        index: usize,
        /// The rule it breaks.
        reason: Box<SvidError>,
    },
    /// The leaf belongs to another trust domain than the bundle.
    #[error("SPIFFE ID {id} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The bundle's trust domain.
        expected: String,
        /// The leaf's SPIFFE ID.
        id: String,
    },
}

impl From<ExtensionProblem> for SvidError {
    fn from(problem: ExtensionProblem) -> Self {
        match problem {
            ExtensionProblem::Duplicate(extension) => SvidError::DuplicateExtension { extension },
            ExtensionProblem::Malformed(extension) => SvidError::MalformedExtension { extension },
        }
    }
}

/// Checks a DER leaf against the X509-SVID rules of the SPIFFE specification.
pub fn check_x509_svid(leaf_der: &[u8]) -> Result<LeafSvid, SvidError> {
    let cert = parse(leaf_der)?;
    let exts = known_extensions(&cert)?;
    spiffe_leaf(&cert, &exts)
}

/// Checks a DER leaf against the X509-SVID rules and Citadel's issuing profile:
/// basicConstraints present and critical (cA=false), extKeyUsage present,
/// keyUsage limited to digitalSignature (plus keyEncipherment for RSA keys),
/// subject and authority key identifiers present, serial positive, non-zero
/// and at most 20 octets.
pub fn check_citadel_leaf(leaf_der: &[u8]) -> Result<LeafSvid, SvidError> {
    let cert = parse(leaf_der)?;
    let exts = known_extensions(&cert)?;
    let svid = spiffe_leaf(&cert, &exts)?;

    let bc = exts
        .basic_constraints
        .ok_or(SvidError::MissingBasicConstraints)?;
    if !bc.critical {
        return Err(SvidError::BasicConstraintsNotCritical);
    }
    if exts.extended_key_usage.is_none() {
        return Err(SvidError::MissingExtendedKeyUsage);
    }
    // spiffe_leaf has already required keyUsage to be present.
    if let Some(ku) = exts.key_usage {
        let ku = ku.value;
        if ku.key_encipherment() && cert.public_key().algorithm.algorithm != OID_PKCS1_RSAENCRYPTION
        {
            return Err(SvidError::KeyEnciphermentWithoutRsa);
        }
        let unexpected = [
            (ku.non_repudiation(), "nonRepudiation"),
            (ku.data_encipherment(), "dataEncipherment"),
            (ku.key_agreement(), "keyAgreement"),
            (ku.encipher_only(), "encipherOnly"),
            (ku.decipher_only(), "decipherOnly"),
        ];
        if let Some((_, usage)) = unexpected.into_iter().find(|(set, _)| *set) {
            return Err(SvidError::UnexpectedKeyUsage { usage });
        }
    }
    if exts.subject_key_identifier.is_none_or(<[u8]>::is_empty) {
        return Err(SvidError::MissingSubjectKeyIdentifier);
    }
    let aki_key_id = exts
        .authority_key_identifier
        .and_then(|aki| aki.key_identifier.as_ref());
    if aki_key_id.is_none_or(|id| id.0.is_empty()) {
        return Err(SvidError::MissingAuthorityKeyIdentifier);
    }
    check_serial(cert.raw_serial())?;
    Ok(svid)
}

/// Checks a DER CA certificate against the SPIFFE signing-certificate rules:
/// basicConstraints cA=true, keyUsage with keyCertSign, and any SPIFFE URI SAN
/// naming a trust domain (no path).
pub fn check_signing_certificate(der: &[u8]) -> Result<(), SvidError> {
    let cert = parse(der)?;
    let exts = known_extensions(&cert)?;
    if !exts.basic_constraints.is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::SigningCertNotCa);
    }
    if !exts.key_usage.is_some_and(|ku| ku.value.key_cert_sign()) {
        return Err(SvidError::SigningCertMissingKeyCertSign);
    }
    for uri in uri_sans(&exts)? {
        let is_spiffe = uri
            .get(.."spiffe:".len())
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe:"));
        if !is_spiffe {
            continue;
        }
        let id = SpiffeId::parse(uri).map_err(SvidError::InvalidSpiffeId)?;
        if !id.is_root() {
            return Err(SvidError::SigningCertIdHasPath {
                id: id.as_str().to_owned(),
            });
        }
    }
    Ok(())
}

/// Verifies `chain` (leaf first, then intermediates; roots may be included)
/// against `bundle` at `now_unix`: RFC 5280 path validation for client
/// authentication, the signing-certificate rules for every intermediate on the
/// validated path, the X509-SVID leaf rules, and membership of the leaf's
/// SPIFFE ID in the bundle's trust domain.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now_unix: u64,
) -> Result<LeafSvid, SvidError> {
    verify_chain_for(chain, bundle, now_unix, PeerRole::Client)
}

/// The role a verified peer plays in the handshake: the extended key usage
/// its leaf must allow (X509-SVIDs carry both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// A TLS client (`id-kp-clientAuth`).
    Client,
    /// A TLS server (`id-kp-serverAuth`).
    Server,
}

/// As [`verify_chain`], for a peer in `role`.
pub fn verify_chain_for(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now_unix: u64,
    role: PeerRole,
) -> Result<LeafSvid, SvidError> {
    let usage = match role {
        PeerRole::Client => webpki::KeyUsage::client_auth(),
        PeerRole::Server => webpki::KeyUsage::server_auth(),
    };
    let (leaf, intermediates) = chain.split_first().ok_or(SvidError::EmptyChain)?;
    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|e| SvidError::Malformed {
        reason: e.to_string(),
    })?;
    let path = end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            bundle.trust_anchors(),
            intermediates,
            UnixTime::since_unix_epoch(Duration::from_secs(now_unix)),
            usage,
            None,
            None,
        )
        .map_err(|e| map_webpki_error(e, bundle, now_unix))?;

    let svid = check_x509_svid(leaf)?;
    for (index, intermediate) in path.intermediate_certificates().enumerate() {
        check_signing_certificate(&intermediate.der()).map_err(|reason| {
            SvidError::InvalidIntermediate {
                index,
                reason: Box::new(reason),
            }
        })?;
    }
    if !svid.spiffe_id.is_member_of(bundle.trust_domain()) {
        return Err(SvidError::WrongTrustDomain {
            expected: bundle.trust_domain().to_string(),
            id: svid.spiffe_id.to_string(),
        });
    }
    Ok(svid)
}

/// The window in which every certificate of a signing chain is valid: the
/// latest notBefore and the earliest notAfter (input for
/// [`leaf_validity`](crate::lifetime::leaf_validity)).
pub fn signing_chain_window(chain: &[CertificateDer<'_>]) -> Result<SignerWindow, SvidError> {
    let mut window: Option<SignerWindow> = None;
    for der in chain {
        let cert = parse(der)?;
        let validity = cert.validity();
        let (not_before, not_after) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        window = Some(match window {
            None => SignerWindow {
                not_before,
                not_after,
            },
            Some(w) => SignerWindow {
                not_before: w.not_before.max(not_before),
                not_after: w.not_after.min(not_after),
            },
        });
    }
    window.ok_or(SvidError::EmptyChain)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    parse_certificate(der).map_err(|reason| SvidError::Malformed { reason })
}

/// The SPIFFE X509-SVID leaf rules.
fn spiffe_leaf(
    cert: &X509Certificate<'_>,
    exts: &KnownExtensions<'_, '_>,
) -> Result<LeafSvid, SvidError> {
    let uris = uri_sans(exts)?;
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::MissingUriSan),
        [uri] => *uri,
        more => return Err(SvidError::MultipleUriSans { count: more.len() }),
    };
    let spiffe_id = SpiffeId::parse(uri).map_err(SvidError::InvalidSpiffeId)?;
    if spiffe_id.is_root() {
        return Err(SvidError::LeafIdIsRoot {
            id: spiffe_id.to_string(),
        });
    }
    if exts.basic_constraints.is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::LeafIsCa);
    }
    let ku = exts.key_usage.ok_or(SvidError::MissingKeyUsage)?;
    if !ku.critical {
        return Err(SvidError::KeyUsageNotCritical);
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::MissingDigitalSignature);
    }
    if ku.value.key_cert_sign() {
        return Err(SvidError::LeafHasKeyCertSign);
    }
    if ku.value.crl_sign() {
        return Err(SvidError::LeafHasCrlSign);
    }
    if let Some(eku) = exts.extended_key_usage {
        if !eku.value.server_auth {
            return Err(SvidError::EkuMissingServerAuth);
        }
        if !eku.value.client_auth {
            return Err(SvidError::EkuMissingClientAuth);
        }
    }
    let subject_is_empty = cert.subject().iter().next().is_none();
    if subject_is_empty && !exts.subject_alt_name.is_some_and(|san| san.critical) {
        return Err(SvidError::SanNotCritical);
    }

    let dns_names = exts
        .subject_alt_name
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect();
    let validity = cert.validity();
    Ok(LeafSvid {
        spiffe_id,
        serial_hex: serial_hex(cert.raw_serial()),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        dns_names,
    })
}

/// The URI SANs, in order; a SAN entry that failed to decode is an error.
fn uri_sans<'c>(exts: &KnownExtensions<'c, '_>) -> Result<Vec<&'c str>, SvidError> {
    let Some(san) = exts.subject_alt_name else {
        return Ok(Vec::new());
    };
    let mut uris = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(uri) => uris.push(*uri),
            GeneralName::Invalid(..) => {
                return Err(SvidError::MalformedExtension {
                    extension: "subjectAltName".to_owned(),
                });
            }
            _ => {}
        }
    }
    Ok(uris)
}

/// Citadel's serial rules on the INTEGER content octets.
fn check_serial(raw: &[u8]) -> Result<(), SvidError> {
    match raw.first() {
        None => {
            return Err(SvidError::Malformed {
                reason: "serial number has no content octets".to_owned(),
            });
        }
        Some(first) if first & 0x80 != 0 => return Err(SvidError::NegativeSerial),
        Some(_) => {}
    }
    if raw.iter().all(|b| *b == 0) {
        return Err(SvidError::ZeroSerial);
    }
    if raw.len() > MAX_SERIAL_LEN {
        return Err(SvidError::SerialTooLong { len: raw.len() });
    }
    Ok(())
}

/// Lowercase hex of the serial's content octets without leading zero bytes.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let hex: String = raw[start..].iter().map(|b| format!("{b:02x}")).collect();
    if hex.is_empty() { "0".to_owned() } else { hex }
}

fn map_webpki_error(err: webpki::Error, bundle: &TrustBundle, now: u64) -> SvidError {
    match err {
        webpki::Error::CertExpired { not_after, .. } => SvidError::Expired {
            not_after: not_after.as_secs(),
            now,
        },
        webpki::Error::CertNotValidYet { not_before, .. } => SvidError::NotYetValid {
            not_before: not_before.as_secs(),
            now,
        },
        webpki::Error::UnknownIssuer => SvidError::UnknownIssuer {
            trust_domain: bundle.trust_domain().to_string(),
        },
        webpki::Error::InvalidSignatureForPublicKey => SvidError::BadSignature,
        other => SvidError::PathValidation {
            reason: format!("{other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_hex_strips_leading_zero_bytes() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x7f, 0xab]), "7fab");
        assert_eq!(serial_hex(&[0x00]), "0");
        assert_eq!(serial_hex(&[0x00, 0x00, 0x0a]), "0a");
    }

    #[test]
    fn serial_must_be_positive_non_zero_and_short() {
        assert_eq!(check_serial(&[0x01]), Ok(()));
        assert_eq!(check_serial(&[0x00, 0x80]), Ok(()));
        assert_eq!(check_serial(&[0x00]), Err(SvidError::ZeroSerial));
        assert_eq!(check_serial(&[0x80, 0x01]), Err(SvidError::NegativeSerial));
        assert!(matches!(
            check_serial(&[]),
            Err(SvidError::Malformed { .. })
        ));
        assert_eq!(check_serial(&[0x01; 20]), Ok(()));
        assert_eq!(
            check_serial(&[0x01; 21]),
            Err(SvidError::SerialTooLong { len: 21 })
        );
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            check_x509_svid(b"not a certificate"),
            Err(SvidError::Malformed { .. })
        ));
        assert!(matches!(
            check_signing_certificate(&[]),
            Err(SvidError::Malformed { .. })
        ));
    }

    #[test]
    fn empty_chain_is_rejected() {
        assert_eq!(signing_chain_window(&[]), Err(SvidError::EmptyChain));
    }
}
