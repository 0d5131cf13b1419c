//! Node agents against the in-process CA: joining with a one-time token, requesting workload
//! identities on behalf of the node's workloads, and the trust-bundle stream.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use citadel_ca::authorities::record_of;
use citadel_ca::authority::Authority;
use citadel_ca::join_token::{record_for, token_hash, validate_grant};
use citadel_ca::serve::SHUTDOWN_GRACE;
use citadel_e2e::client::{connect, create, request};
use citadel_e2e::csr::p256_csr;
use citadel_e2e::unix_now;
use citadel_proto::citadel::v1::{TrustBundleAck, TrustBundleUpdate};
use citadel_store::{AuthorityState, LedgerFilter};
use support::{FlakyStore, Harness, WEB, chain_der};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

const NODE_A: &str = "spiffe://cluster.local/citadel/node/node-a";
const VAULT: &str = "spiffe://cluster.local/ns/bank/sa/vault";

fn leaf_id(chain: &[String]) -> String {
    citadel_identity::check_citadel_leaf(&chain_der(chain)[0])
        .unwrap()
        .spiffe_id
        .to_string()
}

async fn token_used(h: &Harness, token: &str) -> bool {
    h.store
        .find_join_token(&token_hash(token))
        .await
        .unwrap()
        .unwrap()
        .used_at
        .is_some()
}

// ---------------------------------------------------------------------------------------------
// Join tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn join_token_exchange_issues_node_identity() {
    let h = Harness::start().await;
    let token = h.join_token("node-a", &[WEB]).await;
    let csr = p256_csr(&[NODE_A]).unwrap();
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    let resp = create(&mut client, request(&csr.pem, 0, Some(&token), None))
        .await
        .unwrap();
    assert_eq!(leaf_id(&resp.cert_chain), NODE_A);
    let rows = h
        .store
        .list_issuances(&LedgerFilter::default())
        .await
        .unwrap();
    let row = &rows.last().unwrap().issuance;
    assert_eq!(row.spiffe_id, NODE_A);
    assert_eq!(row.requester, NODE_A);
    assert_eq!(row.node.as_deref(), Some("node-a"));
    assert!(token_used(&h, &token).await, "the token must be spent");
    assert_eq!(
        h.store.node_allowed_ids("node-a").await.unwrap(),
        Some(vec![WEB.to_string()])
    );
    // A CSR without a URI SAN gets the node identity too.
    let token = h.join_token("node-a", &[WEB]).await;
    let bare = p256_csr(&[]).unwrap();
    let resp = create(&mut client, request(&bare.pem, 0, Some(&token), None))
        .await
        .unwrap();
    assert_eq!(leaf_id(&resp.cert_chain), NODE_A);
    h.stop().await;
}

#[tokio::test]
async fn rejects_used_join_token() {
    let h = Harness::start().await;
    let token = h.join_token("node-a", &[WEB]).await;
    let csr = p256_csr(&[NODE_A]).unwrap();
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    create(&mut client, request(&csr.pem, 0, Some(&token), None))
        .await
        .unwrap();
    let msg = h.refuse_token(&token).await;
    assert!(msg.contains("already been used"), "{msg}");
    assert!(!msg.contains(&token), "the token was echoed: {msg}");
    h.stop().await;
}

#[tokio::test]
async fn rejects_expired_join_token() {
    let h = Harness::start().await;
    let grant = validate_grant(&h.trust_domain(), "node-a", &[WEB.into()], 3600).unwrap();
    let token = "citadel-join.ZXhwaXJlZC10b2tlbi1mb3ItdGhlLXRlc3QuLi4uLi4";
    h.store
        .insert_join_token(&record_for(token, &grant, unix_now() - 7200))
        .await
        .unwrap();
    let msg = h.refuse_token(token).await;
    assert!(msg.contains("expired"), "{msg}");
    assert!(!token_used(&h, token).await);
    h.stop().await;
}

#[tokio::test]
async fn rejects_unknown_join_token() {
    let h = Harness::start().await;
    h.join_token("node-a", &[WEB]).await;
    let token = "citadel-join.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let msg = h.refuse_token(token).await;
    assert!(msg.contains("unknown"), "{msg}");
    assert!(!msg.contains(token), "the token was echoed: {msg}");
    assert_eq!(h.store.node_allowed_ids("node-a").await.unwrap(), None);
    h.stop().await;
}

#[tokio::test]
async fn malformed_csr_does_not_burn_join_token() {
    let h = Harness::start().await;
    let token = h.join_token("node-a", &[WEB]).await;
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
    // Refusals after the CSR parses do not burn it either.
    let other = p256_csr(&[WEB]).unwrap();
    h.expect_refusal(
        request(&other.pem, 0, Some(&token), None),
        Code::PermissionDenied,
    )
    .await;
    let csr = p256_csr(&[NODE_A]).unwrap();
    h.expect_refusal(
        request(&csr.pem, 91 * 86_400, Some(&token), None),
        Code::InvalidArgument,
    )
    .await;
    assert!(!token_used(&h, &token).await);
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    let resp = create(&mut client, request(&csr.pem, 0, Some(&token), None))
        .await
        .unwrap();
    assert_eq!(leaf_id(&resp.cert_chain), NODE_A);
    h.stop().await;
}

#[tokio::test]
async fn concurrent_exchanges_of_one_join_token_issue_once() {
    let h = Harness::start().await;
    let token = h.join_token("node-a", &[WEB]).await;
    let before = h.ledger_len().await;
    let attempts: Vec<_> = (0..6)
        .map(|_| {
            let token = token.clone();
            let addr = h.addr();
            let bundle = h.bundle_pem.clone();
            tokio::spawn(async move {
                let csr = p256_csr(&[NODE_A]).unwrap();
                let mut client = connect(addr, &bundle, None).await.unwrap();
                create(&mut client, request(&csr.pem, 0, Some(&token), None)).await
            })
        })
        .collect();
    let mut issued = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(_) => issued += 1,
            // A loser either raced the winner to the consume (PERMISSION_DENIED) or arrived
            // after it (UNAUTHENTICATED: already used).
            Err(e) => assert!(
                matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated),
                "{e:?}"
            ),
        }
    }
    assert_eq!(issued, 1);
    assert_eq!(h.ledger_len().await, before + 1);
    h.stop().await;
}

#[tokio::test]
async fn join_token_caller_cannot_impersonate() {
    let h = Harness::start().await;
    let token = h.join_token("node-a", &[WEB]).await;
    let csr = p256_csr(&[]).unwrap();
    let msg = h
        .expect_refusal(
            request(&csr.pem, 0, Some(&token), Some(WEB)),
            Code::PermissionDenied,
        )
        .await;
    assert!(msg.contains(NODE_A) && msg.contains(WEB), "{msg}");
    assert!(!token_used(&h, &token).await);
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Impersonation by node agents
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn node_may_impersonate_allowed_identity() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let mut node = connect(h.addr(), &h.bundle_pem, Some((&chain, &key)))
        .await
        .unwrap();
    for uris in [&[][..], &[WEB][..]] {
        let csr = p256_csr(uris).unwrap();
        let resp = create(&mut node, request(&csr.pem, 0, None, Some(WEB)))
            .await
            .unwrap();
        assert_eq!(leaf_id(&resp.cert_chain), WEB);
        let rows = h
            .store
            .list_issuances(&LedgerFilter::default())
            .await
            .unwrap();
        let row = &rows.last().unwrap().issuance;
        assert_eq!(row.spiffe_id, WEB);
        assert_eq!(row.requester, NODE_A);
        assert_eq!(row.node.as_deref(), Some("node-a"));
    }
    // Without ImpersonatedIdentity the node renews its own identity.
    let csr = p256_csr(&[NODE_A]).unwrap();
    let resp = create(&mut node, request(&csr.pem, 0, None, None))
        .await
        .unwrap();
    assert_eq!(leaf_id(&resp.cert_chain), NODE_A);
    let rows = h
        .store
        .list_issuances(&LedgerFilter::default())
        .await
        .unwrap();
    assert_eq!(
        rows.last().unwrap().issuance.node.as_deref(),
        Some("node-a")
    );
    h.stop().await;
}

#[tokio::test]
async fn rejects_impersonation_outside_node_allow_list() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let csr = p256_csr(&[]).unwrap();
    let msg = h
        .expect_refusal_as(
            request(&csr.pem, 0, None, Some(VAULT)),
            Code::PermissionDenied,
            Some((&chain, &key)),
        )
        .await;
    assert!(msg.contains(NODE_A) && msg.contains(VAULT), "{msg}");
    // Another node's allow list does not count, nor does a node identity.
    h.join("node-b", &[VAULT]).await;
    for target in [VAULT, "spiffe://cluster.local/citadel/node/node-b"] {
        h.expect_refusal_as(
            request(&csr.pem, 0, None, Some(target)),
            Code::PermissionDenied,
            Some((&chain, &key)),
        )
        .await;
    }
    // A CSR naming another identity than the impersonated one is refused as well.
    let wrong = p256_csr(&[VAULT]).unwrap();
    h.expect_refusal_as(
        request(&wrong.pem, 0, None, Some(WEB)),
        Code::PermissionDenied,
        Some((&chain, &key)),
    )
    .await;
    h.stop().await;
}

#[tokio::test]
async fn workload_certificate_cannot_impersonate() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let mut node = connect(h.addr(), &h.bundle_pem, Some((&chain, &key)))
        .await
        .unwrap();
    let web = p256_csr(&[]).unwrap();
    let resp = create(&mut node, request(&web.pem, 0, None, Some(WEB)))
        .await
        .unwrap();
    let web_chain = resp.cert_chain.concat();
    let web_key = web.key.serialize_pem();
    let csr = p256_csr(&[]).unwrap();
    h.expect_refusal_as(
        request(&csr.pem, 0, None, Some(VAULT)),
        Code::PermissionDenied,
        Some((&web_chain, &web_key)),
    )
    .await;
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Revocable node credentials: serials, supersession, eviction
// ---------------------------------------------------------------------------------------------

/// The refusal must be `PERMISSION_DENIED`; returns its message.
fn denied<T: std::fmt::Debug>(out: Result<T, tonic::Status>) -> String {
    match out {
        Err(status) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            status.message().to_owned()
        }
        Ok(v) => panic!("expected PERMISSION_DENIED, got {v:?}"),
    }
}

async fn node_record(h: &Harness, name: &str) -> citadel_store::NodeRecord {
    h.store
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.name == name)
        .unwrap()
}

#[tokio::test]
async fn cloned_node_identity_is_refused_after_the_original_renews() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    // The clone: the same certificate and key, used by another client.
    let clone = (chain.clone(), key.clone());
    let (renewed_chain, renewed_key) = h.renew_node("node-a", (&chain, &key)).await.unwrap();
    // The original uses its new certificate, which supersedes the copied one.
    let issued = h
        .impersonate((&renewed_chain, &renewed_key), WEB)
        .await
        .unwrap();
    assert_eq!(leaf_id(&issued), WEB);
    let before = h.ledger_len().await;
    let msg = denied(h.renew_node("node-a", (&clone.0, &clone.1)).await);
    assert!(
        msg.contains("node-a") && msg.contains("superseded by a newer one"),
        "{msg}"
    );
    denied(h.impersonate((&clone.0, &clone.1), WEB).await);
    assert_eq!(h.ledger_len().await, before, "the clone got a certificate");
    assert_eq!(
        node_record(&h, "node-a").await.current_serial.as_deref(),
        Some(
            citadel_identity::check_citadel_leaf(
                &chain_der(std::slice::from_ref(&renewed_chain))[0]
            )
            .unwrap()
            .serial_hex
            .as_str()
        )
    );
    // The original carries on.
    h.renew_node("node-a", (&renewed_chain, &renewed_key))
        .await
        .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn lost_renewal_response_does_not_lock_the_node_out() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    // The renewal succeeds but its answer never reaches the agent ...
    let (lost_chain, lost_key) = h.renew_node("node-a", (&chain, &key)).await.unwrap();
    // ... which keeps using its old certificate: still accepted, for impersonation and to
    // renew again.
    h.impersonate((&chain, &key), WEB).await.unwrap();
    h.impersonate((&chain, &key), WEB).await.unwrap();
    assert!(node_record(&h, "node-a").await.pending_serial.is_some());
    // Once the new certificate is used, the old one is refused.
    h.impersonate((&lost_chain, &lost_key), WEB).await.unwrap();
    let before = h.ledger_len().await;
    denied(h.impersonate((&chain, &key), WEB).await);
    denied(h.renew_node("node-a", (&chain, &key)).await);
    assert_eq!(h.ledger_len().await, before);
    h.stop().await;
}

#[tokio::test]
async fn evicted_node_cannot_renew() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    assert!(h.store.evict_node("node-a", unix_now()).await.unwrap());
    let csr = p256_csr(&[NODE_A]).unwrap();
    let msg = h
        .expect_refusal_as(
            request(&csr.pem, 0, None, None),
            Code::PermissionDenied,
            Some((&chain, &key)),
        )
        .await;
    assert!(
        msg.contains("node-a has been evicted") && msg.contains("re-join with a new token"),
        "{msg}"
    );
    h.stop().await;
}

#[tokio::test]
async fn evicted_node_cannot_impersonate() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    h.impersonate((&chain, &key), WEB).await.unwrap();
    assert!(h.store.evict_node("node-a", unix_now()).await.unwrap());
    let csr = p256_csr(&[]).unwrap();
    let msg = h
        .expect_refusal_as(
            request(&csr.pem, 0, None, Some(WEB)),
            Code::PermissionDenied,
            Some((&chain, &key)),
        )
        .await;
    assert!(msg.contains("evicted"), "{msg}");
    h.stop().await;
}

#[tokio::test]
async fn evicted_node_cannot_watch_the_trust_bundle() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    assert!(h.store.evict_node("node-a", unix_now()).await.unwrap());
    let (acks, rx) = mpsc::channel(1);
    acks.send(TrustBundleAck {
        applied_sequence: 1,
    })
    .await
    .unwrap();
    let err = h
        .bundle_client(Some((&chain, &key)))
        .await
        .watch_trust_bundle(ReceiverStream::new(rx))
        .await
        .expect_err("an evicted node must not watch the trust bundle");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("evicted"), "{err:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        h.store.list_bundle_acks().await.unwrap().is_empty(),
        "an evicted node's acknowledgement was recorded"
    );
    h.stop().await;
}

#[tokio::test]
async fn evicted_node_rejoins_with_a_new_token() {
    let h = Harness::start().await;
    let (old_chain, old_key) = h.join("node-a", &[WEB]).await;
    assert!(h.store.evict_node("node-a", unix_now()).await.unwrap());
    denied(h.impersonate((&old_chain, &old_key), WEB).await);
    // A new token and a join clear the eviction.
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let node = node_record(&h, "node-a").await;
    assert_eq!(node.evicted_at, None);
    assert_eq!(node.state(), "active");
    h.impersonate((&chain, &key), WEB).await.unwrap();
    h.renew_node("node-a", (&chain, &key)).await.unwrap();
    // The certificate from before the eviction stays refused.
    let before = h.ledger_len().await;
    denied(h.impersonate((&old_chain, &old_key), WEB).await);
    assert_eq!(h.ledger_len().await, before);
    h.stop().await;
}

#[tokio::test]
async fn failed_ledger_write_leaves_the_join_token_usable() {
    let down = Arc::new(AtomicBool::new(false));
    let flag = down.clone();
    let h = Harness::start_with(move |inner| Arc::new(FlakyStore { inner, down: flag })).await;
    let token = h.join_token("node-a", &[WEB]).await;
    let csr = p256_csr(&[NODE_A]).unwrap();
    down.store(true, Ordering::SeqCst);
    let msg = h
        .expect_refusal(request(&csr.pem, 0, Some(&token), None), Code::Unavailable)
        .await;
    assert!(msg.contains("no certificate issued"), "{msg}");
    assert!(
        !token_used(&h, &token).await,
        "the failed join spent the token"
    );
    assert_eq!(h.store.node_allowed_ids("node-a").await.unwrap(), None);
    // Once the ledger is back, the same token is exchanged for the node certificate.
    down.store(false, Ordering::SeqCst);
    let mut client = connect(h.addr(), &h.bundle_pem, None).await.unwrap();
    let resp = create(&mut client, request(&csr.pem, 0, Some(&token), None))
        .await
        .unwrap();
    assert_eq!(leaf_id(&resp.cert_chain), NODE_A);
    assert!(token_used(&h, &token).await);
    assert!(h.store.verify_ledger().await.unwrap().is_valid());
    h.stop().await;
}

#[tokio::test]
async fn failed_ledger_write_leaves_a_renewal_unrecorded() {
    let down = Arc::new(AtomicBool::new(false));
    let flag = down.clone();
    let h = Harness::start_with(move |inner| Arc::new(FlakyStore { inner, down: flag })).await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let before = node_record(&h, "node-a").await;
    down.store(true, Ordering::SeqCst);
    let err = h.renew_node("node-a", (&chain, &key)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let after = node_record(&h, "node-a").await;
    assert_eq!(after.pending_serial, None);
    assert_eq!(after.current_serial, before.current_serial);
    down.store(false, Ordering::SeqCst);
    h.renew_node("node-a", (&chain, &key)).await.unwrap();
    assert!(node_record(&h, "node-a").await.pending_serial.is_some());
    h.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Trust-bundle stream
// ---------------------------------------------------------------------------------------------

/// An open trust-bundle stream: acknowledgements go out through `acks`.
struct BundleStream {
    acks: mpsc::Sender<TrustBundleAck>,
    updates: Streaming<TrustBundleUpdate>,
}

impl BundleStream {
    async fn open(h: &Harness, client_identity: Option<(&str, &str)>, token: Option<&str>) -> Self {
        let (acks, rx) = mpsc::channel(8);
        acks.send(TrustBundleAck {
            applied_sequence: 0,
        })
        .await
        .unwrap();
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let updates = h
            .bundle_client(client_identity)
            .await
            .watch_trust_bundle(req)
            .await
            .unwrap()
            .into_inner();
        BundleStream { acks, updates }
    }

    async fn next(&mut self) -> TrustBundleUpdate {
        tokio::time::timeout(Duration::from_secs(10), self.updates.message())
            .await
            .expect("no trust-bundle update within 10 s")
            .unwrap()
            .expect("the stream ended")
    }

    async fn ack(&self, applied_sequence: u64) {
        self.acks
            .send(TrustBundleAck { applied_sequence })
            .await
            .unwrap();
    }
}

/// Waits until the store holds `agent`'s acknowledgement of `sequence`.
async fn wait_for_ack(h: &Harness, agent: &str, sequence: u64) -> Vec<citadel_store::BundleAck> {
    for _ in 0..200 {
        let acks = h.store.list_bundle_acks().await.unwrap();
        if acks
            .iter()
            .any(|a| a.agent_id == agent && a.sequence == sequence)
        {
            return acks;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("acknowledgement of {sequence} by {agent} not recorded within 10 s");
}

#[tokio::test]
async fn trust_bundle_stream_sends_bundle_and_records_acks() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let mut stream = BundleStream::open(&h, Some((&chain, &key)), None).await;
    let update = stream.next().await;
    let sequence = h.store.bundle_sequence().await.unwrap();
    assert!(sequence >= 1);
    assert_eq!(update.sequence, sequence);
    assert_eq!(update.trust_domain, "cluster.local");
    let bundle = citadel_identity::TrustBundle::from_pem(h.trust_domain(), &h.bundle_pem).unwrap();
    let roots: Vec<Vec<u8>> = bundle.roots().iter().map(|c| c.to_vec()).collect();
    assert_eq!(update.x509_authorities, roots);
    // An acknowledgement of a sequence never sent is ignored; the real one is recorded. Acks
    // are handled in order, so once the second is stored the first has been judged.
    stream.ack(sequence + 100).await;
    stream.ack(sequence).await;
    let acks = wait_for_ack(&h, NODE_A, sequence).await;
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert!((acks[0].acked_at - unix_now()).abs() < 60);
    h.stop().await;
}

#[tokio::test]
async fn rejects_trust_bundle_stream_from_a_workload() {
    let h = Harness::start().await;
    let token = h.tokens.token("shop", "web");
    let (acks, rx) = mpsc::channel(1);
    acks.send(TrustBundleAck {
        applied_sequence: 1,
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let err = h
        .bundle_client(None)
        .await
        .watch_trust_bundle(req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        h.store.list_bundle_acks().await.unwrap().is_empty(),
        "a workload was recorded as an agent"
    );
    h.stop().await;
}

#[tokio::test]
async fn trust_bundle_stream_pushes_on_change() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let mut stream = BundleStream::open(&h, Some((&chain, &key)), None).await;
    let first = stream.next().await;
    assert_eq!(first.x509_authorities.len(), 1);
    // A new root is prepared, as another replica or the CLI would do.
    let (next_root, _key) =
        Authority::create_root(&h.trust_domain(), unix_now(), 86_400 * 365).unwrap();
    h.store
        .insert_authority(&record_of(
            &next_root,
            AuthorityState::Prepared,
            "next.key.pem",
            unix_now(),
        ))
        .await
        .unwrap();
    let pushed = stream.next().await;
    assert!(pushed.sequence > first.sequence, "{pushed:?}");
    assert_eq!(pushed.sequence, h.store.bundle_sequence().await.unwrap());
    assert_eq!(pushed.x509_authorities.len(), 2);
    assert!(pushed.x509_authorities.contains(&next_root.root().to_vec()));
    stream.ack(pushed.sequence).await;
    wait_for_ack(&h, NODE_A, pushed.sequence).await;
    // bundle.pem follows as well.
    let on_disk = std::fs::read_to_string(h.data_dir.join("bundle.pem")).unwrap();
    let on_disk = citadel_identity::TrustBundle::from_pem(h.trust_domain(), &on_disk).unwrap();
    assert_eq!(on_disk.roots().len(), 2);
    h.stop().await;
}

#[tokio::test]
async fn trust_bundle_stream_requires_authentication() {
    let h = Harness::start().await;
    let (acks, rx) = mpsc::channel::<TrustBundleAck>(1);
    let err = h
        .bundle_client(None)
        .await
        .watch_trust_bundle(ReceiverStream::new(rx))
        .await
        .expect_err("an anonymous stream must be refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    drop(acks);
    let err = h
        .bundle_client(None)
        .await
        .watch_trust_bundle({
            let (_acks, rx) = mpsc::channel::<TrustBundleAck>(1);
            let mut req = tonic::Request::new(ReceiverStream::new(rx));
            req.metadata_mut().insert(
                "authorization",
                "Bearer citadel-join.unknown".parse().unwrap(),
            );
            req
        })
        .await
        .expect_err("an unknown join token must be refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    h.stop().await;
}

#[tokio::test]
async fn open_trust_bundle_streams_do_not_hold_up_shutdown() {
    let h = Harness::start().await;
    let (chain, key) = h.join("node-a", &[WEB]).await;
    let mut stream = BundleStream::open(&h, Some((&chain, &key)), None).await;
    stream.next().await;
    let started = std::time::Instant::now();
    h.stop().await;
    assert!(
        started.elapsed() < SHUTDOWN_GRACE / 2,
        "shutdown waited {:?} for an open trust-bundle stream",
        started.elapsed()
    );
    // The agent sees the stream end (cleanly or with a transport error), not hang.
    let end = tokio::time::timeout(Duration::from_secs(5), stream.updates.message())
        .await
        .expect("the stream did not end after shutdown");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}
