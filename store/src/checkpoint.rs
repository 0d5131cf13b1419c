//! Signed ledger checkpoints: what the CA vouched for, kept beside the ledger.
//!
//! A checkpoint records a ledger head (`seq`, the `row_hash` of row `seq`) and when it was
//! signed, with the signature of the CA's ledger key (the key and the signature are the CA's
//! business: here they are opaque bytes). Because the key never lives in the database in the
//! clear, someone who rewrites every row *and* the head cannot produce a checkpoint for the new
//! chain; the old checkpoints still name the old hashes, so `citadel ledger verify` sees the
//! rewrite.

use crate::error::StoreError;

/// One signed checkpoint of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerCheckpoint {
    /// The ledger sequence it vouches for (the head's `last_seq` when it was signed).
    pub seq: i64,
    /// The `row_hash` of row `seq`.
    pub head_hash: [u8; 32],
    /// When it was signed, unix seconds.
    pub signed_at: i64,
    /// Which key signed it (the CA defines it; SHA-256 of the public key).
    pub key_id: [u8; 32],
    /// The signature (the CA defines its encoding).
    pub signature: Vec<u8>,
}

/// Where checkpoints live, and the two ledger facts they are compared with.
///
/// Several replicas may checkpoint concurrently: a checkpoint for a seq that already has one is
/// dropped (the first one stays), and checkpoints of different seqs are all valid, so racing
/// writers are harmless and no lease is needed.
#[async_trait::async_trait]
pub trait CheckpointStore: Send + Sync {
    /// Stores `checkpoint`. Returns `false` (and changes nothing) when a checkpoint for the same
    /// `seq` is already stored.
    async fn insert_checkpoint(&self, checkpoint: &LedgerCheckpoint) -> Result<bool, StoreError>;

    /// The checkpoint with the highest `seq`, if any.
    async fn latest_checkpoint(&self) -> Result<Option<LedgerCheckpoint>, StoreError>;

    /// The ledger head as recorded: `(last_seq, last_hash)`; `(0, GENESIS_HASH)` when empty.
    async fn ledger_head(&self) -> Result<(i64, [u8; 32]), StoreError>;

    /// The stored `row_hash` of ledger row `seq`, or `None` when there is no such row.
    async fn ledger_row_hash(&self, seq: i64) -> Result<Option<[u8; 32]>, StoreError>;
}
