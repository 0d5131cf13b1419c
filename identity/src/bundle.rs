//! X.509 trust bundles: the root certificates of one trust domain.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::spiffe_id::TrustDomain;
use crate::x509::{ExtensionProblem, known_extensions, parse_certificate};

/// The PEM label of a certificate section.
const CERTIFICATE_LABEL: &str = "CERTIFICATE";

/// Why a set of certificates is not a usable trust bundle.
///
/// `index` is the 0-based position of the offending certificate in the input
/// (the PEM sections or the DER list, in order).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// There are no root certificates at all.
    #[error("trust bundle has no root certificates")]
    Empty,
    /// The PEM text could not be decoded.
    #[error("trust bundle PEM is malformed: {0}")]
    Pem(String),
    /// The PEM text holds a section other than `CERTIFICATE`.
    #[error("trust bundle PEM holds a {label:?} section; only CERTIFICATE sections are allowed")]
    NotACertificate {
        /// The label of the offending section.
        label: String,
    },
    /// A root does not parse as an X.509 certificate.
    #[error("root certificate {index} is not a valid X.509 certificate: {reason}")]
    Unparseable {
        /// Position of the root in the input.
        index: usize,
        /// What the parser reported.
        reason: String,
    },
    /// A root has a duplicated or undecodable extension.
    #[error("root certificate {index} ({subject}) has a {problem} extension")]
    BadExtension {
        /// Position of the root in the input.
        index: usize,
        /// The root's subject.
        subject: String,
        /// "duplicate X" or "malformed X".
        problem: String,
    },
    /// A root is not a CA certificate (basicConstraints missing or cA=false).
    #[error(
        "root certificate {index} ({subject}) is not a CA certificate: basicConstraints cA must be true"
    )]
    NotCa {
        /// Position of the root in the input.
        index: usize,
        /// The root's subject.
        subject: String,
    },
    /// A root has a keyUsage extension without keyCertSign.
    #[error("root certificate {index} ({subject}) has a keyUsage extension without keyCertSign")]
    MissingKeyCertSign {
        /// Position of the root in the input.
        index: usize,
        /// The root's subject.
        subject: String,
    },
    /// A root cannot be turned into a path-validation trust anchor.
    #[error("root certificate {index} ({subject}) cannot be used as a trust anchor: {reason}")]
    UnusableTrustAnchor {
        /// Position of the root in the input.
        index: usize,
        /// The root's subject.
        subject: String,
        /// What the path validator reported.
        reason: String,
    },
}

/// The X.509 root certificates of one trust domain, validated and de-duplicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    /// One trust anchor per root, in the same order.
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from DER roots. Each root must parse and be a CA
    /// certificate (basicConstraints cA=true, and keyCertSign when keyUsage is
    /// present); byte-identical duplicates are dropped and the order is kept.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<TrustBundle, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let mut unique: Vec<CertificateDer<'static>> = Vec::with_capacity(roots.len());
        let mut anchors = Vec::with_capacity(roots.len());
        for (index, root) in roots.into_iter().enumerate() {
            let subject = check_root(index, &root)?;
            if unique.contains(&root) {
                continue;
            }
            let anchor = webpki::anchor_from_trusted_cert(&root)
                .map_err(|e| BundleError::UnusableTrustAnchor {
                    index,
                    subject,
                    reason: e.to_string(),
                })?
                .to_owned();
            anchors.push(anchor);
            unique.push(root);
        }
        Ok(TrustBundle {
            trust_domain,
            roots: unique,
            anchors,
        })
    }

    /// Builds a bundle from PEM text holding only `CERTIFICATE` sections (at least one).
    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<TrustBundle, BundleError> {
        // The PEM reader silently skips sections that are not certificates, so
        // every BEGIN line is checked here first, splitting lines exactly as
        // that reader does (on '\r' or '\n').
        for line in pem.split(['\r', '\n']) {
            if let Some(rest) = line.strip_prefix("-----BEGIN ") {
                let label = rest.trim_end().trim_end_matches('-');
                if label != CERTIFICATE_LABEL {
                    return Err(BundleError::NotACertificate {
                        label: label.to_owned(),
                    });
                }
            }
        }
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem(e.to_string()))?;
        TrustBundle::new(trust_domain, roots)
    }

    /// Builds a bundle from DER certificates concatenated with no padding (the
    /// form the SPIFFE Workload API uses for bundles).
    pub fn from_concatenated_der(
        trust_domain: TrustDomain,
        der: &[u8],
    ) -> Result<TrustBundle, BundleError> {
        let mut roots = Vec::new();
        let mut rest = der;
        while !rest.is_empty() {
            let index = roots.len();
            let (after, _) = x509_parser::parse_x509_certificate(rest).map_err(|e| {
                BundleError::Unparseable {
                    index,
                    reason: e.to_string(),
                }
            })?;
            let len = rest.len() - after.len();
            roots.push(CertificateDer::from(rest[..len].to_vec()));
            rest = after;
        }
        TrustBundle::new(trust_domain, roots)
    }

    /// The trust domain these roots belong to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificates, in their original order, without duplicates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as path-validation trust anchors, in the same order as [`roots`](Self::roots).
    pub fn trust_anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// Whether `cert` is one of the roots (byte-for-byte).
    pub fn contains(&self, cert: &CertificateDer<'_>) -> bool {
        self.roots.iter().any(|root| root.as_ref() == cert.as_ref())
    }

    /// The roots as PEM `CERTIFICATE` blocks with 64-character lines.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        for root in &self.roots {
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            let encoded = STANDARD.encode(root.as_ref());
            // Base64 output is ASCII, so byte chunks are whole characters.
            for line in encoded.as_bytes().chunks(64) {
                out.push_str(&String::from_utf8_lossy(line));
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out
    }

    /// The roots as DER certificates concatenated with no padding.
    pub fn to_concatenated_der(&self) -> Vec<u8> {
        self.roots.iter().flat_map(|r| r.iter().copied()).collect()
    }
}

/// Checks that `root` is a CA certificate; returns its subject for messages.
fn check_root(index: usize, root: &CertificateDer<'_>) -> Result<String, BundleError> {
    let cert =
        parse_certificate(root).map_err(|reason| BundleError::Unparseable { index, reason })?;
    let subject = cert.subject().to_string();
    let exts = known_extensions(&cert).map_err(|problem| BundleError::BadExtension {
        index,
        subject: subject.clone(),
        problem: match problem {
            ExtensionProblem::Duplicate(name) => format!("duplicate {name}"),
            ExtensionProblem::Malformed(name) => format!("malformed {name}"),
        },
    })?;
    if !exts.basic_constraints.is_some_and(|bc| bc.value.ca) {
        return Err(BundleError::NotCa { index, subject });
    }
    if exts.key_usage.is_some_and(|ku| !ku.value.key_cert_sign()) {
        return Err(BundleError::MissingKeyCertSign { index, subject });
    }
    Ok(subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn empty_root_list_is_rejected() {
        assert_eq!(TrustBundle::new(td(), vec![]), Err(BundleError::Empty));
    }

    #[test]
    fn empty_pem_is_rejected() {
        assert_eq!(TrustBundle::from_pem(td(), ""), Err(BundleError::Empty));
        assert_eq!(
            TrustBundle::from_pem(td(), "just some text\n"),
            Err(BundleError::Empty)
        );
    }

    #[test]
    fn empty_concatenated_der_is_rejected() {
        assert_eq!(
            TrustBundle::from_concatenated_der(td(), &[]),
            Err(BundleError::Empty)
        );
    }

    #[test]
    fn pem_with_private_key_section_is_rejected() {
        let pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            TrustBundle::from_pem(td(), pem),
            Err(BundleError::NotACertificate {
                label: "PRIVATE KEY".into()
            })
        );
    }

    #[test]
    fn pem_with_carriage_return_line_breaks_is_checked_too() {
        let pem = "x\r-----BEGIN PRIVATE KEY-----\rAAAA\r-----END PRIVATE KEY-----\r";
        assert_eq!(
            TrustBundle::from_pem(td(), pem),
            Err(BundleError::NotACertificate {
                label: "PRIVATE KEY".into()
            })
        );
    }

    #[test]
    fn pem_with_unknown_section_is_rejected() {
        let pem = "-----BEGIN TRUSTED CERTIFICATE-----\nAAAA\n-----END TRUSTED CERTIFICATE-----\n";
        assert_eq!(
            TrustBundle::from_pem(td(), pem),
            Err(BundleError::NotACertificate {
                label: "TRUSTED CERTIFICATE".into()
            })
        );
    }

    #[test]
    fn pem_with_broken_base64_is_rejected() {
        let pem = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            TrustBundle::from_pem(td(), pem),
            Err(BundleError::Pem(_))
        ));
    }

    #[test]
    fn pem_without_end_marker_is_rejected() {
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(matches!(
            TrustBundle::from_pem(td(), pem),
            Err(BundleError::Pem(_))
        ));
    }

    #[test]
    fn certificate_section_with_garbage_der_is_rejected() {
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            TrustBundle::from_pem(td(), pem),
            Err(BundleError::Unparseable { index: 0, .. })
        ));
    }
}
