//! The agent acknowledges a bundle only once it reached every consumer: an SDS stream that
//! asked for ROOTCA holds the acknowledgement back until it ACKs the response carrying the
//! bundle (a NACK or a stale nonce does not count); a Workload API stream counts once it
//! was sent it; a closed stream no longer counts. In-process: real socket, fake CA.

mod support;

use citadel_proto::google::rpc::Status as RpcStatus;
use citadel_proto::spiffe_workload::X509BundlesRequest;
use support::*;

#[tokio::test]
async fn a_bundle_is_acknowledged_only_after_every_rootca_stream_acked_it() {
    let h = Harness::start().await;
    assert_eq!(
        h.propagation.propagated(1),
        1,
        "no consumer: applied is propagated"
    );
    let mut client = h.sds().await;
    let mut s = SdsStream::open(&mut client, &["ROOTCA"]).await.unwrap();
    let first = s.next(5).await.unwrap();
    assert_eq!(first.version_info, "b1");
    assert_eq!(h.propagation.propagated(1), 0, "sent is not ACKed");
    s.tx.send(request(&["ROOTCA"], "b1", &first.nonce))
        .await
        .unwrap();
    assert!(eventually(5, || h.propagation.propagated(1) == 1).await);

    // A new bundle: pushed, and held back until ACKed.
    h.set_bundle(h.ca.bundle(), 2);
    let second = s.next(5).await.unwrap();
    assert_eq!(second.version_info, "b2");
    assert_eq!(h.propagation.propagated(2), 1);
    // A NACK (error detail, previous version) does not confirm it ...
    let mut nack = request(&["ROOTCA"], "b1", &second.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "rejected".into(),
        details: Vec::new(),
    });
    s.tx.send(nack).await.unwrap();
    // ... nor does an ACK of a stale nonce.
    s.tx.send(request(&["ROOTCA"], "b2", &first.nonce))
        .await
        .unwrap();
    assert!(s.quiet_for(300).await);
    assert_eq!(h.propagation.propagated(2), 1);
    s.tx.send(request(&["ROOTCA"], "b2", &second.nonce))
        .await
        .unwrap();
    assert!(eventually(5, || h.propagation.propagated(2) == 2).await);

    // A stream that never asked for ROOTCA is no consumer; a closed one no longer is.
    let _cert_only = SdsStream::open(&mut client, &["default"]).await.unwrap();
    h.set_bundle(h.ca.bundle(), 3);
    let _ = s.next(5).await.unwrap();
    assert_eq!(h.propagation.propagated(3), 2);
    drop(s);
    assert!(eventually(5, || h.propagation.propagated(3) == 3).await);
    h.stop().await;
}

#[tokio::test]
async fn a_workload_api_stream_counts_once_it_was_sent_the_bundle() {
    let h = Harness::start().await;
    let mut api = h.workload_api().await;
    let mut req = tonic::Request::new(X509BundlesRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = api.fetch_x509_bundles(req).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    assert!(eventually(5, || h.propagation.propagated(1) == 1).await);
    h.set_bundle(h.ca.bundle(), 2);
    stream.message().await.unwrap().unwrap();
    assert!(eventually(5, || h.propagation.propagated(2) == 2).await);
    assert_eq!(h.propagation.consumers(), 1);
    drop(stream);
    assert!(eventually(5, || h.propagation.consumers() == 0).await);
    h.stop().await;
}
