//! A CA with a short-lived self-signed root renews it by itself: the renewal task prepares a
//! new root at the configured fraction of the old one's lifetime, activates it only after
//! the (agent-like) acknowledger has acknowledged the bundle holding it, and removes the old
//! root once its last live certificate (the CA's own serving certificate) is superseded.

mod support;

use std::time::{Duration, Instant};

use citadel_ca::rotation::RenewalPolicy;
use citadel_ca::rotation_driver::RENEWAL_LEASE;
use citadel_e2e::unix_now;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use citadel_store::AuthorityState;
use support::Harness;

const AGENT: &str = "spiffe://cluster.local/citadel/node/acker";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_self_signed_root_is_renewed_activated_and_removed_by_the_running_ca() {
    // The root lives 20 s (plus the 120 s its notBefore is back-dated): at 0.9 of that it is
    // due about 6 s after start.
    let h = Harness::start_custom(
        |s| s,
        |c| {
            c.root_lifetime_secs = 20;
            c.lifetime.default_ttl_secs = 10;
            c.root_renewal = Some(RenewalPolicy::new(0.9).unwrap());
        },
    )
    .await;
    let store = h.store.clone();
    let first = store.list_authorities().await.unwrap();
    assert_eq!(first.len(), 1);
    let original = first[0].id.clone();

    // An agent-like acknowledger: while `hold` is set it only heartbeats (re-sends the
    // sequence it last acknowledged), as an agent whose proxies have not ACKed yet.
    // It holds from the start (after acknowledging the first bundle), so the bundle that
    // adds the new root finds it behind.
    let hold = Arc::new(AtomicBool::new(true));
    let acker_store = store.clone();
    let acker_hold = hold.clone();
    let acker = tokio::spawn(async move {
        let mut acked = acker_store.bundle_sequence().await.unwrap();
        loop {
            if !acker_hold.load(Ordering::SeqCst) {
                acked = acker_store.bundle_sequence().await.unwrap();
            }
            acker_store
                .record_bundle_ack(AGENT, acked, unix_now())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let deadline = Instant::now() + Duration::from_secs(40);
    let mut prepared_seen_before_activation = false;
    let mut lease_seen = false;
    let new_active = loop {
        assert!(
            Instant::now() < deadline,
            "no renewal within 40 s: {:?}",
            store
                .list_authorities()
                .await
                .unwrap()
                .iter()
                .map(|r| (r.id.clone(), r.state))
                .collect::<Vec<_>>()
        );
        let records = store.list_authorities().await.unwrap();
        let old = records.iter().find(|r| r.id == original).unwrap();
        lease_seen |= store.get_lease(RENEWAL_LEASE).await.unwrap().is_some();
        if old.state == AuthorityState::Active
            && records.iter().any(|r| r.state == AuthorityState::Prepared)
            && !prepared_seen_before_activation
        {
            prepared_seen_before_activation = true;
            // A live agent behind blocks activation: keep holding its acknowledgement for
            // 2 s (20 renewal rounds) and check nothing was activated meanwhile.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let during = store.list_authorities().await.unwrap();
            assert_eq!(
                during.iter().find(|r| r.id == original).unwrap().state,
                AuthorityState::Active,
                "activated while a live agent had not acknowledged the new root: {:?}",
                during.iter().map(|r| (&r.id, r.state)).collect::<Vec<_>>()
            );
            hold.store(false, Ordering::SeqCst);
        }
        if old.state == AuthorityState::Removed {
            let active = records
                .iter()
                .find(|r| r.state == AuthorityState::Active)
                .expect("an active authority");
            break active.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    acker.abort();
    assert!(lease_seen, "the renewal ran without the lease");
    assert!(
        prepared_seen_before_activation,
        "the new root was activated without first being prepared and propagated"
    );
    assert_ne!(new_active.id, original);
    assert_eq!(
        new_active.cert_pem, new_active.root_pem,
        "a self-signed root"
    );
    // The acknowledger had acknowledged a bundle holding the new root before activation:
    // its acknowledged sequence is at least the one that added the root.
    let acks = store.list_bundle_acks().await.unwrap();
    assert!(acks.iter().any(|a| a.agent_id == AGENT));
    // The serving certificate was re-issued under the new root (that superseded the old
    // root's last live certificate).
    let live_new = store
        .list_issuances(&citadel_store::LedgerFilter {
            live_at: Some(unix_now()),
            authority_id: Some(new_active.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(live_new.iter().any(|l| l.issuance.requester == "citadel"));
    // The bundle file no longer holds the old root.
    let bundle_pem = std::fs::read_to_string(h.data_dir.join("bundle.pem")).unwrap();
    let old_rec = store
        .list_authorities()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == original)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut bundle_pem = bundle_pem;
    while bundle_pem.contains(old_rec.root_pem.trim()) {
        assert!(
            Instant::now() < deadline,
            "the old root stays in bundle.pem"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        bundle_pem = std::fs::read_to_string(h.data_dir.join("bundle.pem")).unwrap();
    }
    h.stop().await;
    // Shutdown gives the lease up.
    assert_eq!(store.get_lease(RENEWAL_LEASE).await.unwrap(), None);
}
