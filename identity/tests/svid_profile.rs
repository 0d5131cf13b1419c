//! The X509-SVID leaf rules, Citadel's issuing profile and the SPIFFE
//! signing-certificate rules, one test per rule. Each rejection test starts
//! from a certificate that passes every check and changes exactly one thing.

mod support;

use citadel_identity::{
    SpiffeIdError, SvidError, check_citadel_leaf, check_signing_certificate, check_x509_svid,
};
use support::{BasicConstraintsSpec, CertSpec, DAY, KeyKind, LEAF_ID, NOW, Pki, TD};

fn pki() -> Pki {
    Pki::new(TD)
}

/// Issues `spec` from the default intermediate.
fn issue(spec: &CertSpec) -> Vec<u8> {
    pki().intermediate.issue(spec).to_vec()
}

/// Asserts that the SPIFFE leaf check rejects `spec` with `expected` (and so does the Citadel check).
fn assert_svid_rejects(spec: &CertSpec, expected: SvidError) {
    let der = issue(spec);
    assert_eq!(check_x509_svid(&der), Err(expected.clone()));
    assert_eq!(check_citadel_leaf(&der), Err(expected));
}

/// Asserts that `spec` passes the SPIFFE rules and only Citadel's profile rejects it.
fn assert_only_citadel_rejects(spec: &CertSpec, expected: SvidError) {
    let der = issue(spec);
    assert!(check_x509_svid(&der).is_ok(), "SPIFFE rules should accept");
    assert_eq!(check_citadel_leaf(&der), Err(expected));
}

// ---------------------------------------------------------------- baseline

#[test]
fn baseline_leaf_passes_both_checks() {
    let der = issue(&CertSpec::leaf());
    let svid = check_citadel_leaf(&der).unwrap();
    assert_eq!(check_x509_svid(&der).unwrap(), svid);
    assert_eq!(svid.spiffe_id.as_str(), LEAF_ID);
    assert_eq!(svid.serial_hex, "3a519c07ee12408d612fb3049a7c5510");
    assert_eq!(svid.not_before, NOW - DAY);
    assert_eq!(svid.not_after, NOW + DAY);
    assert!(svid.dns_names.is_empty());
}

#[test]
fn serial_hex_drops_the_sign_padding_byte() {
    let mut spec = CertSpec::leaf();
    spec.serial = vec![0x9f, 0x00, 0x01];
    let svid = check_citadel_leaf(&issue(&spec)).unwrap();
    assert_eq!(svid.serial_hex, "9f0001");
}

#[test]
fn dns_sans_are_allowed_and_reported() {
    let mut spec = CertSpec::leaf();
    spec.dns_sans = vec!["web.default.svc".into(), "web".into()];
    let svid = check_citadel_leaf(&issue(&spec)).unwrap();
    assert_eq!(svid.dns_names, vec!["web.default.svc", "web"]);
}

#[test]
fn empty_subject_with_critical_san_is_accepted() {
    let mut spec = CertSpec::leaf();
    spec.subject_cn = None; // the factory marks the SAN critical by default then
    assert!(check_citadel_leaf(&issue(&spec)).is_ok());
}

#[test]
fn leaf_without_eku_passes_spiffe_rules() {
    let mut spec = CertSpec::leaf();
    spec.eku = None;
    assert!(check_x509_svid(&issue(&spec)).is_ok());
}

#[test]
fn critical_eku_is_accepted() {
    let mut spec = CertSpec::leaf();
    spec.eku.as_mut().unwrap().critical = true;
    assert!(check_citadel_leaf(&issue(&spec)).is_ok());
}

#[test]
fn key_agreement_is_allowed_by_spiffe_rules() {
    let mut spec = CertSpec::leaf();
    spec.key_usage.as_mut().unwrap().key_agreement = true;
    assert!(check_x509_svid(&issue(&spec)).is_ok());
}

// ---------------------------------------------------------------- SPIFFE X509-SVID leaf rules

#[test]
fn rejects_leaf_without_san_extension() {
    let mut spec = CertSpec::leaf();
    spec.uri_sans.clear();
    assert_svid_rejects(&spec, SvidError::MissingUriSan);
}

#[test]
fn rejects_leaf_with_only_dns_sans() {
    let mut spec = CertSpec::leaf();
    spec.uri_sans.clear();
    spec.dns_sans = vec!["web.default.svc".into()];
    assert_svid_rejects(&spec, SvidError::MissingUriSan);
}

#[test]
fn rejects_leaf_with_more_than_one_uri_san() {
    let mut spec = CertSpec::leaf();
    spec.uri_sans
        .push("spiffe://example.org/ns/default/sa/other".into());
    assert_svid_rejects(&spec, SvidError::MultipleUriSans { count: 2 });
}

#[test]
fn rejects_leaf_whose_uri_san_is_not_spiffe() {
    let mut spec = CertSpec::leaf();
    spec.uri_sans = vec!["https://example.org/ns/default/sa/web".into()];
    assert_svid_rejects(
        &spec,
        SvidError::InvalidSpiffeId(SpiffeIdError::WrongScheme),
    );
}

#[test]
fn rejects_leaf_with_invalid_spiffe_id() {
    let mut spec = CertSpec::leaf();
    spec.uri_sans = vec!["spiffe://Example.org/ns/default/sa/web".into()];
    assert_svid_rejects(
        &spec,
        SvidError::InvalidSpiffeId(SpiffeIdError::TrustDomainUppercase { ch: 'E', at: 9 }),
    );
}

#[test]
fn rejects_leaf_with_root_spiffe_id() {
    let mut spec = CertSpec::leaf();
    spec.uri_sans = vec!["spiffe://example.org".into()];
    assert_svid_rejects(
        &spec,
        SvidError::LeafIdIsRoot {
            id: "spiffe://example.org".into(),
        },
    );
}

#[test]
fn rejects_leaf_that_is_a_ca() {
    let mut spec = CertSpec::leaf();
    spec.basic_constraints.as_mut().unwrap().ca = true;
    assert_svid_rejects(&spec, SvidError::LeafIsCa);
}

#[test]
fn rejects_leaf_without_key_usage() {
    let mut spec = CertSpec::leaf();
    spec.key_usage = None;
    assert_svid_rejects(&spec, SvidError::MissingKeyUsage);
}

#[test]
fn rejects_leaf_with_non_critical_key_usage() {
    let mut spec = CertSpec::leaf();
    spec.key_usage.as_mut().unwrap().critical = false;
    assert_svid_rejects(&spec, SvidError::KeyUsageNotCritical);
}

#[test]
fn rejects_leaf_without_digital_signature() {
    let mut spec = CertSpec::leaf();
    spec.key_usage.as_mut().unwrap().digital_signature = false;
    assert_svid_rejects(&spec, SvidError::MissingDigitalSignature);
}

#[test]
fn rejects_leaf_with_key_cert_sign() {
    let mut spec = CertSpec::leaf();
    spec.key_usage.as_mut().unwrap().key_cert_sign = true;
    assert_svid_rejects(&spec, SvidError::LeafHasKeyCertSign);
}

#[test]
fn rejects_leaf_with_crl_sign() {
    let mut spec = CertSpec::leaf();
    spec.key_usage.as_mut().unwrap().crl_sign = true;
    assert_svid_rejects(&spec, SvidError::LeafHasCrlSign);
}

#[test]
fn rejects_leaf_eku_without_server_auth() {
    let mut spec = CertSpec::leaf();
    spec.eku.as_mut().unwrap().server_auth = false;
    assert_svid_rejects(&spec, SvidError::EkuMissingServerAuth);
}

#[test]
fn rejects_leaf_eku_without_client_auth() {
    let mut spec = CertSpec::leaf();
    spec.eku.as_mut().unwrap().client_auth = false;
    assert_svid_rejects(&spec, SvidError::EkuMissingClientAuth);
}

#[test]
fn rejects_empty_subject_with_non_critical_san() {
    let mut spec = CertSpec::leaf();
    spec.subject_cn = None;
    spec.san_critical = Some(false);
    assert_svid_rejects(&spec, SvidError::SanNotCritical);
}

#[test]
fn non_critical_san_is_fine_when_subject_is_present() {
    let mut spec = CertSpec::leaf();
    spec.san_critical = Some(false);
    assert!(check_citadel_leaf(&issue(&spec)).is_ok());
}

#[test]
fn rejects_duplicate_extension() {
    let mut spec = CertSpec::leaf();
    spec.extra_extensions.push((
        support::key_usage_oid(),
        support::key_usage_digital_signature_der(),
        true,
    ));
    assert_svid_rejects(
        &spec,
        SvidError::DuplicateExtension {
            extension: "keyUsage".into(),
        },
    );
}

#[test]
fn rejects_malformed_key_usage() {
    let mut spec = CertSpec::leaf();
    spec.key_usage = None;
    // An OCTET STRING where a BIT STRING belongs.
    spec.extra_extensions
        .push((support::key_usage_oid(), support::tlv(0x04, &[0x80]), true));
    assert_svid_rejects(
        &spec,
        SvidError::MalformedExtension {
            extension: "keyUsage".into(),
        },
    );
}

#[test]
fn rejects_trailing_bytes_after_the_certificate() {
    let mut der = issue(&CertSpec::leaf());
    der.push(0x00);
    assert!(matches!(
        check_x509_svid(&der),
        Err(SvidError::Malformed { .. })
    ));
}

// ---------------------------------------------------------------- Citadel issuing profile

#[test]
fn citadel_requires_basic_constraints() {
    let mut spec = CertSpec::leaf();
    spec.basic_constraints = None;
    assert_only_citadel_rejects(&spec, SvidError::MissingBasicConstraints);
}

#[test]
fn citadel_requires_critical_basic_constraints() {
    let mut spec = CertSpec::leaf();
    spec.basic_constraints = Some(BasicConstraintsSpec {
        ca: false,
        critical: false,
    });
    assert_only_citadel_rejects(&spec, SvidError::BasicConstraintsNotCritical);
}

#[test]
fn citadel_requires_extended_key_usage() {
    let mut spec = CertSpec::leaf();
    spec.eku = None;
    assert_only_citadel_rejects(&spec, SvidError::MissingExtendedKeyUsage);
}

#[test]
fn citadel_rejects_key_encipherment_on_ecdsa_key() {
    let mut spec = CertSpec::leaf();
    spec.key_usage.as_mut().unwrap().key_encipherment = true;
    assert_only_citadel_rejects(&spec, SvidError::KeyEnciphermentWithoutRsa);
}

#[test]
fn citadel_allows_key_encipherment_on_rsa_key() {
    let mut spec = CertSpec::leaf();
    spec.key = KeyKind::Rsa2048;
    spec.key_usage.as_mut().unwrap().key_encipherment = true;
    assert!(check_citadel_leaf(&issue(&spec)).is_ok());
}

#[test]
fn citadel_rejects_key_usages_beyond_the_profile() {
    let mut spec = CertSpec::leaf();
    spec.key_usage.as_mut().unwrap().key_agreement = true;
    assert_only_citadel_rejects(
        &spec,
        SvidError::UnexpectedKeyUsage {
            usage: "keyAgreement",
        },
    );
}

#[test]
fn citadel_requires_subject_key_identifier() {
    let mut spec = CertSpec::leaf();
    spec.subject_key_id = false;
    assert_only_citadel_rejects(&spec, SvidError::MissingSubjectKeyIdentifier);
}

#[test]
fn citadel_requires_authority_key_identifier() {
    let mut spec = CertSpec::leaf();
    spec.authority_key_id = false;
    assert_only_citadel_rejects(&spec, SvidError::MissingAuthorityKeyIdentifier);
}

#[test]
fn citadel_rejects_zero_serial() {
    let mut spec = CertSpec::leaf();
    spec.serial = vec![0x00];
    assert_only_citadel_rejects(&spec, SvidError::ZeroSerial);
}

#[test]
fn citadel_rejects_negative_serial() {
    let pki = pki();
    let der = support::with_negative_serial(&pki.intermediate.issue(&CertSpec::leaf()));
    let svid = check_x509_svid(&der).expect("SPIFFE rules say nothing about the serial's sign");
    assert!(svid.serial_hex.starts_with("ba51"), "{}", svid.serial_hex);
    assert_eq!(check_citadel_leaf(&der), Err(SvidError::NegativeSerial));
}

#[test]
fn citadel_rejects_serial_longer_than_20_octets() {
    let mut spec = CertSpec::leaf();
    spec.serial = vec![0x11; 21];
    assert_only_citadel_rejects(&spec, SvidError::SerialTooLong { len: 21 });
}

#[test]
fn citadel_accepts_20_octet_serial() {
    let mut spec = CertSpec::leaf();
    spec.serial = vec![0x11; 20];
    assert!(check_citadel_leaf(&issue(&spec)).is_ok());
}

// ---------------------------------------------------------------- signing certificates

#[test]
fn root_and_intermediate_are_valid_signing_certificates() {
    let pki = pki();
    assert_eq!(check_signing_certificate(&pki.root.cert), Ok(()));
    assert_eq!(check_signing_certificate(&pki.intermediate.cert), Ok(()));
}

fn signing_cert(spec: &CertSpec) -> Vec<u8> {
    pki().root.sub_ca(spec).cert.to_vec()
}

#[test]
fn signing_certificate_must_be_ca() {
    let mut spec = CertSpec::ca(TD, "not a ca");
    spec.basic_constraints.as_mut().unwrap().ca = false;
    assert_eq!(
        check_signing_certificate(&signing_cert(&spec)),
        Err(SvidError::SigningCertNotCa)
    );
}

#[test]
fn signing_certificate_needs_basic_constraints() {
    let mut spec = CertSpec::ca(TD, "no basic constraints");
    spec.basic_constraints = None;
    assert_eq!(
        check_signing_certificate(&signing_cert(&spec)),
        Err(SvidError::SigningCertNotCa)
    );
}

#[test]
fn signing_certificate_must_have_key_cert_sign() {
    let mut spec = CertSpec::ca(TD, "no keyCertSign");
    spec.key_usage.as_mut().unwrap().key_cert_sign = false;
    assert_eq!(
        check_signing_certificate(&signing_cert(&spec)),
        Err(SvidError::SigningCertMissingKeyCertSign)
    );
}

#[test]
fn signing_certificate_needs_key_usage() {
    let mut spec = CertSpec::ca(TD, "no keyUsage");
    spec.key_usage = None;
    assert_eq!(
        check_signing_certificate(&signing_cert(&spec)),
        Err(SvidError::SigningCertMissingKeyCertSign)
    );
}

#[test]
fn signing_certificate_spiffe_id_must_not_have_a_path() {
    let mut spec = CertSpec::ca(TD, "id with path");
    spec.uri_sans = vec!["spiffe://example.org/ca".into()];
    assert_eq!(
        check_signing_certificate(&signing_cert(&spec)),
        Err(SvidError::SigningCertIdHasPath {
            id: "spiffe://example.org/ca".into()
        })
    );
}

#[test]
fn signing_certificate_spiffe_id_must_be_valid() {
    let mut spec = CertSpec::ca(TD, "bad id");
    spec.uri_sans = vec!["spiffe://example.org:443".into()];
    assert_eq!(
        check_signing_certificate(&signing_cert(&spec)),
        Err(SvidError::InvalidSpiffeId(SpiffeIdError::HasPort {
            at: 20
        }))
    );
}

#[test]
fn signing_certificate_may_omit_the_spiffe_id() {
    let mut spec = CertSpec::ca(TD, "no id");
    spec.uri_sans.clear();
    assert_eq!(check_signing_certificate(&signing_cert(&spec)), Ok(()));
}

#[test]
fn signing_certificate_may_carry_other_uris() {
    let mut spec = CertSpec::ca(TD, "other uri");
    spec.uri_sans.push("https://ca.example.org/policy".into());
    assert_eq!(check_signing_certificate(&signing_cert(&spec)), Ok(()));
}

#[test]
fn leaf_is_not_a_signing_certificate() {
    assert_eq!(
        check_signing_certificate(&issue(&CertSpec::leaf())),
        Err(SvidError::SigningCertNotCa)
    );
}
