//! The SQL side of joined nodes: node issuances (join and renewal, each in one transaction
//! with its ledger row), certificate use, eviction and listing. One implementation for
//! SQLite and PostgreSQL, like the rest of [`crate::sql`].

use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use crate::agents::{JoinTokenRecord, JoinTokenRefusal, decode_ids, encode_ids};
use crate::error::{StoreError, from_sqlx};
use crate::model::NewIssuance;
use crate::nodes::{
    NodeCertificateRole, NodeCertificateUse, NodeGrant, NodeIssuanceOutcome, NodeRecord,
    NodeRefusal,
};
use crate::sql::{SqlStore, column};
use crate::sql_agents::select_token;
use crate::sql_ledger::append_chained;
use crate::store::NodeStore;

const NODE_COLUMNS: &str = "name, allowed_ids, joined_at, current_serial, current_not_after, \
     pending_serial, pending_not_after, last_seen, evicted_at";

fn decode_node(row: &AnyRow) -> Result<NodeRecord, StoreError> {
    let read = || -> Result<NodeRecord, String> {
        Ok(NodeRecord {
            name: column(row, "name")?,
            allowed_ids: decode_ids(&column::<String>(row, "allowed_ids")?, "allowed_ids")?,
            joined_at: column(row, "joined_at")?,
            current_serial: column(row, "current_serial")?,
            current_not_after: column(row, "current_not_after")?,
            pending_serial: column(row, "pending_serial")?,
            pending_not_after: column(row, "pending_not_after")?,
            last_seen: column(row, "last_seen")?,
            evicted_at: column(row, "evicted_at")?,
        })
    };
    read().map_err(|reason| StoreError::Corrupt(format!("node row: {reason}")))
}

/// Node `name`, locked for the rest of the caller's write transaction.
async fn select_node_for_update(
    conn: &mut AnyConnection,
    name: &str,
    lock: &str,
) -> Result<Option<NodeRecord>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {NODE_COLUMNS} FROM nodes WHERE name = $1{lock}"
    ))
    .bind(name)
    .fetch_optional(conn)
    .await
    .map_err(from_sqlx)?;
    row.as_ref().map(decode_node).transpose()
}

/// Why a join token was not claimed: unknown, used or expired; not claimed although neither
/// means a concurrent consumer won, which counts as used.
fn unclaimed_token_refusal(
    found: Option<crate::agents::JoinTokenRecord>,
    node_name: &str,
    now: i64,
) -> Result<JoinTokenRefusal, StoreError> {
    match found {
        None => Ok(JoinTokenRefusal::Unknown),
        Some(rec) if rec.node_name != node_name => Err(StoreError::Conflict(format!(
            "the join token admits node {}, not node {node_name}",
            rec.node_name
        ))),
        Some(rec) => Ok(rec.refusal_at(now).unwrap_or(JoinTokenRefusal::AlreadyUsed)),
    }
}

impl SqlStore {
    pub(crate) async fn sql_append_node_issuance(
        &self,
        node_name: &str,
        grant: &NodeGrant,
        issuance: &NewIssuance,
        now: i64,
    ) -> Result<NodeIssuanceOutcome, StoreError> {
        let mut tx = self
            .pool
            .begin_with(self.dialect.begin_write())
            .await
            .map_err(from_sqlx)?;
        // Token or node row first, ledger head last (append_chained): every writer takes its
        // locks in this order, so none waits for another in a cycle.
        match grant {
            NodeGrant::Join { token_sha256 } => {
                let hash_hex = hex::encode(token_sha256);
                // The conditional UPDATE is the decision: of concurrent consumers, PostgreSQL
                // lets one update the row and re-checks `used_at IS NULL` for the others once
                // it commits (or rolls back, leaving the token usable); SQLite's write lock
                // (BEGIN IMMEDIATE) serialises them outright.
                let claimed = sqlx::query(
                    "UPDATE join_tokens SET used_at = $1 \
                     WHERE token_sha256 = $2 AND used_at IS NULL AND expires_at > $3 \
                     AND node_name = $4",
                )
                .bind(now)
                .bind(hash_hex.as_str())
                .bind(now)
                .bind(node_name)
                .execute(&mut *tx)
                .await
                .map_err(from_sqlx)?
                .rows_affected();
                let found = select_token(&mut tx, &hash_hex).await?;
                let rec = match (claimed, found) {
                    (1, Some(rec)) => rec,
                    (_, found) => {
                        tx.rollback().await.map_err(from_sqlx)?;
                        let refusal = unclaimed_token_refusal(found, node_name, now)?;
                        return Ok(NodeIssuanceOutcome::TokenRefused(refusal));
                    }
                };
                sqlx::query(&format!(
                    "INSERT INTO nodes ({NODE_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, NULL, NULL, $6, NULL) \
                     ON CONFLICT (name) DO UPDATE SET \
                     allowed_ids = excluded.allowed_ids, joined_at = excluded.joined_at, \
                     current_serial = excluded.current_serial, \
                     current_not_after = excluded.current_not_after, \
                     pending_serial = NULL, pending_not_after = NULL, \
                     last_seen = excluded.last_seen, evicted_at = NULL"
                ))
                .bind(node_name)
                .bind(encode_ids(&rec.allowed_ids))
                .bind(now)
                .bind(issuance.serial_hex.as_str())
                .bind(issuance.not_after)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(from_sqlx)?;
            }
            NodeGrant::Renewal { presented_serial } => {
                let node =
                    select_node_for_update(&mut tx, node_name, self.dialect.lock_rows()).await?;
                let refusal = match &node {
                    None => Some(NodeRefusal::Unknown),
                    Some(node) => match node.judge_certificate(presented_serial) {
                        Ok(NodeCertificateRole::Current) => None,
                        // The use that authenticated the renewal promotes a pending
                        // certificate first; one still pending here was superseded meanwhile.
                        Ok(NodeCertificateRole::Pending) => Some(NodeRefusal::Superseded),
                        Err(refusal) => Some(refusal),
                    },
                };
                if let Some(refusal) = refusal {
                    tx.rollback().await.map_err(from_sqlx)?;
                    return Ok(NodeIssuanceOutcome::NodeRefused(refusal));
                }
                sqlx::query(
                    "UPDATE nodes SET pending_serial = $1, pending_not_after = $2, last_seen = $3 \
                     WHERE name = $4",
                )
                .bind(issuance.serial_hex.as_str())
                .bind(issuance.not_after)
                .bind(now)
                .bind(node_name)
                .execute(&mut *tx)
                .await
                .map_err(from_sqlx)?;
            }
        }
        let entry = append_chained(&mut tx, self.dialect, std::slice::from_ref(issuance))
            .await?
            .pop()
            .ok_or_else(|| StoreError::Corrupt("the ledger append returned no entry".into()))?;
        tx.commit().await.map_err(from_sqlx)?;
        Ok(NodeIssuanceOutcome::Recorded(Box::new(entry)))
    }

    pub(crate) async fn sql_use_node_certificate(
        &self,
        node_name: &str,
        serial_hex: &str,
        now: i64,
    ) -> Result<NodeCertificateUse, StoreError> {
        // Most uses change nothing worth writing: judge on a plain read first, and take the
        // write lock only for a refusal-free use that promotes or refreshes `last_seen`.
        let mut conn = self.pool.acquire().await.map_err(from_sqlx)?;
        let seen = select_node_for_update(&mut conn, node_name, "").await?;
        drop(conn);
        match seen.as_ref().map(|n| (n, n.judge_certificate(serial_hex))) {
            None => return Ok(NodeCertificateUse::Refused(NodeRefusal::Unknown)),
            Some((_, Err(refusal))) => return Ok(NodeCertificateUse::Refused(refusal)),
            Some((node, Ok(role))) if !node.use_needs_write(role, now) => {
                return Ok(NodeCertificateUse::Accepted(role));
            }
            Some(_) => {}
        }
        let mut tx = self
            .pool
            .begin_with(self.dialect.begin_write())
            .await
            .map_err(from_sqlx)?;
        let Some(node) =
            select_node_for_update(&mut tx, node_name, self.dialect.lock_rows()).await?
        else {
            tx.rollback().await.map_err(from_sqlx)?;
            return Ok(NodeCertificateUse::Refused(NodeRefusal::Unknown));
        };
        let role = match node.judge_certificate(serial_hex) {
            Ok(role) => role,
            Err(refusal) => {
                tx.rollback().await.map_err(from_sqlx)?;
                return Ok(NodeCertificateUse::Refused(refusal));
            }
        };
        let next = node.after_use(role, now);
        sqlx::query(
            "UPDATE nodes SET current_serial = $1, current_not_after = $2, pending_serial = $3, \
             pending_not_after = $4, last_seen = $5 WHERE name = $6",
        )
        .bind(next.current_serial)
        .bind(next.current_not_after)
        .bind(next.pending_serial)
        .bind(next.pending_not_after)
        .bind(next.last_seen)
        .bind(node_name)
        .execute(&mut *tx)
        .await
        .map_err(from_sqlx)?;
        tx.commit().await.map_err(from_sqlx)?;
        Ok(NodeCertificateUse::Accepted(role))
    }

    pub(crate) async fn sql_evict_node(
        &self,
        node_name: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self
            .pool
            .begin_with(self.dialect.begin_write())
            .await
            .map_err(from_sqlx)?;
        let evicted =
            sqlx::query("UPDATE nodes SET evicted_at = $1 WHERE name = $2 AND evicted_at IS NULL")
                .bind(now)
                .bind(node_name)
                .execute(&mut *tx)
                .await
                .map_err(from_sqlx)?
                .rows_affected();
        if evicted == 0 {
            let exists = sqlx::query("SELECT name FROM nodes WHERE name = $1")
                .bind(node_name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(from_sqlx)?
                .is_some();
            tx.rollback().await.map_err(from_sqlx)?;
            return if exists {
                Ok(false)
            } else {
                Err(StoreError::NotFound(format!("node {node_name}")))
            };
        }
        tx.commit().await.map_err(from_sqlx)?;
        Ok(true)
    }

    pub(crate) async fn sql_list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {NODE_COLUMNS} FROM nodes"))
            .fetch_all(&self.pool)
            .await
            .map_err(from_sqlx)?;
        let mut out = rows
            .iter()
            .map(decode_node)
            .collect::<Result<Vec<_>, _>>()?;
        // Sorted here rather than in SQL so both backends agree on string order.
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

#[async_trait::async_trait]
impl NodeStore for SqlStore {
    async fn insert_join_token(&self, rec: &JoinTokenRecord) -> Result<(), StoreError> {
        self.sql_insert_join_token(rec).await
    }

    async fn find_join_token(
        &self,
        token_sha256: &[u8; 32],
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        self.sql_find_join_token(token_sha256).await
    }

    async fn append_node_issuance(
        &self,
        node_name: &str,
        grant: &NodeGrant,
        issuance: &NewIssuance,
        now: i64,
    ) -> Result<NodeIssuanceOutcome, StoreError> {
        self.sql_append_node_issuance(node_name, grant, issuance, now)
            .await
    }

    async fn use_node_certificate(
        &self,
        node_name: &str,
        serial_hex: &str,
        now: i64,
    ) -> Result<NodeCertificateUse, StoreError> {
        self.sql_use_node_certificate(node_name, serial_hex, now)
            .await
    }

    async fn evict_node(&self, node_name: &str, now: i64) -> Result<bool, StoreError> {
        self.sql_evict_node(node_name, now).await
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.sql_list_nodes().await
    }

    async fn node_allowed_ids(&self, node_name: &str) -> Result<Option<Vec<String>>, StoreError> {
        self.sql_node_allowed_ids(node_name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::JoinTokenRecord;

    fn token(node: &str, used_at: Option<i64>) -> JoinTokenRecord {
        JoinTokenRecord {
            token_sha256: [1; 32],
            node_name: node.into(),
            allowed_ids: vec![],
            created_at: 0,
            expires_at: 100,
            used_at,
        }
    }

    #[test]
    fn an_unclaimed_token_is_explained() {
        assert_eq!(
            unclaimed_token_refusal(None, "a", 50),
            Ok(JoinTokenRefusal::Unknown)
        );
        assert_eq!(
            unclaimed_token_refusal(Some(token("a", Some(10))), "a", 50),
            Ok(JoinTokenRefusal::AlreadyUsed)
        );
        assert_eq!(
            unclaimed_token_refusal(Some(token("a", None)), "a", 100),
            Ok(JoinTokenRefusal::Expired)
        );
        // Neither used nor expired, yet not claimed: a concurrent consumer won.
        assert_eq!(
            unclaimed_token_refusal(Some(token("a", None)), "a", 50),
            Ok(JoinTokenRefusal::AlreadyUsed)
        );
        assert!(matches!(
            unclaimed_token_refusal(Some(token("b", None)), "a", 50),
            Err(StoreError::Conflict(_))
        ));
    }
}
