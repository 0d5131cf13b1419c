//! The CA in-process over real TLS and gRPC: issuance, renewal, and every
//! kind of bad input, each of which must leave the ledger unchanged.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::{csr_with, p256_csr};
use citadel_e2e::tokens::{TEST_ISSUER, TokenIssuer};
use citadel_e2e::unix_now;
use citadel_identity::{TrustBundle, TrustDomain};
use citadel_store::LedgerFilter;
use rustls_pki_types::pem::PemObject;
use support::{FlakyStore, Harness, WEB, chain_der};
use tonic::Code;

#[tokio::test]
async fn issues_a_chain_that_verifies_against_the_bundle_and_is_recorded() {
    let h = Harness::start().await;
    let before = h.ledger_len().await;
    let csr = p256_csr(&[WEB]).unwrap();
    let token = h.tokens.token("shop", "web");
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    let resp = create(&mut client, request(&csr.pem, 0, Some(&token), None))
        .await
        .unwrap();
    assert!(
        resp.cert_chain.len() >= 2,
        "istio-agent rejects chains of one element"
    );
    let chain = chain_der(&resp.cert_chain);
    let leaf = citadel_identity::check_citadel_leaf(&chain[0]).unwrap();
    assert_eq!(leaf.spiffe_id.as_str(), WEB);
    let bundle =
        TrustBundle::from_pem(TrustDomain::new("cluster.local").unwrap(), &h.bundle_pem).unwrap();
    let verified = citadel_identity::verify_chain(&chain, &bundle, unix_now() as u64).unwrap();
    assert_eq!(verified.spiffe_id.as_str(), WEB);
    // Root last, and it is the bundle's root.
    assert!(bundle.contains(chain.last().unwrap()));
    // Default lifetime: 24 h, backdated by 2 minutes.
    assert_eq!(leaf.not_after - leaf.not_before, 86_400 + 120);
    let rows = h
        .store
        .list_issuances(&LedgerFilter::default())
        .await
        .unwrap();
    assert_eq!(rows.len(), before + 1);
    let row = rows.last().unwrap();
    assert_eq!(row.issuance.spiffe_id, WEB);
    assert_eq!(row.issuance.serial_hex, leaf.serial_hex);
    assert_eq!(row.issuance.node.as_deref(), Some("node-1"));
    h.stop().await;
}

#[tokio::test]
async fn honours_requested_ttl_and_accepts_rs256_tokens() {
    let h = Harness::start().await;
    let csr = p256_csr(&[]).unwrap();
    let claims = h.tokens.claims("shop", "web", "istio-ca", unix_now(), 600);
    let token = h.tokens.sign_rs256(&claims);
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    let resp = create(&mut client, request(&csr.pem, 3600, Some(&token), None))
        .await
        .unwrap();
    let leaf = citadel_identity::check_citadel_leaf(&chain_der(&resp.cert_chain)[0]).unwrap();
    assert_eq!(leaf.not_after - leaf.not_before, 3600 + 120);
    h.stop().await;
}

#[tokio::test]
async fn accepts_rsa_2048_and_ed25519_keys() {
    let h = Harness::start().await;
    let token = h.tokens.token("shop", "web");
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    let rsa = include_str!("fixtures/rsa2048.csr.pem");
    // The fixture names another identity, so ask with a matching token.
    let rsa_token = h.tokens.token("default", "rsa");
    let resp = create(&mut client, request(rsa, 0, Some(&rsa_token), None))
        .await
        .unwrap();
    citadel_identity::check_citadel_leaf(&chain_der(&resp.cert_chain)[0]).unwrap();
    let ed = csr_with(&rcgen::PKCS_ED25519, &[], &[]).unwrap();
    let resp = create(&mut client, request(&ed.pem, 0, Some(&token), None))
        .await
        .unwrap();
    citadel_identity::check_citadel_leaf(&chain_der(&resp.cert_chain)[0]).unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_workload_renews_its_identity_with_its_certificate() {
    let h = Harness::start().await;
    let csr = p256_csr(&[WEB]).unwrap();
    let token = h.tokens.token("shop", "web");
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    let first = create(&mut client, request(&csr.pem, 0, Some(&token), None))
        .await
        .unwrap();
    let chain_pem = first.cert_chain.concat();
    let key_pem = csr.key.serialize_pem();
    let mut mtls = connect(h.addr(), &h.bundle_pem, Some((&chain_pem, &key_pem)))
        .await
        .unwrap();
    let next = p256_csr(&[WEB]).unwrap();
    let renewed = create(&mut mtls, request(&next.pem, 0, None, None))
        .await
        .unwrap();
    let leaf = citadel_identity::check_citadel_leaf(&chain_der(&renewed.cert_chain)[0]).unwrap();
    assert_eq!(leaf.spiffe_id.as_str(), WEB);
    h.stop().await;
}

#[tokio::test]
async fn rejects_client_certificate_from_a_foreign_root() {
    let h = Harness::start().await;
    // A self-made CA and leaf for the same SPIFFE ID: not ours.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params = rcgen::CertificateParams::default();
    leaf_params.subject_alt_names = vec![rcgen::SanType::URI(WEB.try_into().unwrap())];
    leaf_params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let chain = format!("{}{}", leaf.pem(), ca_cert.pem());
    let before = h.ledger_len().await;
    let mut client = connect(
        h.addr(),
        &h.bundle_pem,
        Some((&chain, &leaf_key.serialize_pem())),
    )
    .await
    .unwrap();
    let csr = p256_csr(&[WEB]).unwrap();
    let err = create(&mut client, request(&csr.pem, 0, None, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(h.ledger_len().await, before);
    h.stop().await;
}

#[tokio::test]
async fn rejects_malformed_pem() {
    let h = Harness::start().await;
    let token = h.tokens.token("shop", "web");
    h.expect_refusal(
        request(
            "-----BEGIN CERTIFICATE REQUEST-----\ngarbage",
            0,
            Some(&token),
            None,
        ),
        Code::InvalidArgument,
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn rejects_csr_with_bad_signature() {
    let h = Harness::start().await;
    let token = h.tokens.token("shop", "web");
    let csr = p256_csr(&[WEB]).unwrap();
    let mut der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let msg = h
        .expect_refusal(
            request(&tampered, 0, Some(&token), None),
            Code::InvalidArgument,
        )
        .await;
    assert!(msg.contains("signature"), "{msg}");
    h.stop().await;
}

#[tokio::test]
async fn rejects_csr_naming_another_identity() {
    let h = Harness::start().await;
    let token = h.tokens.token("shop", "web");
    let csr = p256_csr(&["spiffe://cluster.local/ns/shop/sa/admin"]).unwrap();
    let msg = h
        .expect_refusal(
            request(&csr.pem, 0, Some(&token), None),
            Code::PermissionDenied,
        )
        .await;
    assert!(msg.contains("ns/shop/sa/admin"), "{msg}");
    h.stop().await;
}

#[tokio::test]
async fn rejects_rsa_key_below_2048_bits() {
    let h = Harness::start().await;
    let token = h.tokens.token("default", "rsa");
    let csr = include_str!("fixtures/rsa1024.csr.pem");
    let msg = h
        .expect_refusal(request(csr, 0, Some(&token), None), Code::InvalidArgument)
        .await;
    assert!(msg.contains("1024"), "{msg}");
    h.stop().await;
}

#[tokio::test]
async fn rejects_ttl_above_maximum() {
    let h = Harness::start().await;
    let token = h.tokens.token("shop", "web");
    let csr = p256_csr(&[]).unwrap();
    h.expect_refusal(
        request(&csr.pem, 91 * 86_400, Some(&token), None),
        Code::InvalidArgument,
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn rejects_missing_token() {
    let h = Harness::start().await;
    let csr = p256_csr(&[]).unwrap();
    h.expect_refusal(request(&csr.pem, 0, None, None), Code::Unauthenticated)
        .await;
    h.stop().await;
}

#[tokio::test]
async fn rejects_expired_token() {
    let h = Harness::start().await;
    let claims = h
        .tokens
        .claims("shop", "web", "istio-ca", unix_now() - 7200, 3600);
    let msg = h.refuse_token(&h.tokens.sign_es256(&claims)).await;
    assert!(msg.contains("expired"), "{msg}");
    h.stop().await;
}

#[tokio::test]
async fn rejects_wrong_audience_token() {
    let h = Harness::start().await;
    let claims = h
        .tokens
        .claims("shop", "web", "some-other-api", unix_now(), 3600);
    let msg = h.refuse_token(&h.tokens.sign_es256(&claims)).await;
    assert!(msg.contains("audience"), "{msg}");
    h.stop().await;
}

#[tokio::test]
async fn rejects_wrong_issuer_token() {
    let h = Harness::start().await;
    let mut claims = h.tokens.claims("shop", "web", "istio-ca", unix_now(), 3600);
    claims["iss"] = "https://evil.example".into();
    let msg = h.refuse_token(&h.tokens.sign_es256(&claims)).await;
    assert!(msg.contains("issuer"), "{msg}");
    h.stop().await;
}

#[tokio::test]
async fn rejects_badly_signed_token() {
    let h = Harness::start().await;
    let other = TokenIssuer::new(TEST_ISSUER).unwrap();
    // Same kid as the real issuer's EC key, but signed by another key.
    let claims = h.tokens.claims("shop", "web", "istio-ca", unix_now(), 3600);
    let real = h.tokens.sign_es256(&claims);
    let forged = other.sign_es256(&claims);
    let (real_head, _) = real.split_once('.').unwrap();
    let (_, forged_rest) = forged.split_once('.').unwrap();
    let token = format!("{real_head}.{forged_rest}");
    let msg = h.refuse_token(&token).await;
    assert!(msg.contains("signature"), "{msg}");
    h.stop().await;
}

#[tokio::test]
async fn rejects_token_with_unknown_kid() {
    let h = Harness::start().await;
    let claims = h.tokens.claims("shop", "web", "istio-ca", unix_now(), 3600);
    let token = h.tokens.sign_with_kid(&claims, "no-such-key");
    let msg = h.refuse_token(&token).await;
    assert!(msg.contains("kid"), "{msg}");
    h.stop().await;
}

#[tokio::test]
async fn rejects_oversized_request() {
    let h = Harness::start().await;
    let token = h.tokens.token("shop", "web");
    let huge = "A".repeat(65 * 1024);
    h.expect_refusal(request(&huge, 0, Some(&token), None), Code::OutOfRange)
        .await;
    h.stop().await;
}

#[tokio::test]
async fn rejects_impersonation_by_an_ordinary_workload() {
    let h = Harness::start().await;
    let token = h.tokens.token("shop", "web");
    let csr = p256_csr(&[]).unwrap();
    h.expect_refusal(
        request(
            &csr.pem,
            0,
            Some(&token),
            Some("spiffe://cluster.local/ns/bank/sa/vault"),
        ),
        Code::PermissionDenied,
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn keeps_serving_after_bad_input_and_exposes_metrics() {
    let h = Harness::start().await;
    let token = h.tokens.token("shop", "web");
    h.expect_refusal(
        request("junk", 0, Some(&token), None),
        Code::InvalidArgument,
    )
    .await;
    let csr = p256_csr(&[]).unwrap();
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    create(&mut client, request(&csr.pem, 0, Some(&token), None))
        .await
        .unwrap();
    let http = h.ca.as_ref().unwrap().http_addr;
    let (status, body) = citadel_e2e::process::http_get(http, "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("citadel_ca_certificates_issued_total{method=\"jwt\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("citadel_ca_issuance_failures_total{reason=\"invalid_argument\"} 1"),
        "{body}"
    );
    assert!(body.contains("citadel_ca_root_expiry_seconds"), "{body}");
    assert!(
        body.contains("citadel_ca_issuance_duration_seconds_bucket"),
        "{body}"
    );
    assert_eq!(
        citadel_e2e::process::http_get(http, "/healthz")
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        citadel_e2e::process::http_get(http, "/readyz")
            .await
            .unwrap()
            .0,
        200
    );
    h.stop().await;
}

#[tokio::test]
async fn store_down_is_unavailable_and_writes_nothing() {
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = down.clone();
    let h = Harness::start_with(move |inner| Arc::new(FlakyStore { inner, down: flag })).await;
    let token = h.tokens.token("shop", "web");
    down.store(true, Ordering::SeqCst);
    let csr = p256_csr(&[]).unwrap();
    let msg = h
        .expect_refusal(request(&csr.pem, 0, Some(&token), None), Code::Unavailable)
        .await;
    assert!(msg.contains("no certificate issued"), "{msg}");
    let http = h.ca.as_ref().unwrap().http_addr;
    assert_eq!(
        citadel_e2e::process::http_get(http, "/readyz")
            .await
            .unwrap()
            .0,
        503
    );
    // The CA recovers as soon as the store does.
    down.store(false, Ordering::SeqCst);
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    create(&mut client, request(&csr.pem, 0, Some(&token), None))
        .await
        .unwrap();
    assert!(h.store.verify_ledger().await.unwrap().first_bad.is_none());
    h.stop().await;
}
