//! The automatic root renewal inside the running CA: a thin task that, every poll interval,
//! takes the renewal lease (a [`Leadership`]: a store lease, or a Kubernetes Lease), asks the
//! pure planners what to do, and takes that one step with the same code as `citadel root
//! rotate` ([`take_step`]). Only the replica holding the lease acts; the others follow the
//! store like for any CLI change.
//!
//! Each round first looks at the operator's `--ca-dir` ([`CaDirWatch`]: a changed set is
//! imported as prepared, then activated once propagated, [`plugin_activation`]), then, if
//! automatic renewal is on, at the active root's age ([`plan_renewal`]).

use std::sync::Arc;
use std::time::Duration;

use citadel_identity::TrustDomain;
use citadel_store::Store;
use tokio::sync::watch;

use crate::ca_dir_watch::{CaDirWatch, plugin_activation};
use crate::clock::unix_now;
use crate::keystore::KeyStore;
use crate::leadership::Leadership;
use crate::root_cmd::{StepTaken, StoreState, describe_blocker, take_step};
use crate::rotation::{Idle, Plan, RenewalPlan, RenewalPolicy, plan_renewal};

/// Name of the lease in the store.
pub const RENEWAL_LEASE: &str = "root-renewal";

/// The renewal task.
pub struct RenewalDriver {
    /// The CA's store.
    pub store: Arc<dyn Store>,
    /// Where new root keys go.
    pub keys: Arc<dyn KeyStore>,
    /// Trust domain of new roots.
    pub trust_domain: TrustDomain,
    /// When a root is due; `None` = automatic renewal off (the task then only watches
    /// `ca_dir`).
    pub policy: Option<RenewalPolicy>,
    /// The operator's CA directory, watched for a new set.
    pub ca_dir: Option<CaDirWatch>,
    /// Lifetime of a new root.
    pub root_lifetime_secs: i64,
    /// An agent not heard from for longer than this does not block activation.
    pub stale_after_secs: i64,
    /// Time between two rounds (the CA's `--bundle-poll-interval`).
    pub interval: Duration,
    /// The lease only one replica holds.
    pub leadership: Arc<dyn Leadership>,
}

/// How long a lease taken at one round lasts: three rounds, so a holder that misses one
/// round keeps it, and a dead holder's lease is taken over within a few rounds.
pub fn lease_secs(interval: Duration) -> i64 {
    i64::try_from(interval.as_secs().saturating_mul(3))
        .unwrap_or(i64::MAX)
        .max(3)
}

/// A random lease holder ID for this process.
pub fn new_holder_id() -> String {
    let tag = crate::authority::random_serial()
        .map(|s| hex::encode(&s[..8]))
        .unwrap_or_else(|_| format!("{}", unix_now()));
    format!("citadel-{}-{tag}", std::process::id())
}

impl RenewalDriver {
    /// Runs rounds until `shutdown`, then gives the lease up so another replica can take
    /// over at once.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            if let Err(e) = self.round().await {
                tracing::warn!(error = %format!("{e:#}"), "root renewal round failed; retrying at the next one");
            }
        }
        self.leadership.step_down().await;
    }

    /// One round: take or renew the lease, then at most one step. `Ok(None)` when another
    /// replica holds the lease, or when renewal is off and the CA directory asks for nothing.
    pub async fn round(&mut self) -> anyhow::Result<Option<RenewalPlan>> {
        let now = unix_now();
        let held = self.leadership.lead(now).await?;
        if !held {
            return Ok(None);
        }
        if let Some(watch) = self.ca_dir.as_mut() {
            // A failure here (unreadable directory, store error) must not stop renewal.
            if let Err(e) = watch
                .poll(
                    self.store.as_ref(),
                    self.keys.as_ref(),
                    &self.trust_domain,
                    now,
                )
                .await
            {
                tracing::warn!(error = %format!("{e:#}"), "CA directory round failed; retrying at the next one");
            }
        }
        let candidate = self.ca_dir.as_ref().and_then(|w| w.authority());
        if candidate.is_none() && self.policy.is_none() {
            // Nothing to decide: skip reading the store (its live leaves walk the ledger).
            return Ok(None);
        }
        let state = StoreState::read(self.store.as_ref(), now).await?;
        let input = state.input(self.stale_after_secs);
        let plugin = candidate.and_then(|id| plugin_activation(&input, id));
        let decided = match (plugin, &self.policy) {
            (Some(step), _) => RenewalPlan::Step(step),
            (None, Some(policy)) => plan_renewal(&input, policy),
            (None, None) => return Ok(None),
        };
        match &decided {
            RenewalPlan::Step(Plan::Next(step)) => {
                let taken = take_step(
                    self.store.as_ref(),
                    self.keys.as_ref(),
                    &self.trust_domain,
                    &state,
                    step,
                    self.root_lifetime_secs,
                )
                .await?;
                match taken {
                    StepTaken::Prepared(id) => {
                        tracing::info!(authority = %id, "root renewal: prepared a new root; it is activated once every live agent's proxies hold it")
                    }
                    StepTaken::Activated { id, retired } => {
                        tracing::info!(authority = %id, retired = ?retired, "activated the new authority once every live agent held its root; the previous one is retired")
                    }
                    StepTaken::Removed(id) => {
                        tracing::info!(authority = %id, "root renewal: removed the old root from the trust bundle")
                    }
                }
            }
            RenewalPlan::Step(Plan::Wait(blocker)) => {
                tracing::debug!(blocker = %describe_blocker(blocker), "root renewal or CA directory waiting");
            }
            RenewalPlan::Idle(Idle::PlugIn { authority, due_at }) => {
                tracing::debug!(%authority, due_at, "the active authority is an operator's CA: not renewed automatically");
            }
            RenewalPlan::Idle(Idle::NotDue { .. }) => {}
        }
        Ok(Some(decided))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authorities::{record_of, save_key};
    use crate::authority::Authority;
    use crate::keystore::MemoryKeyStore;
    use crate::rotation::Transition;
    use citadel_store::AuthorityState;
    use citadel_store::memory::MemoryStore;

    async fn driver(store: Arc<dyn Store>, holder: &str) -> RenewalDriver {
        RenewalDriver {
            keys: Arc::new(MemoryKeyStore::default()),
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            policy: Some(RenewalPolicy::new(0.5).unwrap()),
            ca_dir: None,
            root_lifetime_secs: 3_600,
            stale_after_secs: 60,
            interval: Duration::from_secs(1),
            leadership: Arc::new(crate::leadership::StoreLease::new(
                store.clone(),
                RENEWAL_LEASE,
                holder.into(),
                lease_secs(Duration::from_secs(1)),
            )),
            store,
        }
    }

    #[tokio::test]
    async fn only_the_lease_holder_renews_a_due_root() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let td = TrustDomain::new("cluster.local").unwrap();
        // A root that began long ago and ends soon: due.
        let now = unix_now();
        let (root, key) = Authority::create_root(&td, now - 1_000, 1_010).unwrap();
        let mut a = driver(store.clone(), "a").await;
        let key_ref = save_key(a.keys.as_ref(), &root, &key).await.unwrap();
        store
            .insert_authority(&record_of(
                &root,
                AuthorityState::Active,
                &key_ref,
                now - 1_000,
            ))
            .await
            .unwrap();
        let mut b = driver(store.clone(), "b").await;
        assert_eq!(
            a.round().await.unwrap(),
            Some(RenewalPlan::Step(Plan::Next(Transition::Prepare)))
        );
        assert_eq!(b.round().await.unwrap(), None, "b acted without the lease");
        let prepared: Vec<_> = store
            .list_authorities()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.state == AuthorityState::Prepared)
            .collect();
        assert_eq!(prepared.len(), 1, "exactly one new root");
        // No agents: the next round activates it (same gated step as `root rotate`).
        assert!(matches!(
            a.round().await.unwrap(),
            Some(RenewalPlan::Step(Plan::Next(Transition::Activate(_))))
        ));
    }
}
