//! The one owner of the active authority: a task that follows the store. It polls the
//! trust-bundle sequence and, when it moved (or when the last switch failed), reloads the
//! authority records, switches signing to the store's active authority, and publishes the
//! new bundle. Every replica runs one, so an activation made by the CLI or by another
//! replica reaches all of them within one poll interval, without a restart or an admin RPC.
//!
//! Order matters: the signer is switched before the bundle naming it is published, so an
//! agent told "authority X is active" and re-issuing at once gets a certificate of X.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use citadel_identity::{TrustBundle, TrustDomain};
use citadel_store::{AuthorityState, AuthorityStore};
use tokio::sync::watch;

use crate::authorities::{AuthorityLoader, bundle_of, write_bundle};
use crate::authority::Authority;
use crate::bundle_watch::{BundleSnapshot, read_authorities};

/// The polling task and the channels it publishes to.
pub struct StoreFollower {
    /// Where authorities and the bundle come from.
    pub store: Arc<dyn AuthorityStore>,
    /// Trust domain of the bundle.
    pub trust_domain: TrustDomain,
    /// Time between two reads of the sequence.
    pub interval: Duration,
    /// `bundle.pem` to rewrite on every change, if any.
    pub bundle_file: Option<PathBuf>,
    /// Loads an authority's certificates and key.
    pub loader: AuthorityLoader,
    /// The authority that signs (the issuer and the serving certificate read it).
    pub authority: watch::Sender<Arc<Authority>>,
    /// Snapshots for the trust-bundle streams.
    pub snapshots: watch::Sender<Arc<BundleSnapshot>>,
    /// The bare bundle, for client-certificate authentication.
    pub bundles: watch::Sender<TrustBundle>,
}

/// What one reload found about the signer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerChange {
    /// The store's active authority is the one signing.
    Unchanged,
    /// Signing switched to this authority.
    Switched(String),
    /// The store's active authority could not be loaded; the previous one keeps signing.
    Failed(String),
    /// The store has no active authority; the previous one keeps signing.
    NoneActive,
}

impl StoreFollower {
    /// Polls until `shutdown` turns true. Store errors are logged and retried at the next
    /// tick; the last good bundle and authority stay in force meanwhile.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        // A failed switch is retried at every tick, even if the sequence does not move.
        let mut retry = false;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let published = self.snapshots.borrow().sequence;
            match self.store.bundle_sequence().await {
                Ok(stored) if stored == published && !retry => {}
                Ok(_) => {
                    retry = matches!(self.reload().await, Some(SignerChange::Failed(_)));
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the trust-bundle sequence"),
            }
        }
    }

    /// Reads the store once, switches the signer if needed, publishes the bundle. `None`
    /// when the store could not be read (nothing changed).
    pub async fn reload(&self) -> Option<SignerChange> {
        let (sequence, records) = match read_authorities(self.store.as_ref()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot reload the authorities; keeping the last ones");
                return None;
            }
        };
        let bundle = match bundle_of(&records, &self.trust_domain) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "the stored authorities make no usable bundle; keeping the last one");
                return None;
            }
        };
        let signing = self.authority.borrow().id().to_owned();
        let change = match records.iter().find(|r| r.state == AuthorityState::Active) {
            None => {
                tracing::error!(authority = %signing, "the store has no active authority; signing with the last one");
                SignerChange::NoneActive
            }
            Some(active) if active.id == signing => SignerChange::Unchanged,
            Some(active) => match self.loader.load(active).await {
                Ok(a) => {
                    tracing::info!(from = %signing, to = %a.id(), "switched the signing authority");
                    self.authority.send_replace(Arc::new(a));
                    SignerChange::Switched(active.id.clone())
                }
                Err(e) => {
                    tracing::error!(authority = %active.id, error = %format!("{e:#}"), "cannot load the active authority; signing with the previous one and retrying");
                    SignerChange::Failed(active.id.clone())
                }
            },
        };
        let snapshot = BundleSnapshot {
            sequence,
            bundle,
            active_authority_id: self.authority.borrow().id().to_owned(),
        };
        tracing::info!(
            sequence = snapshot.sequence,
            roots = snapshot.bundle.roots().len(),
            active = %snapshot.active_authority_id,
            "trust bundle published"
        );
        if let Some(path) = &self.bundle_file
            && let Err(e) = write_bundle(path, &snapshot.bundle)
        {
            tracing::warn!(error = %e, path = %path.display(), "cannot rewrite the bundle file");
        }
        self.bundles.send_replace(snapshot.bundle.clone());
        self.snapshots.send_replace(Arc::new(snapshot));
        Some(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorities::{record_of, save_key};
    use crate::bundle_watch::load_snapshot;
    use crate::keystore::{KeyStore, MemoryKeyStore};
    use citadel_store::memory::MemoryStore;

    /// A follower and the receiving ends of what it publishes.
    type Followed = (
        StoreFollower,
        watch::Receiver<Arc<Authority>>,
        watch::Receiver<Arc<BundleSnapshot>>,
        watch::Receiver<TrustBundle>,
    );

    struct Fixture {
        store: Arc<dyn AuthorityStore>,
        keys: Arc<dyn KeyStore>,
        td: TrustDomain,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                store: Arc::new(MemoryStore::new()),
                keys: Arc::new(MemoryKeyStore::default()),
                td: TrustDomain::new("cluster.local").unwrap(),
            }
        }

        async fn add_root(&self, state: AuthorityState, with_key: bool) -> Arc<Authority> {
            let (root, key) = Authority::create_root(&self.td, 1_000, 86_400 * 3650).unwrap();
            let key_ref = if with_key {
                save_key(self.keys.as_ref(), &root, &key).await.unwrap()
            } else {
                "missing.key.pem".into()
            };
            let rec = record_of(&root, state, &key_ref, 1_000);
            self.store.insert_authority(&rec).await.unwrap();
            Arc::new(root)
        }

        fn follower(&self, first: Arc<Authority>, snapshot: BundleSnapshot) -> Followed {
            let (authority, authority_rx) = watch::channel(first);
            let (bundles, bundle_rx) = watch::channel(snapshot.bundle.clone());
            let (snapshots, snapshot_rx) = watch::channel(Arc::new(snapshot));
            (
                StoreFollower {
                    store: self.store.clone(),
                    trust_domain: self.td.clone(),
                    interval: Duration::from_secs(5),
                    bundle_file: None,
                    loader: AuthorityLoader {
                        keys: self.keys.clone(),
                        ca_dir: None,
                    },
                    authority,
                    snapshots,
                    bundles,
                },
                authority_rx,
                snapshot_rx,
                bundle_rx,
            )
        }
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_only_when_the_sequence_moves_and_stops_on_shutdown() {
        let f = Fixture::new();
        let first_root = f.add_root(AuthorityState::Active, true).await;
        let first = load_snapshot(f.store.as_ref(), &f.td).await.unwrap();
        assert_eq!(first.sequence, 1);
        assert_eq!(first.to_update().x509_authorities.len(), 1);
        assert_eq!(first.to_update().active_authority_id, first_root.id());
        let (follower, authority_rx, mut snapshot_rx, mut bundle_rx) =
            f.follower(first_root.clone(), first);
        let (stop, stop_rx) = watch::channel(false);
        let poller = tokio::spawn(follower.run(stop_rx));
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert!(
            !snapshot_rx.has_changed().unwrap(),
            "republished without a change"
        );

        f.add_root(AuthorityState::Prepared, true).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(snapshot_rx.has_changed().unwrap(), "change not published");
        let next = snapshot_rx.borrow_and_update().clone();
        assert_eq!(next.sequence, 2);
        let update = next.to_update();
        assert_eq!(update.trust_domain, "cluster.local");
        assert_eq!(update.x509_authorities.len(), 2);
        assert_eq!(
            update.active_authority_id,
            first_root.id(),
            "a prepared root does not sign"
        );
        assert_eq!(authority_rx.borrow().id(), first_root.id());
        assert!(bundle_rx.has_changed().unwrap());
        assert_eq!(bundle_rx.borrow_and_update().roots().len(), 2);

        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(1), poller)
            .await
            .expect("the poller did not stop")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn switches_signing_to_the_store_s_active_authority_before_publishing_it() {
        let f = Fixture::new();
        let old = f.add_root(AuthorityState::Active, true).await;
        let first = load_snapshot(f.store.as_ref(), &f.td).await.unwrap();
        let (follower, mut authority_rx, mut snapshot_rx, _b) = f.follower(old.clone(), first);
        let (_stop, stop_rx) = watch::channel(false);
        tokio::spawn(follower.run(stop_rx));
        let new = f.add_root(AuthorityState::Prepared, true).await;
        f.store
            .set_authority_state(new.id(), AuthorityState::Active)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(authority_rx.has_changed().unwrap());
        assert_eq!(authority_rx.borrow_and_update().id(), new.id());
        let snap = snapshot_rx.borrow_and_update().clone();
        assert_eq!(snap.sequence, 3);
        assert_eq!(snap.active_authority_id, new.id());
        assert_eq!(
            snap.bundle.roots().len(),
            2,
            "the retired root stays in the bundle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unloadable_active_authority_keeps_the_previous_signer_and_is_retried() {
        let f = Fixture::new();
        let old = f.add_root(AuthorityState::Active, true).await;
        let first = load_snapshot(f.store.as_ref(), &f.td).await.unwrap();
        let (follower, authority_rx, snapshot_rx, _b) = f.follower(old.clone(), first);
        let broken = f.add_root(AuthorityState::Prepared, false).await;
        f.store
            .set_authority_state(broken.id(), AuthorityState::Active)
            .await
            .unwrap();
        let change = follower.reload().await.unwrap();
        assert_eq!(change, SignerChange::Failed(broken.id().to_owned()));
        assert_eq!(authority_rx.borrow().id(), old.id());
        // Agents are told who really signs, so they do not re-issue in vain.
        assert_eq!(snapshot_rx.borrow().active_authority_id, old.id());
    }
}
