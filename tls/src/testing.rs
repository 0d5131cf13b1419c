//! Certificate authorities and SVIDs made on the spot, for tests of
//! anything that does mesh TLS (feature `test-util`). Test code: it panics
//! on failure.

use citadel_identity::{TrustBundle, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

/// A certificate and its PKCS#8 key.
pub struct TestSvid {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER.
    pub key_pkcs8: Vec<u8>,
}

/// A self-signed root of a trust domain that issues SVIDs.
pub struct TestCa {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl TestCa {
    /// A new root for `trust_domain`, named `name`.
    pub fn new(trust_domain: &str, name: &str) -> Self {
        let trust_domain = TrustDomain::new(trust_domain).expect("trust domain");
        let key = KeyPair::generate().expect("root key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = params.self_signed(&key).expect("root").der().clone();
        Self {
            trust_domain,
            issuer: Issuer::new(params, key),
            root,
        }
    }

    /// The bundle of this root alone.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.trust_domain.clone(), vec![self.root.clone()]).expect("bundle")
    }

    /// An X509-SVID for `spiffe_id`.
    pub fn svid(&self, spiffe_id: &str) -> TestSvid {
        self.leaf_with_uris(&[spiffe_id])
    }

    /// A leaf with exactly these URI SANs (to test the one-URI rule).
    pub fn leaf_with_uris(&self, uris: &[&str]) -> TestSvid {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "workload");
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("URI SAN")))
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        TestSvid {
            chain: vec![cert.der().clone()],
            key_pkcs8: key.serialize_der(),
        }
    }
}
