//! The SQL side of ledger checkpoints (one statement set for SQLite and PostgreSQL).

use sqlx::Row;

use crate::checkpoint::{CheckpointStore, LedgerCheckpoint};
use crate::error::{StoreError, from_sqlx};
use crate::sql::{SqlStore, column, decode_hash};

#[async_trait::async_trait]
impl CheckpointStore for SqlStore {
    async fn insert_checkpoint(&self, checkpoint: &LedgerCheckpoint) -> Result<bool, StoreError> {
        // Replicas racing to checkpoint the same head: the first row stays, the rest are no-ops.
        let affected = sqlx::query(
            "INSERT INTO ledger_checkpoints (seq, head_hash, signed_at, key_id, signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
        )
        .bind(checkpoint.seq)
        .bind(hex::encode(checkpoint.head_hash))
        .bind(checkpoint.signed_at)
        .bind(hex::encode(checkpoint.key_id))
        .bind(hex::encode(&checkpoint.signature))
        .execute(&self.pool)
        .await
        .map_err(from_sqlx)?
        .rows_affected();
        Ok(affected == 1)
    }

    async fn latest_checkpoint(&self) -> Result<Option<LedgerCheckpoint>, StoreError> {
        let row = sqlx::query(
            "SELECT seq, head_hash, signed_at, key_id, signature FROM ledger_checkpoints \
             ORDER BY seq DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(from_sqlx)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let decode = || -> Result<LedgerCheckpoint, String> {
            let signature: String = column(&row, "signature")?;
            Ok(LedgerCheckpoint {
                seq: column(&row, "seq")?,
                head_hash: decode_hash(&column::<String>(&row, "head_hash")?, "head_hash")?,
                signed_at: column(&row, "signed_at")?,
                key_id: decode_hash(&column::<String>(&row, "key_id")?, "key_id")?,
                signature: hex::decode(signature).map_err(|e| format!("signature: {e}"))?,
            })
        };
        decode()
            .map(Some)
            .map_err(|reason| StoreError::Corrupt(format!("ledger checkpoint: {reason}")))
    }

    async fn ledger_head(&self) -> Result<(i64, [u8; 32]), StoreError> {
        let row = sqlx::query("SELECT last_seq, last_hash FROM ledger_head WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(from_sqlx)?
            .ok_or_else(|| StoreError::Corrupt("the ledger head row is missing".into()))?;
        let seq: i64 = row.try_get("last_seq").map_err(from_sqlx)?;
        let hash: String = row.try_get("last_hash").map_err(from_sqlx)?;
        let hash = decode_hash(&hash, "ledger head hash").map_err(StoreError::Corrupt)?;
        Ok((seq, hash))
    }

    async fn ledger_row_hash(&self, seq: i64) -> Result<Option<[u8; 32]>, StoreError> {
        let row = sqlx::query("SELECT row_hash FROM issuances WHERE seq = $1")
            .bind(seq)
            .fetch_optional(&self.pool)
            .await
            .map_err(from_sqlx)?;
        match row {
            None => Ok(None),
            Some(row) => {
                let hash: String = row.try_get("row_hash").map_err(from_sqlx)?;
                decode_hash(&hash, "row_hash")
                    .map(Some)
                    .map_err(StoreError::Corrupt)
            }
        }
    }
}
