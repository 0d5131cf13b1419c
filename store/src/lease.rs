//! Leases: one holder at a time for a named singleton task (the automatic root renewal), so
//! that of several CA replicas sharing a store exactly one runs it. A lease lapses at its
//! `expires_at`; its holder renews it well before, and a replica that died leaves it to be
//! taken over once it lapsed.

use crate::error::StoreError;

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease's name (one per singleton task).
    pub name: String,
    /// Who holds it (a replica's random instance ID).
    pub holder: String,
    /// It lapses at this instant, unix seconds.
    pub expires_at: i64,
}

impl Lease {
    /// Whether `holder` may take or renew this lease at `now` (pure): its own lease always,
    /// anyone else's once it has lapsed.
    pub fn takeable_by(&self, holder: &str, now: i64) -> bool {
        self.holder == holder || self.expires_at <= now
    }
}

/// The store seam of leases.
#[async_trait::async_trait]
pub trait LeaseStore: Send + Sync {
    /// Takes or renews lease `name` for `holder` until `expires_at`, if it is free, lapsed
    /// (`expires_at <= now` as stored) or already `holder`'s; one conditional write, so of
    /// concurrent takers at most one succeeds. `Ok(true)` when `holder` holds it afterwards.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool, StoreError>;

    /// Gives lease `name` up if `holder` holds it; `Ok(false)` when it did not.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StoreError>;

    /// Lease `name` as stored (lapsed or not), or `None`.
    async fn get_lease(&self, name: &str) -> Result<Option<Lease>, StoreError>;
}
