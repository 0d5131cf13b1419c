//! Chain verification against a trust bundle at an explicit time.

mod support;

use citadel_identity::{
    SignerWindow, SvidError, TrustBundle, TrustDomain, signing_chain_window, verify_chain,
};
use rustls_pki_types::CertificateDer;
use support::{CertSpec, DAY, LEAF_ID, NOW, Pki, TD};

fn now() -> u64 {
    NOW as u64
}

#[test]
fn leaf_through_intermediate_verifies() {
    let pki = Pki::new(TD);
    let svid = verify_chain(&pki.chain(&CertSpec::leaf()), &pki.bundle(), now()).unwrap();
    assert_eq!(svid.spiffe_id.as_str(), LEAF_ID);
}

#[test]
fn leaf_signed_directly_by_root_verifies() {
    let pki = Pki::new(TD);
    let leaf = pki.root.issue(&CertSpec::leaf());
    assert!(verify_chain(&[leaf], &pki.bundle(), now()).is_ok());
}

#[test]
fn root_included_in_chain_is_harmless() {
    let pki = Pki::new(TD);
    let mut chain = pki.chain(&CertSpec::leaf());
    chain.push(pki.root.cert.clone());
    assert!(verify_chain(&chain, &pki.bundle(), now()).is_ok());
}

#[test]
fn expired_leaf_is_rejected() {
    let pki = Pki::new(TD);
    let chain = pki.chain(&CertSpec::leaf());
    let later = (NOW + DAY + 1) as u64;
    assert_eq!(
        verify_chain(&chain, &pki.bundle(), later),
        Err(SvidError::Expired {
            not_after: (NOW + DAY) as u64,
            now: later
        })
    );
}

#[test]
fn not_yet_valid_leaf_is_rejected() {
    let pki = Pki::new(TD);
    let chain = pki.chain(&CertSpec::leaf());
    let earlier = (NOW - DAY - 1) as u64;
    assert_eq!(
        verify_chain(&chain, &pki.bundle(), earlier),
        Err(SvidError::NotYetValid {
            not_before: (NOW - DAY) as u64,
            now: earlier
        })
    );
}

#[test]
fn expired_intermediate_is_rejected() {
    let pki = Pki::new(TD);
    let intermediate = pki.root.sub_ca(&CertSpec {
        not_after: NOW - 1,
        authority_key_id: true,
        ..CertSpec::ca(TD, "expired intermediate")
    });
    let chain = vec![
        intermediate.issue(&CertSpec::leaf()),
        intermediate.cert.clone(),
    ];
    assert!(matches!(
        verify_chain(&chain, &pki.bundle(), now()),
        Err(SvidError::Expired { .. })
    ));
}

#[test]
fn leaf_signed_by_foreign_root_is_rejected() {
    let ours = Pki::new(TD);
    let foreign = Pki::new("foreign.example");
    // The leaf claims our trust domain; only its issuer is foreign.
    let chain = foreign.chain(&CertSpec::leaf());
    assert_eq!(
        verify_chain(&chain, &ours.bundle(), now()),
        Err(SvidError::UnknownIssuer {
            trust_domain: TD.into()
        })
    );
}

#[test]
fn leaf_signed_by_impostor_root_with_our_root_name_is_rejected() {
    let ours = Pki::new(TD);
    let impostor = Pki::new(TD); // same subject names, different keys
    let chain = impostor.chain(&CertSpec::leaf());
    assert_eq!(
        verify_chain(&chain, &ours.bundle(), now()),
        Err(SvidError::BadSignature)
    );
}

#[test]
fn missing_intermediate_is_rejected() {
    let pki = Pki::new(TD);
    let leaf = pki.intermediate.issue(&CertSpec::leaf());
    assert_eq!(
        verify_chain(&[leaf], &pki.bundle(), now()),
        Err(SvidError::UnknownIssuer {
            trust_domain: TD.into()
        })
    );
}

#[test]
fn leaf_from_another_trust_domain_is_rejected() {
    let pki = Pki::new(TD);
    let chain = pki.chain(&CertSpec::leaf_for("spiffe://other.org/ns/default/sa/web"));
    assert_eq!(
        verify_chain(&chain, &pki.bundle(), now()),
        Err(SvidError::WrongTrustDomain {
            expected: TD.into(),
            id: "spiffe://other.org/ns/default/sa/web".into()
        })
    );
}

#[test]
fn leaf_breaking_the_svid_rules_is_rejected_after_path_validation() {
    let pki = Pki::new(TD);
    let mut spec = CertSpec::leaf();
    spec.key_usage.as_mut().unwrap().critical = false;
    assert_eq!(
        verify_chain(&pki.chain(&spec), &pki.bundle(), now()),
        Err(SvidError::KeyUsageNotCritical)
    );
}

#[test]
fn leaf_with_server_auth_only_is_rejected() {
    let pki = Pki::new(TD);
    let mut spec = CertSpec::leaf();
    spec.eku.as_mut().unwrap().client_auth = false;
    assert!(verify_chain(&pki.chain(&spec), &pki.bundle(), now()).is_err());
}

#[test]
fn intermediate_without_key_cert_sign_is_rejected() {
    let pki = Pki::new(TD);
    let mut spec = CertSpec::ca(TD, "intermediate without keyCertSign");
    spec.authority_key_id = true;
    spec.key_usage.as_mut().unwrap().key_cert_sign = false;
    let intermediate = pki.root.sub_ca(&spec);
    let chain = vec![
        intermediate.issue(&CertSpec::leaf()),
        intermediate.cert.clone(),
    ];
    assert_eq!(
        verify_chain(&chain, &pki.bundle(), now()),
        Err(SvidError::InvalidIntermediate {
            index: 0,
            reason: Box::new(SvidError::SigningCertMissingKeyCertSign)
        })
    );
}

#[test]
fn leaf_with_broken_signature_is_rejected() {
    let pki = Pki::new(TD);
    let chain = pki.chain(&CertSpec::leaf());
    let mut der = chain[0].to_vec();
    // The last byte belongs to the signature's `s` integer.
    *der.last_mut().unwrap() ^= 0x01;
    let tampered = CertificateDer::from(der);
    assert_eq!(
        verify_chain(&[tampered, chain[1].clone()], &pki.bundle(), now()),
        Err(SvidError::BadSignature)
    );
}

#[test]
fn empty_chain_is_rejected() {
    let pki = Pki::new(TD);
    assert_eq!(
        verify_chain(&[], &pki.bundle(), now()),
        Err(SvidError::EmptyChain)
    );
}

#[test]
fn bundle_with_several_roots_verifies_leaves_of_each() {
    let old = Pki::new(TD);
    let new = Pki::new(TD);
    let bundle = TrustBundle::new(
        TrustDomain::new(TD).unwrap(),
        vec![old.root.cert.clone(), new.root.cert.clone()],
    )
    .unwrap();
    assert!(verify_chain(&old.chain(&CertSpec::leaf()), &bundle, now()).is_ok());
    assert!(verify_chain(&new.chain(&CertSpec::leaf()), &bundle, now()).is_ok());
}

#[test]
fn signing_chain_window_is_the_intersection() {
    let pki = Pki::new(TD);
    let intermediate = pki.root.sub_ca(&CertSpec {
        not_before: NOW - 10 * DAY,
        not_after: NOW + 30 * DAY,
        authority_key_id: true,
        ..CertSpec::ca(TD, "short intermediate")
    });
    let window = signing_chain_window(&[intermediate.cert.clone(), pki.root.cert.clone()]).unwrap();
    assert_eq!(
        window,
        SignerWindow {
            not_before: NOW - 10 * DAY,
            not_after: NOW + 30 * DAY
        }
    );
    let root_only = signing_chain_window(std::slice::from_ref(&pki.root.cert)).unwrap();
    assert_eq!(
        root_only,
        SignerWindow {
            not_before: NOW - 365 * DAY,
            not_after: NOW + 365 * DAY
        }
    );
}
