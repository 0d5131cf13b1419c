//! The agent's socket end to end, in-process: real Unix socket, real
//! SO_PEERCRED attestation, real gRPC, fake CA.

mod support;

use std::time::Duration;

use citadel_agent::fake::FakeMode;
use citadel_proto::envoy::extensions::transport_sockets::tls::v3::secret;
use citadel_proto::google::rpc::Status as RpcStatus;
use citadel_proto::spiffe_workload::{JwtsvidRequest, X509BundlesRequest, X509svidRequest};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

#[tokio::test]
async fn sds_serves_default_with_caller_identity_and_key() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["default"]).await.unwrap();
    let resp = s.next(10).await.unwrap();
    assert!(!resp.nonce.is_empty() && !resp.version_info.is_empty());
    let secrets = secrets(&resp);
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0].name, "default");
    let leaf = leaf_of(&secrets[0]);
    let svid = citadel_identity::verify_chain(
        &[leaf.clone().into()],
        &h.ca.bundle(),
        citadel_agent::unix_now() as u64,
    )
    .unwrap();
    assert_eq!(svid.spiffe_id.as_str(), WEB);
    match &secrets[0].r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            let key = match t.private_key.as_ref().and_then(|d| d.specifier.as_ref()) {
                Some(
                    citadel_proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(b),
                ) => b.clone(),
                other => panic!("{other:?}"),
            };
            let key = pem::parse(&key).unwrap();
            assert_eq!(key.tag(), "PRIVATE KEY", "PKCS#8");
            let kp = rcgen::KeyPair::try_from(key.contents()).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
            use rcgen::PublicKeyData;
            assert_eq!(
                cert.tbs_certificate.subject_pki.raw,
                kp.subject_public_key_info().as_slice()
            );
        }
        other => panic!("{other:?}"),
    }
    h.stop().await;
}

#[tokio::test]
async fn sds_serves_rootca_and_own_id_alias() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["ROOTCA", WEB])
        .await
        .unwrap();
    let resp = s.next(10).await.unwrap();
    let secrets = secrets(&resp);
    let names: Vec<_> = secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["ROOTCA", WEB]);
    match &secrets[0].r#type {
        Some(secret::Type::ValidationContext(v)) => {
            let ca = match v.trusted_ca.as_ref().and_then(|d| d.specifier.as_ref()) {
                Some(
                    citadel_proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(b),
                ) => b.clone(),
                other => panic!("{other:?}"),
            };
            assert_eq!(String::from_utf8(ca).unwrap(), h.ca.bundle().to_pem());
        }
        other => panic!("{other:?}"),
    }
    let alias_leaf = leaf_of(&secrets[1]);
    assert_eq!(
        citadel_identity::check_x509_svid(&alias_leaf)
            .unwrap()
            .spiffe_id
            .as_str(),
        WEB
    );
    h.stop().await;
}

#[tokio::test]
async fn ack_and_nack_are_not_answered_and_rotation_is_pushed() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["default"]).await.unwrap();
    let first = s.next(10).await.unwrap();
    let serial1 = serial_of(&leaf_of(&secrets(&first)[0]));
    // ACK: no answer.
    s.tx.send(request(&["default"], &first.version_info, &first.nonce))
        .await
        .unwrap();
    assert!(s.quiet_for(300).await, "an ACK was answered");
    // NACK: no answer, no loop.
    let mut nack = request(&["default"], "", &first.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 13,
        message: "bad".into(),
        details: vec![],
    });
    s.tx.send(nack).await.unwrap();
    assert!(s.quiet_for(300).await, "a NACK was answered");
    // Stale nonce with new names: ignored.
    s.tx.send(request(&["default", "ROOTCA"], "", "not-a-nonce-we-sent"))
        .await
        .unwrap();
    assert!(s.quiet_for(300).await, "a stale request was answered");
    // Rotation is pushed with a new version and nonce.
    h.manager.rotate_all();
    let pushed = s.next(10).await.unwrap();
    assert_ne!(pushed.version_info, first.version_info);
    assert_ne!(pushed.nonce, first.nonce);
    assert_ne!(serial_of(&leaf_of(&secrets(&pushed)[0])), serial1);
    h.stop().await;
}

#[tokio::test]
async fn new_names_on_a_stream_are_answered_at_once() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["default"]).await.unwrap();
    let first = s.next(10).await.unwrap();
    s.tx.send(request(
        &["default", "ROOTCA"],
        &first.version_info,
        &first.nonce,
    ))
    .await
    .unwrap();
    let second = s.next(5).await.unwrap();
    assert_eq!(secrets(&second).len(), 2);
    h.stop().await;
}

#[tokio::test]
async fn bundle_change_is_pushed_to_rootca() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["ROOTCA"]).await.unwrap();
    let first = s.next(10).await.unwrap();
    // Add a second root (the fake's foreign one) beside the first.
    let mut roots = h.ca.bundle().roots().to_vec();
    roots.extend(h.ca.foreign_bundle().roots().iter().cloned());
    let both =
        citadel_identity::TrustBundle::new(h.ca.bundle().trust_domain().clone(), roots).unwrap();
    h.set_bundle(both.clone(), 2);
    let pushed = s.next(5).await.unwrap();
    assert_ne!(pushed.version_info, first.version_info);
    match &secrets(&pushed)[0].r#type {
        Some(secret::Type::ValidationContext(v)) => {
            match v.trusted_ca.as_ref().and_then(|d| d.specifier.as_ref()) {
                Some(
                    citadel_proto::envoy::config::core::v3::data_source::Specifier::InlineBytes(b),
                ) => {
                    assert_eq!(pem::parse_many(b).unwrap().len(), 2)
                }
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    }
    h.stop().await;
}

#[tokio::test]
async fn rejects_caller_without_entry() {
    let h = Harness::start_with(Options {
        entries: Some(
            "entries:\n  - spiffe_id: spiffe://cluster.local/ns/x/sa/y\n    uid: 4242424\n".into(),
        ),
        ..Options::default()
    })
    .await;
    let mut client = h.sds().await;
    let err = SdsStream::open(&mut client, &["default"])
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let mut wl = h.workload_api().await;
    let err = wl
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = wl
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(h.ca.calls(), 0, "nothing was issued");
    h.stop().await;
}

#[tokio::test]
async fn rejects_another_workloads_spiffe_id_as_resource_name() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["spiffe://cluster.local/ns/shop/sa/db"])
        .await
        .unwrap();
    let err = s.next(5).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = client
        .fetch_secrets(request(&["spiffe://cluster.local/ns/shop/sa/db"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(h.ca.calls(), 0, "nothing was issued for the other identity");
    // The agent keeps serving the caller's own names.
    let mut ok = SdsStream::open(&mut client, &["default"]).await.unwrap();
    ok.next(10).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn delta_secrets_is_unimplemented() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let err = client
        .delta_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    h.stop().await;
}

#[tokio::test]
async fn fetch_secrets_answers_once() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let resp = client
        .fetch_secrets(request(&["default", "ROOTCA"], "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(secrets(&resp).len(), 2);
    h.stop().await;
}

#[tokio::test]
async fn workload_api_streams_svid_and_bundle() {
    let h = Harness::start().await;
    let mut wl = h.workload_api().await;
    let mut stream = wl
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg.svids.len(), 1);
    let svid = &msg.svids[0];
    assert_eq!(svid.spiffe_id, WEB);
    assert_eq!(svid.bundle, h.ca.bundle().to_concatenated_der());
    // DER chain, leaf first, parses; key is PKCS#8 DER.
    let (rest, leaf) = x509_parser::parse_x509_certificate(&svid.x509_svid).unwrap();
    assert!(rest.is_empty(), "roots are not repeated in the chain");
    rcgen::KeyPair::try_from(svid.x509_svid_key.as_slice()).unwrap();
    let serial1 = leaf.tbs_certificate.raw_serial_as_string();
    h.manager.rotate_all();
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (_, leaf2) = x509_parser::parse_x509_certificate(&next.svids[0].x509_svid).unwrap();
    assert_ne!(leaf2.tbs_certificate.raw_serial_as_string(), serial1);

    let mut bundles = wl
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let b = tokio::time::timeout(Duration::from_secs(5), bundles.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        b.bundles.get("spiffe://cluster.local").cloned(),
        Some(h.ca.bundle().to_concatenated_der())
    );
    h.stop().await;
}

#[tokio::test]
async fn rejects_workload_api_call_without_security_header() {
    let h = Harness::start().await;
    let mut wl = h.workload_api().await;
    let err = wl.fetch_x509svid(X509svidRequest {}).await.err().unwrap();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let mut wrong = tonic::Request::new(X509BundlesRequest {});
    wrong
        .metadata_mut()
        .insert("workload.spiffe.io", "TRUE".parse().unwrap());
    let err = wl.fetch_x509_bundles(wrong).await.err().unwrap();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(h.ca.calls(), 0);
    h.stop().await;
}

#[tokio::test]
async fn jwt_rpcs_are_unimplemented() {
    let h = Harness::start().await;
    let mut wl = h.workload_api().await;
    let err = wl
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    h.stop().await;
}

#[tokio::test]
async fn garbage_on_the_socket_does_not_stop_the_agent() {
    let h = Harness::start().await;
    for junk in [
        &b"\x00\x01\x02 hello there"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut raw = tokio::net::UnixStream::connect(&h.socket).await.unwrap();
        let _ = raw.write_all(junk).await;
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf)).await;
    }
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["default"]).await.unwrap();
    s.next(10).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn one_csr_per_identity_however_many_streams_wait() {
    let h = Harness::start().await;
    let mut streams = Vec::new();
    for _ in 0..40 {
        let mut client = h.sds().await;
        streams.push(SdsStream::open(&mut client, &["default"]).await.unwrap());
    }
    let mut serials = std::collections::BTreeSet::new();
    for s in &mut streams {
        serials.insert(serial_of(&leaf_of(&secrets(&s.next(10).await.unwrap())[0])));
    }
    assert_eq!(serials.len(), 1, "every stream got the same certificate");
    assert_eq!(h.ca.calls(), 1, "one CSR for 40 waiting streams");
    h.stop().await;
}

#[tokio::test]
async fn identity_is_dropped_after_its_streams_close() {
    let h = Harness::start().await;
    {
        let mut client = h.sds().await;
        let mut s = SdsStream::open(&mut client, &["default"]).await.unwrap();
        s.next(10).await.unwrap();
        assert_eq!(h.manager.identities().len(), 1);
    }
    assert!(
        eventually(5, || h.manager.identities().is_empty()).await,
        "identity kept after its streams closed"
    );
    assert!(
        !h.metrics.encode().contains(WEB),
        "expiry gauge of a dropped identity remains"
    );
    h.stop().await;
}

#[tokio::test]
async fn ca_down_keeps_the_valid_certificate_and_catches_up() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["default"]).await.unwrap();
    let first = s.next(10).await.unwrap();
    let serial1 = serial_of(&leaf_of(&secrets(&first)[0]));
    h.ca.set_mode(FakeMode::Down);
    let calls_before = h.ca.calls();
    h.manager.rotate_all();
    // Several failed attempts with backoff, and nothing new pushed.
    assert!(eventually(5, || h.ca.calls() >= calls_before + 3).await);
    assert!(
        s.quiet_for(200).await,
        "something was pushed while the CA was down"
    );
    assert!(h.metrics.encode().contains("code=\"Unavailable\""));
    // A new stream still gets the valid certificate at once.
    let mut client2 = h.sds().await;
    let mut s2 = SdsStream::open(&mut client2, &["default"]).await.unwrap();
    assert_eq!(
        serial_of(&leaf_of(&secrets(&s2.next(2).await.unwrap())[0])),
        serial1
    );
    // The CA returns: caught up within one backoff step (max 400 ms here).
    h.ca.set_mode(FakeMode::Normal);
    let pushed = s.next(3).await.unwrap();
    assert_ne!(serial_of(&leaf_of(&secrets(&pushed)[0])), serial1);
    h.stop().await;
}

#[tokio::test]
async fn rejects_chain_for_the_wrong_identity() {
    let h = Harness::start().await;
    h.ca.set_mode(FakeMode::WrongIdentity);
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["default"]).await.unwrap();
    assert!(
        eventually(5, || h.ca.calls() >= 2).await,
        "the agent retries"
    );
    assert!(
        s.quiet_for(300).await,
        "a certificate for another identity was served"
    );
    h.ca.set_mode(FakeMode::Normal);
    let resp = s.next(5).await.unwrap();
    let leaf = leaf_of(&secrets(&resp)[0]);
    assert_eq!(
        citadel_identity::check_x509_svid(&leaf)
            .unwrap()
            .spiffe_id
            .as_str(),
        WEB
    );
    h.stop().await;
}

#[tokio::test]
async fn rejects_chain_that_the_bundle_does_not_verify() {
    let h = Harness::start().await;
    h.ca.set_mode(FakeMode::ForeignRoot);
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["default"]).await.unwrap();
    assert!(
        eventually(5, || h.ca.calls() >= 2).await,
        "the agent retries"
    );
    assert!(
        s.quiet_for(300).await,
        "an unverifiable certificate was served"
    );
    h.stop().await;
}

#[tokio::test]
async fn client_that_never_reads_is_not_buffered_for() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let mut lazy = SdsStream::open(&mut client, &["default", "ROOTCA"])
        .await
        .unwrap();
    lazy.next(10).await.unwrap();
    // Many changes while the client does not read.
    for seq in 2..200u64 {
        h.set_bundle(h.ca.bundle(), seq);
    }
    for _ in 0..5 {
        h.manager.rotate_all();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Others are served meanwhile.
    let mut other_client = h.sds().await;
    let mut other = SdsStream::open(&mut other_client, &["ROOTCA"])
        .await
        .unwrap();
    other.next(5).await.unwrap();
    // 204 changes happened. What reaches the slow stream is what fit in its
    // HTTP/2 flow-control window (64 KiB) plus one message in the agent's
    // channel: a bounded handful, never one per change, and the latest last.
    let mut seen = Vec::new();
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(500), lazy.rx.message()).await {
        match r {
            Ok(Some(r)) => seen.push(r.version_info),
            _ => break,
        }
    }
    assert!(!seen.is_empty());
    assert!(
        seen.len() <= 30,
        "changes were queued for a stream that did not read: {}",
        seen.len()
    );
    assert!(
        seen.last().unwrap().contains("b199"),
        "the latest bundle came last: {seen:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn identity_is_dropped_even_while_the_ca_is_down() {
    let h = Harness::start().await;
    h.ca.set_mode(FakeMode::Down);
    {
        let mut client = h.sds().await;
        let _s = SdsStream::open(&mut client, &["default"]).await.unwrap();
        assert!(eventually(5, || h.ca.calls() >= 2).await);
    }
    // Retries keep failing, yet the identity goes once nobody wants it, and
    // no CSR is sent for it after that.
    assert!(
        eventually(5, || h.manager.identities().is_empty()).await,
        "identity kept while the CA was down"
    );
    let calls = h.ca.calls();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        h.ca.calls(),
        calls,
        "CSRs sent for an identity nobody asks for"
    );
    h.stop().await;
}

#[tokio::test]
async fn removing_the_entry_ends_open_streams() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["default"]).await.unwrap();
    s.next(10).await.unwrap();
    let mut wl = h.workload_api().await;
    let mut svids = wl
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(5), svids.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The entry is edited to another uid: the caller has no identity now.
    h.set_entries(
        "entries:\n  - spiffe_id: spiffe://cluster.local/ns/shop/sa/web\n    uid: 4242424\n",
    );
    let err = s.next(5).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = tokio::time::timeout(Duration::from_secs(5), svids.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    h.stop().await;
}

#[tokio::test]
async fn an_unrelated_entries_edit_keeps_streams_open() {
    let h = Harness::start().await;
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["default"]).await.unwrap();
    s.next(10).await.unwrap();
    h.set_entries(&format!(
        "entries:\n  - spiffe_id: {WEB}\n    uid: {}\n  - spiffe_id: spiffe://cluster.local/ns/x/sa/y\n    uid: 4242424\n",
        my_uid()
    ));
    assert!(
        s.quiet_for(500).await,
        "the stream ended or was answered after an unrelated edit"
    );
    h.manager.rotate_all();
    s.next(5).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn workload_api_client_that_never_reads_is_not_buffered_for() {
    let h = Harness::start().await;
    let mut wl = h.workload_api().await;
    let mut bundles = wl
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(5), bundles.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    for seq in 2..300u64 {
        h.set_bundle(h.ca.bundle(), seq);
    }
    let mut roots = h.ca.bundle().roots().to_vec();
    roots.extend(h.ca.foreign_bundle().roots().iter().cloned());
    let latest =
        citadel_identity::TrustBundle::new(h.ca.bundle().trust_domain().clone(), roots).unwrap();
    h.set_bundle(latest.clone(), 300);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = Vec::new();
    while let Ok(Ok(Some(m))) =
        tokio::time::timeout(Duration::from_millis(500), bundles.message()).await
    {
        seen.push(m);
    }
    // Identical bundles are still full-state messages, but only what fit in
    // the HTTP/2 window plus one was ever queued, and the latest came last.
    assert!(
        !seen.is_empty() && seen.len() <= 30,
        "{} messages queued",
        seen.len()
    );
    assert_eq!(
        seen.last()
            .unwrap()
            .bundles
            .get("spiffe://cluster.local")
            .cloned(),
        Some(latest.to_concatenated_der())
    );
    h.stop().await;
}
