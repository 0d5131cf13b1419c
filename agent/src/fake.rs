//! A fake CA behind the [`CertificateAuthority`] seam, for tests and
//! benchmarks: signs with an in-memory root and can be told to fail or to
//! misbehave.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use citadel_identity::{TrustBundle, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

use crate::ca_client::{CaError, CertificateAuthority, SignRequest};
use crate::unix_now;

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeMode {
    /// Signs what is asked.
    Normal,
    /// Answers `Unavailable`, as a CA that is down.
    Down,
    /// Signs a certificate for another identity than asked.
    WrongIdentity,
    /// Signs with a root that is not in the bundle.
    ForeignRoot,
}

struct Root {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

fn make_root(td: &TrustDomain, name: &str) -> Root {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("fake CA key: {e}"));
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if let Ok(uri) = td.id().to_string().as_str().try_into() {
        params.subject_alt_names = vec![SanType::URI(uri)];
    }
    let now = unix_now();
    params.not_before = time::OffsetDateTime::from_unix_timestamp(now - 60)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    params.not_after = time::OffsetDateTime::from_unix_timestamp(now + 10 * 365 * 86_400)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let cert = params
        .self_signed(&key)
        .unwrap_or_else(|e| panic!("fake CA root: {e}"));
    let der = cert.der().clone();
    Root {
        issuer: Issuer::new(params, key),
        der,
    }
}

/// A CA in memory.
pub struct FakeCa {
    trust_domain: TrustDomain,
    root: Root,
    foreign: Root,
    mode: Mutex<FakeMode>,
    calls: AtomicU64,
    delay: Mutex<Duration>,
}

impl FakeCa {
    /// A fake CA for `trust_domain` with a fresh root.
    pub fn new(trust_domain: TrustDomain) -> FakeCa {
        let root = make_root(&trust_domain, "Fake Citadel Root");
        let foreign = make_root(&trust_domain, "Foreign Root");
        FakeCa {
            trust_domain,
            root,
            foreign,
            mode: Mutex::new(FakeMode::Normal),
            calls: AtomicU64::new(0),
            delay: Mutex::new(Duration::ZERO),
        }
    }

    /// The bundle holding the fake's root.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.trust_domain.clone(), vec![self.root.der.clone()])
            .unwrap_or_else(|e| panic!("fake bundle: {e}"))
    }

    /// A bundle holding only a root the fake never signs with.
    pub fn foreign_bundle(&self) -> TrustBundle {
        TrustBundle::new(self.trust_domain.clone(), vec![self.foreign.der.clone()])
            .unwrap_or_else(|e| panic!("foreign bundle: {e}"))
    }

    /// Changes how the fake answers from now on.
    pub fn set_mode(&self, mode: FakeMode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// Makes every answer wait this long first.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = delay;
    }

    /// Sign calls received so far (answered or not).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl CertificateAuthority for FakeCa {
    async fn sign(&self, req: SignRequest) -> Result<Vec<String>, CaError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let delay = *self.delay.lock().unwrap_or_else(|p| p.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mode = *self.mode.lock().unwrap_or_else(|p| p.into_inner());
        let fail = |message: String| CaError {
            code: tonic::Code::InvalidArgument,
            message,
        };
        if mode == FakeMode::Down {
            return Err(CaError {
                code: tonic::Code::Unavailable,
                message: "fake CA is down".to_owned(),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(&req.csr_pem)
            .map_err(|e| fail(e.to_string()))?;
        let mut id = req.impersonate.map(|i| i.to_string()).unwrap_or_else(|| {
            format!("spiffe://{}/citadel/node/fake", self.trust_domain.as_str())
        });
        if mode == FakeMode::WrongIdentity {
            id.push_str("-impostor");
        }
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "workload");
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| fail(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial = self.calls.load(Ordering::SeqCst).to_be_bytes();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = unix_now();
        let ttl = i64::try_from(req.ttl.as_secs()).unwrap_or(86_400).max(1);
        params.not_before =
            time::OffsetDateTime::from_unix_timestamp(now - 60).map_err(|e| fail(e.to_string()))?;
        params.not_after = time::OffsetDateTime::from_unix_timestamp(now + ttl)
            .map_err(|e| fail(e.to_string()))?;
        let root = if mode == FakeMode::ForeignRoot {
            &self.foreign
        } else {
            &self.root
        };
        let cert = params
            .signed_by(&csr.public_key, &root.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let root_pem = pem::encode(&pem::Pem::new("CERTIFICATE", root.der.to_vec()));
        Ok(vec![cert.pem(), root_pem])
    }
}
