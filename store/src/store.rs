//! The store's seams: one narrow trait per kind of state ([`AuthorityStore`], [`LedgerStore`],
//! [`CheckpointStore`], [`NodeStore`], [`AckStore`], [`LeaseStore`], [`HealthStore`]), so each
//! component of the CA is handed only the part it uses, and [`Store`], the umbrella that the composition root
//! (`citadel serve`, the CLI) opens once and hands out as narrow seams (trait upcasting).

#[cfg(doc)]
use crate::agents::JoinTokenRefusal;
use crate::agents::{BundleAck, JoinTokenRecord, PolicyAck};
use crate::checkpoint::CheckpointStore;
use crate::error::StoreError;
use crate::lease::LeaseStore;
use crate::model::{
    AuthorityRecord, AuthorityState, LedgerEntry, LedgerFilter, LedgerVerification, NewIssuance,
};
use crate::nodes::{NodeCertificateUse, NodeGrant, NodeIssuanceOutcome, NodeRecord};

/// Whether the database answers (`/readyz`).
#[async_trait::async_trait]
pub trait HealthStore: Send + Sync {
    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The signing authorities and the trust-bundle sequence their changes bump: what the
/// authority manager follows, `citadel root` changes and the bundle streams publish.
#[async_trait::async_trait]
pub trait AuthorityStore: Send + Sync {
    /// Every authority, ordered by `created_at`, then `id`.
    async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError>;

    /// Adds an authority and bumps the bundle sequence, in one transaction.
    /// [`StoreError::Conflict`] if the id exists, or if `rec.state` is active while another
    /// authority is active.
    async fn insert_authority(&self, rec: &AuthorityRecord) -> Result<(), StoreError>;

    /// Moves authority `id` to `state`; [`StoreError::NotFound`] if there is no such
    /// authority. Activating one retires the previously active one in the same transaction,
    /// so there is never more than one active authority. When any state actually changes, the
    /// bundle sequence is bumped in the same transaction.
    async fn set_authority_state(&self, id: &str, state: AuthorityState) -> Result<(), StoreError>;

    /// The trust-bundle sequence: 0 on an empty store, increased by every change of the
    /// authority set ([`AuthorityStore::insert_authority`], [`AuthorityStore::set_authority_state`]).
    async fn bundle_sequence(&self) -> Result<u64, StoreError>;
}

/// The append-only, hash-chained issuance ledger: written by [`crate::GroupCommitLedger`],
/// read by `citadel ledger`, the rotation planner (live leaves) and `root status`.
#[async_trait::async_trait]
pub trait LedgerStore: Send + Sync {
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

/// Join tokens and joined nodes: the join-token and client-certificate authenticators, the
/// issuer's node issuances, `citadel token` and `citadel node`.
#[async_trait::async_trait]
pub trait NodeStore: Send + Sync {
    /// Stores a new join token. [`StoreError::Conflict`] if a token with the same hash exists.
    async fn insert_join_token(&self, rec: &JoinTokenRecord) -> Result<(), StoreError>;

    /// The join token with this hash, used or not; `None` if there is none. Changes nothing.
    async fn find_join_token(
        &self,
        token_sha256: &[u8; 32],
    ) -> Result<Option<JoinTokenRecord>, StoreError>;

    /// Records the issuance of a node certificate together with what it changes about the
    /// node, in one transaction with the ledger row (chained like [`LedgerStore::append_issuances`]):
    ///
    /// - [`NodeGrant::Join`]: consumes the join token (it must be unused, `expires_at > now`
    ///   and name `node_name`), records (or replaces) the node with the token's allowed IDs,
    ///   `joined_at = last_seen = now`, the issuance's serial and notAfter as current, no
    ///   pending serial and no eviction. Of concurrent joins with one token at most one is
    ///   recorded; the others get [`JoinTokenRefusal::AlreadyUsed`]. A token of another node
    ///   is a [`StoreError::Conflict`].
    /// - [`NodeGrant::Renewal`]: the node must exist, not be evicted and have the presented
    ///   serial as current; the issuance's serial and notAfter become pending.
    ///
    /// A refusal, or any error (including a failed ledger write), writes nothing: the token
    /// stays usable and the node's serials stay as they were.
    async fn append_node_issuance(
        &self,
        node_name: &str,
        grant: &NodeGrant,
        issuance: &NewIssuance,
        now: i64,
    ) -> Result<NodeIssuanceOutcome, StoreError>;

    /// Judges a use of node `node_name`'s certificate with serial `serial_hex` at `now`
    /// ([`NodeRecord::judge_certificate`]) and, if it is accepted, records it in the same
    /// transaction: `last_seen = now`, and a pending certificate becomes current (the old
    /// current one is refused from then on). A refusal changes nothing.
    async fn use_node_certificate(
        &self,
        node_name: &str,
        serial_hex: &str,
        now: i64,
    ) -> Result<NodeCertificateUse, StoreError>;

    /// Evicts node `node_name` at `now`: every certificate of it is refused until it joins
    /// again with a new token. Returns `false` when it was already evicted (the first
    /// eviction time is kept). [`StoreError::NotFound`] if no such node has joined.
    async fn evict_node(&self, node_name: &str, now: i64) -> Result<bool, StoreError>;

    /// Every joined node, ordered by name.
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;

    /// The SPIFFE IDs the agent of node `node_name` may request for its workloads; `None` when
    /// the node has never joined. (Whether its certificate is still accepted is
    /// [`NodeStore::use_node_certificate`]'s business.)
    async fn node_allowed_ids(&self, node_name: &str) -> Result<Option<Vec<String>>, StoreError>;
}

/// What agents acknowledged: trust-bundle sequences (recorded by the bundle stream, read by
/// the rotation planner) and policy-set versions (recorded by the policy stream).
#[async_trait::async_trait]
pub trait AckStore: Send + Sync {
    /// Records that agent `agent_id` acknowledged bundle `sequence` at `now`. The stored
    /// sequence only grows (an older acknowledgement keeps the higher one); `acked_at` is
    /// always set to `now`. A sequence above `i64::MAX` is a [`StoreError::Conflict`].
    async fn record_bundle_ack(
        &self,
        agent_id: &str,
        sequence: u64,
        now: i64,
    ) -> Result<(), StoreError>;

    /// Every agent's latest acknowledgement, ordered by agent id.
    async fn list_bundle_acks(&self) -> Result<Vec<BundleAck>, StoreError>;

    /// Records that agent `agent_id` acknowledged applying policy-set `version` at `now`.
    /// Versions are content hashes, not ordered: the latest acknowledgement replaces the
    /// previous one. A version that fails [`crate::check_policy_version`] is a
    /// [`StoreError::Conflict`] and writes nothing.
    async fn record_policy_ack(
        &self,
        agent_id: &str,
        version: &str,
        now: i64,
    ) -> Result<(), StoreError>;

    /// Every agent's latest policy acknowledgement, ordered by agent id.
    async fn list_policy_acks(&self) -> Result<Vec<PolicyAck>, StoreError>;
}

/// The CA's whole durable state: every seam above. Implemented by the SQL backends behind
/// [`crate::connect`] and by [`crate::memory::MemoryStore`]; all pass the same conformance
/// suite. Anything implementing every seam is a `Store` (blanket impl), so a test wrapper
/// implements the seams and nothing else.
pub trait Store:
    HealthStore
    + AuthorityStore
    + LedgerStore
    + CheckpointStore
    + NodeStore
    + AckStore
    + LeaseStore
    + Send
    + Sync
    + 'static
{
}

impl<T> Store for T where
    T: HealthStore
        + AuthorityStore
        + LedgerStore
        + CheckpointStore
        + NodeStore
        + AckStore
        + LeaseStore
        + Send
        + Sync
        + 'static
        + ?Sized
{
}
