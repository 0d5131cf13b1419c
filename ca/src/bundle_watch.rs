//! The trust bundle as the CA publishes it: the roots, the store's bundle sequence they are
//! at least as new as, and the authority this replica signs with. The task that keeps it up
//! to date is [`crate::authority_manager::StoreFollower`].

use citadel_identity::{TrustBundle, TrustDomain};
use citadel_proto::citadel::v1::TrustBundleUpdate;
use citadel_store::{AuthorityRecord, AuthorityState, AuthorityStore};

use crate::authorities::bundle_of;

/// The trust bundle together with the store's bundle sequence it is at least as new as.
#[derive(Debug, Clone)]
pub struct BundleSnapshot {
    /// The bundle sequence read before the bundle.
    pub sequence: u64,
    /// The roots of every prepared, active or retired authority.
    pub bundle: TrustBundle,
    /// The authority this replica signs with (empty: none).
    pub active_authority_id: String,
}

impl BundleSnapshot {
    /// The wire form sent to node agents.
    pub fn to_update(&self) -> TrustBundleUpdate {
        TrustBundleUpdate {
            sequence: self.sequence,
            trust_domain: self.bundle.trust_domain().to_string(),
            x509_authorities: self.bundle.roots().iter().map(|r| r.to_vec()).collect(),
            active_authority_id: self.active_authority_id.clone(),
        }
    }
}

/// The bundle sequence and every authority record, read in this order: the records are
/// never older than the sequence they are published with, so a change racing with the read
/// shows up as a newer sequence at the next poll, never as an acknowledged sequence whose
/// roots were missed.
pub async fn read_authorities(
    store: &dyn AuthorityStore,
) -> anyhow::Result<(u64, Vec<AuthorityRecord>)> {
    let sequence = store.bundle_sequence().await?;
    let records = store.list_authorities().await?;
    Ok((sequence, records))
}

/// The snapshot of the store as it is, naming the store's active authority.
pub async fn load_snapshot(
    store: &dyn AuthorityStore,
    td: &TrustDomain,
) -> anyhow::Result<BundleSnapshot> {
    let (sequence, records) = read_authorities(store).await?;
    let bundle = bundle_of(&records, td)?;
    let active_authority_id = records
        .iter()
        .find(|r| r.state == AuthorityState::Active)
        .map(|r| r.id.clone())
        .unwrap_or_default();
    Ok(BundleSnapshot {
        sequence,
        bundle,
        active_authority_id,
    })
}
