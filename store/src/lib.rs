//! Citadel's durable state: the signing authorities (certificates and state; keys only sealed),
//! the append-only, hash-chained issuance ledger, and what node agents leave behind: one-time
//! join tokens (hashed), joined nodes with the serials of their node certificates (see
//! [`NodeRecord`]), the trust-bundle sequence and bundle acknowledgements, and the policy-set version each agent
//! acknowledged.
//!
//! Sealed authority keys (wrapped by the CA, opaque here) sit behind the narrow
//! [`KeyBlobStore`] seam ([`connect_key_blobs`]).
//!
//! [`connect`] opens SQLite (`sqlite://PATH`, the default) or PostgreSQL (`postgres://…`, for
//! several replicas) behind the [`Store`] trait, applying the embedded migrations.
//! [`GroupCommitLedger`] batches concurrent issuances into few transactions;
//! [`memory::MemoryStore`] is an in-memory store for tests of code built on [`Store`].
//!
//! # The ledger chain
//! Row `seq` (from 1, no gaps) stores `prev_hash` (the previous row's hash, or
//! [`GENESIS_HASH`]) and `row_hash = `[`row_hash`]`(seq, prev_hash, issuance)`. A one-row head
//! records the last seq and hash; every append locks it first, so appends from several
//! processes sharing one database still form one chain. [`LedgerStore::verify_ledger`] recomputes
//! the chain and compares the head, detecting edited, deleted and truncated rows. A rewrite of
//! every row *and* the head is consistent again; the CA's signed checkpoints
//! ([`CheckpointStore`]) are what expose it.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod agents;
mod chain;
mod checkpoint;
mod error;
mod group_commit;
mod key_blobs;
mod lease;
pub mod memory;
mod model;
mod nodes;
mod sql;
mod sql_agents;
mod sql_authorities;
mod sql_checkpoint;
mod sql_lease;
mod sql_ledger;
mod sql_nodes;
mod store;

pub use agents::{
    BundleAck, JoinTokenRecord, JoinTokenRefusal, MAX_POLICY_VERSION_LEN, PolicyAck,
    check_policy_version,
};
pub use chain::{GENESIS_HASH, row_hash};
pub use checkpoint::{CheckpointStore, LedgerCheckpoint};
pub use error::StoreError;
pub use group_commit::GroupCommitLedger;
pub use key_blobs::{KeyBlobStore, MemoryKeyBlobs};
pub use lease::{Lease, LeaseStore};
pub use model::{
    AuthorityRecord, AuthorityState, LedgerEntry, LedgerFault, LedgerFilter, LedgerVerification,
    NewIssuance, ParseAuthorityStateError,
};
pub use nodes::{
    LAST_SEEN_GRANULARITY_SECS, NodeCertificateRole, NodeCertificateUse, NodeGrant,
    NodeIssuanceOutcome, NodeRecord, NodeRefusal,
};
pub use sql::{connect, connect_key_blobs};
pub use store::{AckStore, AuthorityStore, HealthStore, LedgerStore, NodeStore, Store};
