//! The `Store` trait: the one seam between the CA and its durable state.

use crate::error::StoreError;
use crate::model::{
    AuthorityRecord, AuthorityState, LedgerEntry, LedgerFilter, LedgerVerification, NewIssuance,
};

/// The CA's durable state: signing authorities and the issuance ledger.
///
/// Implemented by the SQL backends behind [`crate::connect`] and by
/// [`crate::memory::MemoryStore`]; all pass the same conformance suite.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Every authority, ordered by `created_at`, then `id`.
    async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError>;

    /// Adds an authority. [`StoreError::Conflict`] if the id exists, or if `rec.state` is
    /// active while another authority is active.
    async fn insert_authority(&self, rec: &AuthorityRecord) -> Result<(), StoreError>;

    /// Moves authority `id` to `state`; [`StoreError::NotFound`] if there is no such
    /// authority. Activating one retires the previously active one in the same transaction,
    /// so there is never more than one active authority.
    async fn set_authority_state(&self, id: &str, state: AuthorityState) -> Result<(), StoreError>;

    /// Appends `batch` to the ledger in one transaction, all or nothing, each row chained to
    /// the one before. Returns the committed entries in the order of `batch`.
    async fn append_issuances(&self, batch: &[NewIssuance])
    -> Result<Vec<LedgerEntry>, StoreError>;

    /// The ledger rows matching `filter`, in seq order.
    async fn list_issuances(&self, filter: &LedgerFilter) -> Result<Vec<LedgerEntry>, StoreError>;

    /// Walks the whole ledger in seq order and checks seq continuity from 1, every row hash,
    /// every link and the head. Tampering is reported in the result, not as an error.
    async fn verify_ledger(&self) -> Result<LedgerVerification, StoreError>;

    /// For each authority with live certificates (`not_after > now`), how many; ordered by
    /// authority id.
    async fn live_counts_by_authority(&self, now: i64) -> Result<Vec<(String, u64)>, StoreError>;
}
