//! Signing authorities: a CA certificate, its private key and its chain to a root.
//!
//! An [`Authority`] is created self-signed on first start, or imported from
//! an operator's intermediate (Istio's `cacerts` layout, or `tls.crt` /
//! `tls.key` / `ca.crt`). It signs leaves to the exact X509-SVID profile of
//! design §3; the lifetime of each leaf is decided beforehand by
//! `citadel_identity::lifetime` and only applied here.

use std::net::IpAddr;
use std::path::Path;

use citadel_identity::lifetime::{SignerWindow, Validity};
use citadel_identity::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::csr::KeyKind;
use crate::keystore::KeyPem;
use crate::pemutil::{cert_to_pem, certs_from_pem, sha256};

/// Why an authority could not be created, loaded or used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthorityError {
    /// An operator-supplied file is missing or unreadable.
    #[error("{0}")]
    Files(String),
    /// The certificates or key are not a usable signing set.
    #[error("invalid signing authority: {0}")]
    Invalid(String),
    /// Building or signing a certificate failed.
    #[error("certificate signing failed: {0}")]
    Signing(String),
}

fn invalid(msg: impl Into<String>) -> AuthorityError {
    AuthorityError::Invalid(msg.into())
}

/// A certificate this CA has just signed.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
    /// The certificate, PEM.
    pub pem: String,
    /// Lowercase hex of the serial number.
    pub serial_hex: String,
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
    /// SHA-256 of the DER.
    pub der_sha256: [u8; 32],
}

/// What to put into a leaf certificate. Everything here was decided and
/// authorized before signing; the authority adds nothing of its own but the
/// fixed profile.
#[derive(Debug, Clone)]
pub struct LeafSpec<'a> {
    /// The SPIFFE ID (the one URI SAN), if any. Workload leaves always have one;
    /// the CA's own TLS serving certificate has none.
    pub spiffe_id: Option<&'a SpiffeId>,
    /// DNS SANs (only for callers authorized for them, and the CA itself).
    pub dns_names: &'a [String],
    /// IP SANs (the CA's serving certificate only).
    pub ip_addresses: &'a [IpAddr],
    /// Subject common name; `None` leaves the subject empty (and the SAN critical).
    pub common_name: Option<&'a str>,
    /// DER SubjectPublicKeyInfo of the subject's key.
    pub spki_der: &'a [u8],
    /// The subject key's kind (RSA keys also get keyEncipherment).
    pub key_kind: KeyKind,
    /// The validity window.
    pub validity: Validity,
    /// The serial number (positive, 16 bytes).
    pub serial: [u8; 16],
}

/// A CA certificate with its key and its chain, able to sign.
pub struct Authority {
    id: String,
    signer: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    window: SignerWindow,
    root_not_after: i64,
    /// The chain a leaf's response carries after the leaf: signer (unless it is
    /// the root), intermediates, root last.
    chain_pem: Vec<String>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("id", &self.id)
            .field("window", &(self.window.not_before, self.window.not_after))
            .finish_non_exhaustive()
    }
}

/// A fresh random serial: 16 bytes, positive, with a non-zero first byte so
/// its DER encoding is always exactly 16 bytes.
pub fn random_serial() -> Result<[u8; 16], AuthorityError> {
    use ring::rand::SecureRandom;
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| AuthorityError::Signing("system random source failed".into()))?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

fn to_time(unix: i64) -> Result<time::OffsetDateTime, AuthorityError> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|_| AuthorityError::Signing(format!("time {unix} out of range")))
}

fn parse_cert<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, AuthorityError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| invalid(format!("{what} does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(invalid(format!("{what} has trailing bytes")));
    }
    Ok(cert)
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok()
}

/// Loads a private key from PEM: PKCS#8 (`PRIVATE KEY`) or PKCS#1 RSA
/// (`RSA PRIVATE KEY`, as older `openssl genrsa` writes and Istio samples use).
pub fn key_pair_from_pem(key: &KeyPem) -> Result<KeyPair, AuthorityError> {
    let parsed = pem::parse(key.expose()).map_err(|_| invalid("private key is not PEM"))?;
    let der = match parsed.tag() {
        "PRIVATE KEY" => parsed.contents().to_vec(),
        "RSA PRIVATE KEY" => pkcs1_to_pkcs8(parsed.contents()),
        "EC PRIVATE KEY" => {
            return Err(invalid(
                "SEC1 'EC PRIVATE KEY' is not supported; convert it with \
                 `openssl pkcs8 -topk8 -nocrypt -in ca-key.pem -out ca-key.pkcs8.pem`",
            ));
        }
        "ENCRYPTED PRIVATE KEY" => {
            return Err(invalid("encrypted private keys are not supported"));
        }
        other => {
            return Err(invalid(format!(
                "unexpected PEM block '{other}' for a private key"
            )));
        }
    };
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der);
    KeyPair::try_from(&der).map_err(|e| invalid(format!("private key is not usable: {e}")))
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

/// Wraps a PKCS#1 RSAPrivateKey into a PKCS#8 PrivateKeyInfo.
fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    const VERSION_0: &[u8] = &[0x02, 0x01, 0x00];
    const RSA_ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut body = Vec::with_capacity(pkcs1.len() + 32);
    body.extend_from_slice(VERSION_0);
    body.extend_from_slice(RSA_ALG);
    body.extend_from_slice(&der_tlv(0x04, pkcs1));
    der_tlv(0x30, &body)
}

impl Authority {
    /// Creates a new self-signed root for `trust_domain`, valid from `now`
    /// (backdated by two minutes) for `lifetime_secs`. Its subject carries the
    /// serial, so no two roots share a subject.
    pub fn create_root(
        trust_domain: &TrustDomain,
        now: i64,
        lifetime_secs: i64,
    ) -> Result<(Authority, KeyPem), AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AuthorityError::Signing(e.to_string()))?;
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Citadel");
        params.distinguished_name.push(
            DnType::CommonName,
            format!(
                "Citadel Root CA {} {}",
                trust_domain.as_str(),
                &hex::encode(serial)[..16]
            ),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let td_uri = trust_domain.id().to_string();
        params.subject_alt_names = vec![SanType::URI(
            td_uri
                .as_str()
                .try_into()
                .map_err(|_| invalid("trust domain URI is not IA5"))?,
        )];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = to_time(now - 120)?;
        params.not_after = to_time(now + lifetime_secs)?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| AuthorityError::Signing(e.to_string()))?;
        let key_pem = KeyPem::new(key.serialize_pem());
        let root = cert.der().clone();
        let authority = Authority::from_parts(root.clone(), Vec::new(), root, &key_pem)?;
        Ok((authority, key_pem))
    }

    /// Assembles an authority from a signing certificate, the intermediates
    /// above it, its root and its key, checking that they form a valid
    /// signing chain and that the key belongs to the signing certificate.
    pub fn from_parts(
        signer: CertificateDer<'static>,
        intermediates: Vec<CertificateDer<'static>>,
        root: CertificateDer<'static>,
        key: &KeyPem,
    ) -> Result<Authority, AuthorityError> {
        let key_pair = key_pair_from_pem(key)?;
        let signer_cert = parse_cert(&signer, "signing certificate")?;
        citadel_identity::svid::check_signing_certificate(&signer)
            .map_err(|e| invalid(format!("signing certificate: {e}")))?;
        if signer_cert.public_key().raw != key_pair.subject_public_key_info().as_slice() {
            return Err(invalid(
                "the private key does not belong to the signing certificate",
            ));
        }
        let root_cert = parse_cert(&root, "root certificate")?;
        let root_not_after = root_cert.validity().not_after.timestamp();
        if !is_self_signed(&root_cert) {
            return Err(invalid("root certificate is not self-signed"));
        }
        // Walk signer -> intermediates -> root, each signed by the next.
        let mut path: Vec<(&CertificateDer<'static>, &str)> =
            vec![(&signer, "signing certificate")];
        for i in &intermediates {
            path.push((i, "intermediate certificate"));
        }
        let signer_is_root = signer == root;
        if !signer_is_root {
            path.push((&root, "root certificate"));
        }
        let mut not_before = i64::MIN;
        let mut not_after = i64::MAX;
        for (idx, (der, what)) in path.iter().enumerate() {
            let cert = parse_cert(der, what)?;
            not_before = not_before.max(cert.validity().not_before.timestamp());
            not_after = not_after.min(cert.validity().not_after.timestamp());
            if idx > 0 {
                citadel_identity::svid::check_signing_certificate(der)
                    .map_err(|e| invalid(format!("{what}: {e}")))?;
            }
            if let Some((parent_der, parent_what)) = path.get(idx + 1) {
                let parent = parse_cert(parent_der, parent_what)?;
                cert.verify_signature(Some(parent.public_key())).map_err(|_| {
                    invalid(format!("{what} is not signed by the next certificate in the chain ({parent_what})"))
                })?;
            }
        }
        let issuer = Issuer::from_ca_cert_der(&signer, key_pair)
            .map_err(|e| invalid(format!("signing certificate: {e}")))?;
        let mut chain_pem = Vec::new();
        if !signer_is_root {
            chain_pem.push(cert_to_pem(&signer));
        }
        chain_pem.extend(intermediates.iter().map(|c| cert_to_pem(c)));
        chain_pem.push(cert_to_pem(&root));
        let id = hex::encode(&sha256(&signer)[..16]);
        Ok(Authority {
            id,
            signer,
            intermediates,
            root,
            issuer,
            window: SignerWindow {
                not_before,
                not_after,
            },
            root_not_after,
            chain_pem,
        })
    }

    /// Imports an operator's CA from a directory: Istio's `cacerts` layout
    /// (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`) or the
    /// Kubernetes TLS layout (`tls.crt`, `tls.key`, `ca.crt`).
    pub fn import_dir(dir: &Path) -> Result<(Authority, KeyPem), AuthorityError> {
        let read = |name: &str| -> Result<String, AuthorityError> {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map_err(|e| AuthorityError::Files(format!("cannot read {}: {e}", path.display())))
        };
        let has = |name: &str| dir.join(name).exists();
        let certs = |text: &str, name: &str| certs_from_pem(text, name).map_err(invalid);
        let (signer_chain, key_name, root_text, root_name, chain_extra) = if has("ca-cert.pem")
            || has("ca-key.pem")
            || has("root-cert.pem")
        {
            for name in [
                "ca-cert.pem",
                "ca-key.pem",
                "cert-chain.pem",
                "root-cert.pem",
            ] {
                if !has(name) {
                    return Err(AuthorityError::Files(format!(
                        "incomplete CA directory {}: {name} is missing (Istio cacerts layout needs ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)",
                        dir.display()
                    )));
                }
            }
            (
                certs(&read("ca-cert.pem")?, "ca-cert.pem")?,
                "ca-key.pem",
                read("root-cert.pem")?,
                "root-cert.pem",
                certs(&read("cert-chain.pem")?, "cert-chain.pem")?,
            )
        } else if has("tls.crt") || has("tls.key") || has("ca.crt") {
            for name in ["tls.crt", "tls.key", "ca.crt"] {
                if !has(name) {
                    return Err(AuthorityError::Files(format!(
                        "incomplete CA directory {}: {name} is missing (TLS layout needs tls.crt, tls.key, ca.crt)",
                        dir.display()
                    )));
                }
            }
            (
                certs(&read("tls.crt")?, "tls.crt")?,
                "tls.key",
                read("ca.crt")?,
                "ca.crt",
                Vec::new(),
            )
        } else {
            return Err(AuthorityError::Files(format!(
                "{} holds no CA: expected ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem (or tls.crt, tls.key and ca.crt)",
                dir.display()
            )));
        };
        let key = crate::keystore::read_private_key_file(&dir.join(key_name))
            .map_err(|e| AuthorityError::Files(e.to_string()))?;
        let roots = certs(&root_text, root_name)?;
        let [root] = roots.as_slice() else {
            return Err(invalid(format!(
                "{root_name} must hold exactly one certificate, found {}",
                roots.len()
            )));
        };
        let Some((signer, rest)) = signer_chain.split_first() else {
            return Err(invalid("the CA certificate file holds no certificate"));
        };
        // cert-chain.pem conventionally repeats ca-cert.pem and the root; keep
        // only what lies strictly between them, in order, without repeats.
        let mut intermediates: Vec<CertificateDer<'static>> = Vec::new();
        for c in rest.iter().chain(chain_extra.iter()) {
            if c != signer && c != root && !intermediates.contains(c) {
                intermediates.push(c.clone());
            }
        }
        let authority = Authority::from_parts(signer.clone(), intermediates, root.clone(), &key)?;
        Ok((authority, key))
    }

    /// Stable identifier: hex of the first 16 bytes of SHA-256 of the signing certificate.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The signing certificate.
    pub fn signer(&self) -> &CertificateDer<'static> {
        &self.signer
    }

    /// Intermediates between the signer and the root.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// The root this authority chains to.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The validity window every leaf must fit in.
    pub fn window(&self) -> SignerWindow {
        self.window
    }

    /// notAfter of the root, unix seconds.
    pub fn root_not_after(&self) -> i64 {
        self.root_not_after
    }

    /// PEM certificates that follow a leaf in a response: signer (unless it
    /// is the root), intermediates, root last.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain_pem
    }

    /// Signs a leaf to the fixed profile: one URI SAN (critical when the
    /// subject is empty), basicConstraints CA=false (critical), keyUsage
    /// critical with digitalSignature (+keyEncipherment for RSA), EKU
    /// serverAuth+clientAuth, SKI and AKI.
    pub fn sign(&self, spec: &LeafSpec<'_>) -> Result<IssuedCertificate, AuthorityError> {
        let sign_err = |e: rcgen::Error| AuthorityError::Signing(e.to_string());
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spec.spki_der).map_err(sign_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = spec.common_name {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let mut sans = Vec::new();
        if let Some(id) = spec.spiffe_id {
            sans.push(SanType::URI(id.as_str().try_into().map_err(|_| {
                AuthorityError::Signing("SPIFFE ID is not IA5".into())
            })?));
        }
        for dns in spec.dns_names {
            sans.push(SanType::DnsName(dns.as_str().try_into().map_err(|_| {
                AuthorityError::Signing(format!("DNS name {dns:?} is not IA5"))
            })?));
        }
        sans.extend(spec.ip_addresses.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.key_kind.is_rsa() {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&spec.serial));
        params.not_before = to_time(spec.validity.not_before)?;
        params.not_after = to_time(spec.validity.not_after)?;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(sign_err)?;
        let der = cert.der().clone();
        Ok(IssuedCertificate {
            der_sha256: sha256(&der),
            pem: cert.pem(),
            serial_hex: hex::encode(spec.serial),
            not_before: spec.validity.not_before,
            not_after: spec.validity.not_after,
            der,
        })
    }
}

/// Signs a throw-away leaf with `authority` and verifies it with our own chain verifier
/// against the authority's root, as every workload's peer will. This catches sets that
/// pass the structural checks but yield leaves nothing can verify, e.g. a signing
/// certificate whose subject repeats an attribute (two `OU` or `DC`): the issuer name
/// written into leaves then differs from the subject the verifier looks for.
pub fn probe(
    authority: &Authority,
    trust_domain: &TrustDomain,
    now: i64,
) -> Result<(), AuthorityError> {
    let window = authority.window();
    if window.not_after <= now {
        return Err(invalid(format!(
            "the signing chain expired at {} (now {now})",
            window.not_after
        )));
    }
    let at = now.max(window.not_before);
    let validity = Validity {
        not_before: at.max(window.not_before),
        not_after: (at + 60).min(window.not_after),
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| AuthorityError::Signing(e.to_string()))?;
    let id = SpiffeId::parse(&format!("spiffe://{}/citadel/probe", trust_domain.as_str()))
        .map_err(|e| AuthorityError::Signing(e.to_string()))?;
    let leaf = authority.sign(&LeafSpec {
        spiffe_id: Some(&id),
        dns_names: &[],
        ip_addresses: &[],
        common_name: None,
        spki_der: &key.subject_public_key_info(),
        key_kind: KeyKind::EcdsaP256,
        validity,
        serial: random_serial()?,
    })?;
    let mut chain = vec![leaf.der];
    if authority.signer() != authority.root() {
        chain.push(authority.signer().clone());
    }
    chain.extend(authority.intermediates().iter().cloned());
    let bundle =
        citadel_identity::TrustBundle::new(trust_domain.clone(), vec![authority.root().clone()])
            .map_err(|e| invalid(format!("the root is not a usable trust anchor: {e}")))?;
    let check_at = u64::try_from(validity.not_before + 1).unwrap_or(0);
    citadel_identity::verify_chain(&chain, &bundle, check_at).map_err(|e| {
        invalid(format!(
            "a probe certificate signed by it does not verify against its own root ({e}); \
             check that the signing certificate's subject has no repeated attribute (such as two OU or DC) \
             and that the chain files are complete and in order"
        ))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn new_roots_have_distinct_subjects() {
        let (a, _) = Authority::create_root(&td(), 1_700_000_000, 3600).unwrap();
        let (b, _) = Authority::create_root(&td(), 1_700_000_000, 3600).unwrap();
        let sa = parse_cert(a.root(), "a").unwrap().subject().to_string();
        let sb = parse_cert(b.root(), "b").unwrap().subject().to_string();
        assert_ne!(sa, sb);
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn root_is_a_valid_signing_certificate() {
        let (a, _) = Authority::create_root(&td(), 1_700_000_000, 3600).unwrap();
        citadel_identity::svid::check_signing_certificate(a.root()).unwrap();
        assert_eq!(a.chain_pem().len(), 1);
        assert_eq!(a.window().not_after, 1_700_003_600);
    }

    #[test]
    fn rejects_key_that_does_not_match_the_certificate() {
        let (a, _) = Authority::create_root(&td(), 1_700_000_000, 3600).unwrap();
        let (_, other_key) = Authority::create_root(&td(), 1_700_000_000, 3600).unwrap();
        let err = Authority::from_parts(a.root().clone(), vec![], a.root().clone(), &other_key)
            .unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn pkcs1_rsa_key_is_accepted() {
        let pem = include_str!("../tests/fixtures/rsa2048.pkcs1.key.pem");
        let key = key_pair_from_pem(&KeyPem::new(pem.to_owned())).unwrap();
        assert!(key.is_compatible(&rcgen::PKCS_RSA_SHA256));
    }
}
