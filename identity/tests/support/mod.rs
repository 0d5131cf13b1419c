//! Test-only certificate factory.
//!
//! Every certificate is described by a [`CertSpec`] whose constructors
//! ([`CertSpec::leaf`], [`CertSpec::ca`]) describe a certificate that passes
//! every check. A rejection test changes exactly one field, so the test proves
//! the rule it names and no other. Every extension is written by hand (as an
//! rcgen custom extension), so criticality and content are fully under the
//! test's control.
#![allow(dead_code)]

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, Issuer, KeyPair,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use citadel_identity::{TrustBundle, TrustDomain};

/// The fixed "current time" of every test, unix seconds.
pub const NOW: i64 = 1_750_000_000;
/// One day in seconds.
pub const DAY: i64 = 86_400;
/// The trust domain of the default PKI.
pub const TD: &str = "example.org";
/// The SPIFFE ID of the default leaf.
pub const LEAF_ID: &str = "spiffe://example.org/ns/default/sa/web";

/// An RSA-2048 public key (no private key is needed: leaves are signed by ECDSA CAs).
const RSA_PUBLIC_KEY_PEM: &str = include_str!("rsa2048_public.pem");

const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
const OID_KEY_USAGE: &[u64] = &[2, 5, 29, 15];
const OID_EXT_KEY_USAGE: &[u64] = &[2, 5, 29, 37];
const OID_SUBJECT_ALT_NAME: &[u64] = &[2, 5, 29, 17];
const OID_SUBJECT_KEY_ID: &[u64] = &[2, 5, 29, 14];
const OID_AUTHORITY_KEY_ID: &[u64] = &[2, 5, 29, 35];
/// DER content octets of id-kp-serverAuth (1.3.6.1.5.5.7.3.1).
const SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
/// DER content octets of id-kp-clientAuth (1.3.6.1.5.5.7.3.2).
const CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// basicConstraints content and criticality.
#[derive(Clone, Debug)]
pub struct BasicConstraintsSpec {
    pub ca: bool,
    pub critical: bool,
}

/// keyUsage bits and criticality.
#[derive(Clone, Debug, Default)]
pub struct KeyUsageSpec {
    pub critical: bool,
    pub digital_signature: bool,
    pub key_encipherment: bool,
    pub key_agreement: bool,
    pub key_cert_sign: bool,
    pub crl_sign: bool,
}

/// extKeyUsage purposes and criticality.
#[derive(Clone, Debug)]
pub struct EkuSpec {
    pub critical: bool,
    pub server_auth: bool,
    pub client_auth: bool,
}

/// The subject key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A fresh ECDSA P-256 key pair.
    EcdsaP256,
    /// A fixed RSA-2048 public key (leaves only: there is no private key).
    Rsa2048,
}

/// Everything about a certificate that a check might look at.
#[derive(Clone, Debug)]
pub struct CertSpec {
    /// Subject common name; `None` makes the subject empty.
    pub subject_cn: Option<String>,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    /// `None`: critical exactly when the subject is empty (RFC 5280 §4.1.2.6).
    pub san_critical: Option<bool>,
    pub basic_constraints: Option<BasicConstraintsSpec>,
    pub key_usage: Option<KeyUsageSpec>,
    pub eku: Option<EkuSpec>,
    pub subject_key_id: bool,
    pub authority_key_id: bool,
    /// Serial number magnitude (big-endian); rcgen encodes it as a positive INTEGER.
    pub serial: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    pub key: KeyKind,
    /// Raw extra extensions `(oid, DER value, critical)`, written after the others.
    pub extra_extensions: Vec<(Vec<u64>, Vec<u8>, bool)>,
}

impl CertSpec {
    /// A leaf that satisfies the SPIFFE X509-SVID rules and Citadel's profile.
    pub fn leaf() -> CertSpec {
        CertSpec {
            subject_cn: Some("web".into()),
            uri_sans: vec![LEAF_ID.into()],
            dns_sans: vec![],
            san_critical: None,
            basic_constraints: Some(BasicConstraintsSpec {
                ca: false,
                critical: true,
            }),
            key_usage: Some(KeyUsageSpec {
                critical: true,
                digital_signature: true,
                ..KeyUsageSpec::default()
            }),
            eku: Some(EkuSpec {
                critical: false,
                server_auth: true,
                client_auth: true,
            }),
            subject_key_id: true,
            authority_key_id: true,
            serial: vec![
                0x3a, 0x51, 0x9c, 0x07, 0xee, 0x12, 0x40, 0x8d, 0x61, 0x2f, 0xb3, 0x04, 0x9a, 0x7c,
                0x55, 0x10,
            ],
            not_before: NOW - DAY,
            not_after: NOW + DAY,
            key: KeyKind::EcdsaP256,
            extra_extensions: vec![],
        }
    }

    /// A leaf with another SPIFFE ID.
    pub fn leaf_for(id: &str) -> CertSpec {
        CertSpec {
            uri_sans: vec![id.into()],
            ..CertSpec::leaf()
        }
    }

    /// A CA certificate for `td` that satisfies the SPIFFE signing-certificate rules.
    pub fn ca(td: &str, cn: &str) -> CertSpec {
        CertSpec {
            subject_cn: Some(cn.into()),
            uri_sans: vec![format!("spiffe://{td}")],
            dns_sans: vec![],
            san_critical: None,
            basic_constraints: Some(BasicConstraintsSpec {
                ca: true,
                critical: true,
            }),
            key_usage: Some(KeyUsageSpec {
                critical: true,
                key_cert_sign: true,
                crl_sign: true,
                ..KeyUsageSpec::default()
            }),
            eku: None,
            subject_key_id: true,
            authority_key_id: false,
            serial: vec![0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08],
            not_before: NOW - 365 * DAY,
            not_after: NOW + 365 * DAY,
            key: KeyKind::EcdsaP256,
            extra_extensions: vec![],
        }
    }

    fn subject_is_empty(&self) -> bool {
        self.subject_cn.is_none()
    }
}

/// A CA: its certificate, key and the parameters its subject came from.
pub struct Authority {
    params: CertificateParams,
    key: KeyPair,
    key_id: Vec<u8>,
    pub cert: CertificateDer<'static>,
}

impl Authority {
    /// A self-signed root built from `spec`.
    pub fn root(spec: &CertSpec) -> Authority {
        assert_eq!(spec.key, KeyKind::EcdsaP256, "CAs need a private key");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let key_id = key_identifier(&key);
        let params = params_for(spec, &key_id, &key_id);
        let cert = params.self_signed(&key).unwrap().der().clone();
        Authority {
            params,
            key,
            key_id,
            cert,
        }
    }

    /// A CA certificate built from `spec` and signed by `self`.
    pub fn sub_ca(&self, spec: &CertSpec) -> Authority {
        assert_eq!(spec.key, KeyKind::EcdsaP256, "CAs need a private key");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let key_id = key_identifier(&key);
        let params = params_for(spec, &key_id, &self.key_id);
        let cert = params
            .signed_by(&key, &Issuer::from_params(&self.params, &self.key))
            .unwrap()
            .der()
            .clone();
        Authority {
            params,
            key,
            key_id,
            cert,
        }
    }

    /// An end-entity certificate built from `spec` and signed by `self`.
    pub fn issue(&self, spec: &CertSpec) -> CertificateDer<'static> {
        let issuer = Issuer::from_params(&self.params, &self.key);
        match spec.key {
            KeyKind::EcdsaP256 => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
                let params = params_for(spec, &key_identifier(&key), &self.key_id);
                params.signed_by(&key, &issuer).unwrap().der().clone()
            }
            KeyKind::Rsa2048 => {
                let key = SubjectPublicKeyInfo::from_pem(RSA_PUBLIC_KEY_PEM).unwrap();
                let params = params_for(spec, &key_identifier(&key), &self.key_id);
                params.signed_by(&key, &issuer).unwrap().der().clone()
            }
        }
    }
}

/// A root and an intermediate for one trust domain.
pub struct Pki {
    pub root: Authority,
    pub intermediate: Authority,
}

impl Pki {
    /// Root and intermediate for `td`, both valid ±365 days around [`NOW`].
    pub fn new(td: &str) -> Pki {
        let root = Authority::root(&CertSpec::ca(td, &format!("{td} root 1")));
        let intermediate = root.sub_ca(&CertSpec {
            authority_key_id: true,
            ..CertSpec::ca(td, &format!("{td} intermediate 1"))
        });
        Pki { root, intermediate }
    }

    /// The trust bundle holding this PKI's root.
    pub fn bundle(&self) -> TrustBundle {
        let td = TrustDomain::new(TD).unwrap();
        TrustBundle::new(td, vec![self.root.cert.clone()]).unwrap()
    }

    /// A leaf from `spec` signed by the intermediate, with the chain `[leaf, intermediate]`.
    pub fn chain(&self, spec: &CertSpec) -> Vec<CertificateDer<'static>> {
        vec![
            self.intermediate.issue(spec),
            self.intermediate.cert.clone(),
        ]
    }
}

/// Returns `der` with the serial number's sign bit set: the serial becomes
/// negative and nothing else in the TBS changes. The signature no longer
/// verifies, which the profile checks (they verify no signature) do not see.
pub fn with_negative_serial(der: &CertificateDer<'_>) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let raw = cert.raw_serial();
    assert!(
        raw[0] != 0 && raw[0] & 0x80 == 0,
        "serial must start with a positive, non-padding byte"
    );
    let offset = raw.as_ptr() as usize - der.as_ptr() as usize;
    let mut out = der.to_vec();
    out[offset] |= 0x80;
    out
}

fn key_identifier(key: &impl PublicKeyData) -> Vec<u8> {
    CertificateParams::default().key_identifier(key)
}

fn params_for(
    spec: &CertSpec,
    subject_key_id: &[u8],
    authority_key_id: &[u8],
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = OffsetDateTime::from_unix_timestamp(spec.not_before).unwrap();
    params.not_after = OffsetDateTime::from_unix_timestamp(spec.not_after).unwrap();
    params.serial_number = Some(SerialNumber::from_slice(&spec.serial));
    params.distinguished_name = DistinguishedName::new();
    if let Some(cn) = &spec.subject_cn {
        params
            .distinguished_name
            .push(DnType::CommonName, cn.as_str());
    }

    let mut exts = Vec::new();
    if let Some(bc) = &spec.basic_constraints {
        let content = if bc.ca {
            tlv(0x01, &[0xff])
        } else {
            Vec::new()
        };
        exts.push(ext(OID_BASIC_CONSTRAINTS, tlv(0x30, &content), bc.critical));
    }
    if let Some(ku) = &spec.key_usage {
        let bits = (u8::from(ku.digital_signature) << 7)
            | (u8::from(ku.key_encipherment) << 5)
            | (u8::from(ku.key_agreement) << 3)
            | (u8::from(ku.key_cert_sign) << 2)
            | (u8::from(ku.crl_sign) << 1);
        let bit_string = if bits == 0 {
            tlv(0x03, &[0x00])
        } else {
            tlv(0x03, &[bits.trailing_zeros() as u8, bits])
        };
        exts.push(ext(OID_KEY_USAGE, bit_string, ku.critical));
    }
    if let Some(eku) = &spec.eku {
        let mut purposes = Vec::new();
        if eku.server_auth {
            purposes.extend(tlv(0x06, SERVER_AUTH));
        }
        if eku.client_auth {
            purposes.extend(tlv(0x06, CLIENT_AUTH));
        }
        exts.push(ext(OID_EXT_KEY_USAGE, tlv(0x30, &purposes), eku.critical));
    }
    if !spec.uri_sans.is_empty() || !spec.dns_sans.is_empty() {
        let mut names = Vec::new();
        for uri in &spec.uri_sans {
            names.extend(tlv(0x86, uri.as_bytes()));
        }
        for dns in &spec.dns_sans {
            names.extend(tlv(0x82, dns.as_bytes()));
        }
        let critical = spec.san_critical.unwrap_or(spec.subject_is_empty());
        exts.push(ext(OID_SUBJECT_ALT_NAME, tlv(0x30, &names), critical));
    }
    if spec.subject_key_id {
        exts.push(ext(OID_SUBJECT_KEY_ID, tlv(0x04, subject_key_id), false));
    }
    if spec.authority_key_id {
        let aki = tlv(0x30, &tlv(0x80, authority_key_id));
        exts.push(ext(OID_AUTHORITY_KEY_ID, aki, false));
    }
    for (oid, value, critical) in &spec.extra_extensions {
        exts.push(ext(oid, value.clone(), *critical));
    }
    params.custom_extensions = exts;
    params
}

fn ext(oid: &[u64], value: Vec<u8>, critical: bool) -> CustomExtension {
    let mut ext = CustomExtension::from_oid_content(oid, value);
    ext.set_criticality(critical);
    ext
}

/// DER tag-length-value with a definite length.
pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
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
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// The raw DER value of a keyUsage extension with only digitalSignature set.
pub fn key_usage_digital_signature_der() -> Vec<u8> {
    tlv(0x03, &[0x07, 0x80])
}

/// The OID arcs of keyUsage, for `extra_extensions`.
pub fn key_usage_oid() -> Vec<u64> {
    OID_KEY_USAGE.to_vec()
}
