//! Trust bundles built from real certificates.

mod support;

use citadel_identity::{BundleError, TrustBundle, TrustDomain};
use rustls_pki_types::CertificateDer;
use support::{CertSpec, Pki, TD};

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn root(cn: &str) -> CertificateDer<'static> {
    support::Authority::root(&CertSpec::ca(TD, cn)).cert
}

#[test]
fn bundle_keeps_trust_domain_and_roots() {
    let (a, b) = (root("root a"), root("root b"));
    let bundle = TrustBundle::new(td(), vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(bundle.trust_domain(), &td());
    assert_eq!(bundle.roots(), &[a.clone(), b.clone()]);
    assert_eq!(bundle.trust_anchors().len(), 2);
    assert!(bundle.contains(&a));
    assert!(bundle.contains(&b));
    assert!(!bundle.contains(&root("root c")));
}

#[test]
fn duplicate_roots_are_removed_and_order_kept() {
    let (a, b) = (root("root a"), root("root b"));
    let bundle = TrustBundle::new(td(), vec![b.clone(), a.clone(), b.clone(), a.clone()]).unwrap();
    assert_eq!(bundle.roots(), &[b, a]);
    assert_eq!(bundle.trust_anchors().len(), 2);
}

#[test]
fn pem_round_trips() {
    let bundle = TrustBundle::new(td(), vec![root("root a"), root("root b")]).unwrap();
    let pem = bundle.to_pem();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----\n").count(), 2);
    assert_eq!(pem.matches("-----END CERTIFICATE-----\n").count(), 2);
    assert_eq!(TrustBundle::from_pem(td(), &pem).unwrap(), bundle);
}

#[test]
fn pem_lines_are_at_most_64_characters() {
    let bundle = TrustBundle::new(td(), vec![root("root a")]).unwrap();
    let pem = bundle.to_pem();
    let body: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(body.len() > 1);
    assert!(body.iter().all(|l| l.len() <= 64));
    assert!(body[..body.len() - 1].iter().all(|l| l.len() == 64));
}

#[test]
fn pem_with_comments_and_crlf_is_accepted() {
    let bundle = TrustBundle::new(td(), vec![root("root a")]).unwrap();
    let pem = format!("# our root\r\n{}", bundle.to_pem().replace('\n', "\r\n"));
    assert_eq!(TrustBundle::from_pem(td(), &pem).unwrap(), bundle);
}

#[test]
fn pem_with_a_key_after_the_certificate_is_rejected() {
    let bundle = TrustBundle::new(td(), vec![root("root a")]).unwrap();
    let pem = format!(
        "{}-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        bundle.to_pem()
    );
    assert_eq!(
        TrustBundle::from_pem(td(), &pem),
        Err(BundleError::NotACertificate {
            label: "EC PRIVATE KEY".into()
        })
    );
}

#[test]
fn concatenated_der_round_trips() {
    let bundle = TrustBundle::new(td(), vec![root("root a"), root("root b")]).unwrap();
    let der = bundle.to_concatenated_der();
    assert_eq!(
        TrustBundle::from_concatenated_der(td(), &der).unwrap(),
        bundle
    );
}

#[test]
fn concatenated_der_with_trailing_garbage_is_rejected() {
    let bundle = TrustBundle::new(td(), vec![root("root a")]).unwrap();
    let mut der = bundle.to_concatenated_der();
    der.extend_from_slice(&[0x30, 0x03, 0x02]);
    assert!(matches!(
        TrustBundle::from_concatenated_der(td(), &der),
        Err(BundleError::Unparseable { index: 1, .. })
    ));
}

#[test]
fn root_that_is_not_a_ca_is_rejected() {
    let mut spec = CertSpec::ca(TD, "not a ca");
    spec.basic_constraints.as_mut().unwrap().ca = false;
    let cert = support::Authority::root(&spec).cert;
    assert!(matches!(
        TrustBundle::new(td(), vec![root("good"), cert]),
        Err(BundleError::NotCa { index: 1, .. })
    ));
}

#[test]
fn root_without_basic_constraints_is_rejected() {
    let mut spec = CertSpec::ca(TD, "no basic constraints");
    spec.basic_constraints = None;
    let cert = support::Authority::root(&spec).cert;
    assert!(matches!(
        TrustBundle::new(td(), vec![cert]),
        Err(BundleError::NotCa { index: 0, .. })
    ));
}

#[test]
fn root_with_key_usage_lacking_key_cert_sign_is_rejected() {
    let mut spec = CertSpec::ca(TD, "no keyCertSign");
    spec.key_usage.as_mut().unwrap().key_cert_sign = false;
    let cert = support::Authority::root(&spec).cert;
    let err = TrustBundle::new(td(), vec![cert]).unwrap_err();
    assert!(
        matches!(err, BundleError::MissingKeyCertSign { index: 0, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no keyCertSign"), "{err}");
}

#[test]
fn root_without_key_usage_is_accepted() {
    let mut spec = CertSpec::ca(TD, "no keyUsage");
    spec.key_usage = None;
    let cert = support::Authority::root(&spec).cert;
    assert!(TrustBundle::new(td(), vec![cert]).is_ok());
}

#[test]
fn leaf_is_not_accepted_as_a_root() {
    let pki = Pki::new(TD);
    let leaf = pki.intermediate.issue(&CertSpec::leaf());
    assert!(matches!(
        TrustBundle::new(td(), vec![leaf]),
        Err(BundleError::NotCa { index: 0, .. })
    ));
}
