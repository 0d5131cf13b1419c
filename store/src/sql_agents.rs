//! The SQL side of join tokens, node allow lists, the bundle sequence and bundle acknowledgements (one
//! implementation for SQLite and PostgreSQL, like the rest of [`crate::sql`]).

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::agents::{
    BundleAck, JoinTokenRecord, PolicyAck, check_policy_version, decode_ids, encode_ids,
};
use crate::error::{StoreError, from_sqlx};
use crate::sql::SqlStore;
use crate::store::AckStore;

const TOKEN_COLUMNS: &str = "token_sha256, node_name, allowed_ids, created_at, expires_at, used_at";

/// Adds one to the bundle sequence, inside the caller's transaction.
pub(crate) async fn bump_bundle_sequence(conn: &mut AnyConnection) -> Result<(), StoreError> {
    let bumped = sqlx::query("UPDATE bundle_state SET sequence = sequence + 1 WHERE id = 1")
        .execute(conn)
        .await
        .map_err(from_sqlx)?
        .rows_affected();
    if bumped != 1 {
        return Err(StoreError::Corrupt(
            "the bundle sequence row is missing".into(),
        ));
    }
    Ok(())
}

fn column<'r, T>(row: &'r AnyRow, name: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(name)
        .map_err(|e| format!("column {name} cannot be read: {e}"))
}

fn decode_token(row: &AnyRow) -> Result<JoinTokenRecord, StoreError> {
    let read = || -> Result<JoinTokenRecord, String> {
        let hash: String = column(row, "token_sha256")?;
        let mut token_sha256 = [0u8; 32];
        hex::decode_to_slice(&hash, &mut token_sha256)
            .map_err(|_| "token_sha256 is not 64 hexadecimal characters".to_string())?;
        Ok(JoinTokenRecord {
            token_sha256,
            node_name: column(row, "node_name")?,
            allowed_ids: decode_ids(&column::<String>(row, "allowed_ids")?, "allowed_ids")?,
            created_at: column(row, "created_at")?,
            expires_at: column(row, "expires_at")?,
            used_at: column(row, "used_at")?,
        })
    };
    read().map_err(|reason| StoreError::Corrupt(format!("join token row: {reason}")))
}

fn sequence_of(stored: i64) -> Result<u64, StoreError> {
    u64::try_from(stored).map_err(|_| StoreError::Corrupt("negative bundle sequence".into()))
}

pub(crate) async fn select_token(
    conn: &mut AnyConnection,
    hash_hex: &str,
) -> Result<Option<JoinTokenRecord>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE token_sha256 = $1"
    ))
    .bind(hash_hex)
    .fetch_optional(conn)
    .await
    .map_err(from_sqlx)?;
    row.as_ref().map(decode_token).transpose()
}

impl SqlStore {
    pub(crate) async fn sql_bundle_sequence(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT sequence FROM bundle_state WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(from_sqlx)?
            .ok_or_else(|| StoreError::Corrupt("the bundle sequence row is missing".into()))?;
        sequence_of(row.try_get("sequence").map_err(from_sqlx)?)
    }

    pub(crate) async fn sql_insert_join_token(
        &self,
        rec: &JoinTokenRecord,
    ) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO join_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
        ))
        .bind(hex::encode(rec.token_sha256))
        .bind(rec.node_name.as_str())
        .bind(encode_ids(&rec.allowed_ids))
        .bind(rec.created_at)
        .bind(rec.expires_at)
        .bind(rec.used_at)
        .execute(&self.pool)
        .await
        .map_err(|e| match from_sqlx(e) {
            StoreError::Conflict(_) => {
                StoreError::Conflict("a join token with the same hash exists".into())
            }
            other => other,
        })?;
        Ok(())
    }

    pub(crate) async fn sql_find_join_token(
        &self,
        token_sha256: &[u8; 32],
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(from_sqlx)?;
        select_token(&mut conn, &hex::encode(token_sha256)).await
    }

    pub(crate) async fn sql_node_allowed_ids(
        &self,
        node_name: &str,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let row = sqlx::query("SELECT allowed_ids FROM nodes WHERE name = $1")
            .bind(node_name)
            .fetch_optional(&self.pool)
            .await
            .map_err(from_sqlx)?;
        row.map(|row| {
            let text: String = row.try_get("allowed_ids").map_err(from_sqlx)?;
            decode_ids(&text, "allowed_ids")
                .map_err(|reason| StoreError::Corrupt(format!("node row: {reason}")))
        })
        .transpose()
    }

    pub(crate) async fn sql_record_bundle_ack(
        &self,
        agent_id: &str,
        sequence: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        let sequence = i64::try_from(sequence).map_err(|_| {
            StoreError::Conflict(format!("bundle sequence {sequence} is out of range"))
        })?;
        // CASE rather than MAX()/GREATEST(): the one spelling both dialects share.
        sqlx::query(
            "INSERT INTO bundle_acks (agent_id, sequence, acked_at) VALUES ($1, $2, $3) \
             ON CONFLICT (agent_id) DO UPDATE SET \
             sequence = CASE WHEN excluded.sequence > bundle_acks.sequence \
                        THEN excluded.sequence ELSE bundle_acks.sequence END, \
             acked_at = excluded.acked_at",
        )
        .bind(agent_id)
        .bind(sequence)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(from_sqlx)?;
        Ok(())
    }

    pub(crate) async fn sql_list_bundle_acks(&self) -> Result<Vec<BundleAck>, StoreError> {
        let rows = sqlx::query("SELECT agent_id, sequence, acked_at FROM bundle_acks")
            .fetch_all(&self.pool)
            .await
            .map_err(from_sqlx)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(BundleAck {
                agent_id: row.try_get("agent_id").map_err(from_sqlx)?,
                sequence: sequence_of(row.try_get("sequence").map_err(from_sqlx)?)?,
                acked_at: row.try_get("acked_at").map_err(from_sqlx)?,
            });
        }
        // Sorted here rather than in SQL so both backends agree on string order.
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        Ok(out)
    }

    pub(crate) async fn sql_record_policy_ack(
        &self,
        agent_id: &str,
        version: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        check_policy_version(version).map_err(StoreError::Conflict)?;
        sqlx::query(
            "INSERT INTO policy_acks (agent_id, version, acked_at) VALUES ($1, $2, $3) \
             ON CONFLICT (agent_id) DO UPDATE SET \
             version = excluded.version, acked_at = excluded.acked_at",
        )
        .bind(agent_id)
        .bind(version)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(from_sqlx)?;
        Ok(())
    }

    pub(crate) async fn sql_list_policy_acks(&self) -> Result<Vec<PolicyAck>, StoreError> {
        let rows = sqlx::query("SELECT agent_id, version, acked_at FROM policy_acks")
            .fetch_all(&self.pool)
            .await
            .map_err(from_sqlx)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(PolicyAck {
                agent_id: row.try_get("agent_id").map_err(from_sqlx)?,
                version: row.try_get("version").map_err(from_sqlx)?,
                acked_at: row.try_get("acked_at").map_err(from_sqlx)?,
            });
        }
        // Sorted here rather than in SQL so both backends agree on string order.
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        Ok(out)
    }
}

#[async_trait::async_trait]
impl AckStore for SqlStore {
    async fn record_bundle_ack(
        &self,
        agent_id: &str,
        sequence: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        self.sql_record_bundle_ack(agent_id, sequence, now).await
    }

    async fn list_bundle_acks(&self) -> Result<Vec<BundleAck>, StoreError> {
        self.sql_list_bundle_acks().await
    }

    async fn record_policy_ack(
        &self,
        agent_id: &str,
        version: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.sql_record_policy_ack(agent_id, version, now).await
    }

    async fn list_policy_acks(&self) -> Result<Vec<PolicyAck>, StoreError> {
        self.sql_list_policy_acks().await
    }
}
