//! Follows the trust bundle in the store: one task polls the bundle sequence and, when it
//! moved, reloads the bundle and publishes it through `watch` channels (latest wins), so
//! every replica follows authority changes made by any other replica or by the CLI.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use citadel_identity::{TrustBundle, TrustDomain};
use citadel_proto::citadel::v1::TrustBundleUpdate;
use citadel_store::Store;
use tokio::sync::watch;

use crate::authorities::{current_bundle, write_bundle};

/// The trust bundle together with the store's bundle sequence it is at least as new as.
#[derive(Debug, Clone)]
pub struct BundleSnapshot {
    /// The bundle sequence read before the bundle.
    pub sequence: u64,
    /// The roots of every prepared, active or retired authority.
    pub bundle: TrustBundle,
}

impl BundleSnapshot {
    /// The wire form sent to node agents.
    pub fn to_update(&self) -> TrustBundleUpdate {
        TrustBundleUpdate {
            sequence: self.sequence,
            trust_domain: self.bundle.trust_domain().to_string(),
            x509_authorities: self.bundle.roots().iter().map(|r| r.to_vec()).collect(),
        }
    }
}

/// Reads the sequence, then the bundle. In this order the bundle is never older than the
/// sequence it is published with: a change racing with the read shows up as a newer
/// sequence at the next poll, never as an acknowledged sequence whose roots were missed.
pub async fn load_snapshot(store: &dyn Store, td: &TrustDomain) -> anyhow::Result<BundleSnapshot> {
    let sequence = store.bundle_sequence().await?;
    let bundle = current_bundle(store, td).await?;
    Ok(BundleSnapshot { sequence, bundle })
}

/// The polling task and the channels it publishes to.
pub struct BundlePoller {
    /// Where the bundle comes from.
    pub store: Arc<dyn Store>,
    /// Trust domain of the bundle.
    pub trust_domain: TrustDomain,
    /// Time between two reads of the sequence.
    pub interval: Duration,
    /// `bundle.pem` to rewrite on every change, if any.
    pub bundle_file: Option<PathBuf>,
    /// Snapshots for the trust-bundle streams.
    pub snapshots: watch::Sender<Arc<BundleSnapshot>>,
    /// The bare bundle, for client-certificate authentication.
    pub bundles: watch::Sender<TrustBundle>,
}

impl BundlePoller {
    /// Polls until `shutdown` turns true. Store errors are logged and retried at the next tick;
    /// the last good bundle stays published meanwhile.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let published = self.snapshots.borrow().sequence;
            match self.store.bundle_sequence().await {
                Ok(stored) if stored == published => {}
                Ok(_) => self.reload().await,
                Err(e) => tracing::warn!(error = %e, "cannot read the trust-bundle sequence"),
            }
        }
    }

    async fn reload(&self) {
        let snapshot = match load_snapshot(self.store.as_ref(), &self.trust_domain).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the trust bundle; keeping the last one");
                return;
            }
        };
        tracing::info!(
            sequence = snapshot.sequence,
            roots = snapshot.bundle.roots().len(),
            "trust bundle changed"
        );
        if let Some(path) = &self.bundle_file
            && let Err(e) = write_bundle(path, &snapshot.bundle)
        {
            tracing::warn!(error = %e, path = %path.display(), "cannot rewrite the bundle file");
        }
        self.bundles.send_replace(snapshot.bundle.clone());
        self.snapshots.send_replace(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorities::record_of;
    use crate::authority::Authority;
    use citadel_store::AuthorityState;
    use citadel_store::memory::MemoryStore;

    async fn add_root(store: &dyn Store, td: &TrustDomain, state: AuthorityState) {
        let (root, _key) = Authority::create_root(td, 1_000, 86_400).unwrap();
        let rec = record_of(&root, state, "k", 1_000);
        store.insert_authority(&rec).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_only_when_the_sequence_moves_and_stops_on_shutdown() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let td = TrustDomain::new("cluster.local").unwrap();
        add_root(store.as_ref(), &td, AuthorityState::Active).await;
        let first = load_snapshot(store.as_ref(), &td).await.unwrap();
        assert_eq!(first.sequence, 1);
        assert_eq!(first.to_update().x509_authorities.len(), 1);
        let (snapshots, mut snapshot_rx) = watch::channel(Arc::new(first.clone()));
        let (bundles, mut bundle_rx) = watch::channel(first.bundle.clone());
        let (stop, stop_rx) = watch::channel(false);
        let poller = tokio::spawn(
            BundlePoller {
                store: store.clone(),
                trust_domain: td.clone(),
                interval: Duration::from_secs(5),
                bundle_file: None,
                snapshots,
                bundles,
            }
            .run(stop_rx),
        );
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert!(
            !snapshot_rx.has_changed().unwrap(),
            "republished without a change"
        );

        add_root(store.as_ref(), &td, AuthorityState::Prepared).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(snapshot_rx.has_changed().unwrap(), "change not published");
        let next = snapshot_rx.borrow_and_update().clone();
        assert_eq!(next.sequence, 2);
        let update = next.to_update();
        assert_eq!(update.trust_domain, "cluster.local");
        assert_eq!(update.x509_authorities.len(), 2);
        assert!(bundle_rx.has_changed().unwrap());
        assert_eq!(bundle_rx.borrow_and_update().roots().len(), 2);

        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(1), poller)
            .await
            .expect("the poller did not stop")
            .unwrap();
    }
}
