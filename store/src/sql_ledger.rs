//! The SQL side of the issuance ledger: chained appends, filtered reads, verification and
//! live counts (one implementation for SQLite and PostgreSQL, like the rest of [`crate::sql`]).

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::chain::{ChainVerifier, chain_batch};
use crate::error::{StoreError, from_sqlx};
use crate::model::{LedgerEntry, LedgerFilter, LedgerVerification, NewIssuance};
use crate::sql::{Dialect, SqlStore, column, decode_hash};
use crate::store::LedgerStore;

/// Rows per multi-row INSERT (12 parameters each, below SQLite's historic 999 limit).
const INSERT_CHUNK: usize = 64;
/// Rows read per page while verifying the ledger.
const VERIFY_PAGE: i64 = 1_000;

const ISSUANCE_COLUMNS: &str = "seq, serial_hex, spiffe_id, authority_id, not_before, not_after, \
     requester, node, der_sha256, issued_at, prev_hash, row_hash";

fn decode_entry(row: &AnyRow) -> Result<LedgerEntry, String> {
    let issuance = NewIssuance {
        serial_hex: column(row, "serial_hex")?,
        spiffe_id: column(row, "spiffe_id")?,
        authority_id: column(row, "authority_id")?,
        not_before: column(row, "not_before")?,
        not_after: column(row, "not_after")?,
        requester: column(row, "requester")?,
        node: column(row, "node")?,
        der_sha256: decode_hash(&column::<String>(row, "der_sha256")?, "der_sha256")?,
        issued_at: column(row, "issued_at")?,
    };
    Ok(LedgerEntry {
        seq: column(row, "seq")?,
        issuance,
        prev_hash: decode_hash(&column::<String>(row, "prev_hash")?, "prev_hash")?,
        row_hash: decode_hash(&column::<String>(row, "row_hash")?, "row_hash")?,
    })
}

/// A parameter of a dynamically built query.
enum Param {
    Text(String),
    Int(i64),
}

/// The `SELECT` for `filter`, with its parameters in placeholder order.
fn issuance_query(filter: &LedgerFilter) -> (String, Vec<Param>) {
    let mut conditions = Vec::new();
    let mut params = Vec::new();
    let next = |p: Param, params: &mut Vec<Param>| {
        params.push(p);
        format!("${}", params.len())
    };
    if let Some(id) = &filter.spiffe_id {
        let p = next(Param::Text(id.clone()), &mut params);
        conditions.push(format!("spiffe_id = {p}"));
    }
    if let Some(id) = &filter.authority_id {
        let p = next(Param::Text(id.clone()), &mut params);
        conditions.push(format!("authority_id = {p}"));
    }
    if let Some(t) = filter.live_at {
        let a = next(Param::Int(t), &mut params);
        let b = next(Param::Int(t), &mut params);
        conditions.push(format!("not_before <= {a} AND not_after > {b}"));
    }
    let mut sql = format!("SELECT {ISSUANCE_COLUMNS} FROM issuances");
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conditions.join(" AND "));
    }
    sql.push_str(" ORDER BY seq");
    if let Some(limit) = filter.limit {
        let p = next(Param::Int(i64::from(limit)), &mut params);
        sql.push_str(&format!(" LIMIT {p}"));
    }
    (sql, params)
}

/// `INSERT INTO issuances … VALUES (…), (…)` for `rows` rows, in `dialect`'s placeholders.
///
/// SQLite gets anonymous `?`: for a numbered parameter, binding looks its name up, and SQLite
/// finds a parameter's name by walking the statement's list of names, so a 768-parameter
/// insert spent a visible share of the CA's time there. PostgreSQL only knows `$n`.
fn insert_sql(rows: usize, dialect: Dialect) -> String {
    let mut sql = format!("INSERT INTO issuances ({ISSUANCE_COLUMNS}) VALUES ");
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..12 {
            if c > 0 {
                sql.push_str(", ");
            }
            match dialect {
                Dialect::Sqlite => sql.push('?'),
                Dialect::Postgres => sql.push_str(&format!("${}", r * 12 + c + 1)),
            }
        }
        sql.push(')');
    }
    sql
}

/// Appends `batch` to the ledger inside the caller's write transaction, chained to the head.
/// The head row is locked first: concurrent appenders (other tasks or other replicas) queue
/// there, so each one reads the head only after the previous one committed. Every writer that
/// appends to the ledger as part of a larger transaction takes the head lock last.
pub(crate) async fn append_chained(
    conn: &mut AnyConnection,
    dialect: Dialect,
    batch: &[NewIssuance],
) -> Result<Vec<LedgerEntry>, StoreError> {
    // Lock the head first: concurrent appenders (other tasks or other replicas) queue here,
    // so each one reads the head only after the previous one committed. The same statement
    // reads it: one round trip fewer to the database for every batch.
    let head = sqlx::query(
        "UPDATE ledger_head SET last_seq = last_seq WHERE id = 1 RETURNING last_seq, last_hash",
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(from_sqlx)?
    .ok_or_else(|| StoreError::Corrupt("the ledger head row is missing".into()))?;
    let last_seq: i64 = head.try_get("last_seq").map_err(from_sqlx)?;
    let last_hash: String = head.try_get("last_hash").map_err(from_sqlx)?;
    let last_hash = decode_hash(&last_hash, "ledger head hash").map_err(StoreError::Corrupt)?;

    let entries = chain_batch(last_seq, last_hash, batch);
    for chunk in entries.chunks(INSERT_CHUNK) {
        let sql = insert_sql(chunk.len(), dialect);
        let mut query = sqlx::query(&sql);
        for e in chunk {
            let i = &e.issuance;
            query = query
                .bind(e.seq)
                .bind(i.serial_hex.as_str())
                .bind(i.spiffe_id.as_str())
                .bind(i.authority_id.as_str())
                .bind(i.not_before)
                .bind(i.not_after)
                .bind(i.requester.as_str())
                .bind(i.node.clone())
                .bind(hex::encode(i.der_sha256))
                .bind(i.issued_at)
                .bind(hex::encode(e.prev_hash))
                .bind(hex::encode(e.row_hash));
        }
        // A unique violation (a serial number repeated for one authority) is a Conflict that
        // names the constraint; the transaction rolls back and nothing is written.
        query.execute(&mut *conn).await.map_err(from_sqlx)?;
    }
    if let Some(last) = entries.last() {
        sqlx::query("UPDATE ledger_head SET last_seq = $1, last_hash = $2 WHERE id = 1")
            .bind(last.seq)
            .bind(hex::encode(last.row_hash))
            .execute(&mut *conn)
            .await
            .map_err(from_sqlx)?;
    }
    Ok(entries)
}

#[async_trait::async_trait]
impl LedgerStore for SqlStore {
    async fn append_issuances(
        &self,
        batch: &[NewIssuance],
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self
            .ledger_writer
            .begin_with(self.dialect.begin_write())
            .await
            .map_err(from_sqlx)?;
        let entries = append_chained(&mut tx, self.dialect, batch).await?;
        tx.commit().await.map_err(from_sqlx)?;
        Ok(entries)
    }

    async fn list_issuances(&self, filter: &LedgerFilter) -> Result<Vec<LedgerEntry>, StoreError> {
        let (sql, params) = issuance_query(filter);
        let mut query = sqlx::query(&sql);
        for p in params {
            query = match p {
                Param::Text(s) => query.bind(s),
                Param::Int(n) => query.bind(n),
            };
        }
        let rows = query.fetch_all(&self.pool).await.map_err(from_sqlx)?;
        rows.iter()
            .map(|row| {
                decode_entry(row)
                    .map_err(|reason| StoreError::Corrupt(format!("ledger row: {reason}")))
            })
            .collect()
    }

    async fn verify_ledger(&self) -> Result<LedgerVerification, StoreError> {
        let mut tx = self
            .pool
            .begin_with(self.dialect.begin_snapshot())
            .await
            .map_err(from_sqlx)?;
        let head = sqlx::query("SELECT last_seq, last_hash FROM ledger_head WHERE id = 1")
            .fetch_optional(&mut *tx)
            .await
            .map_err(from_sqlx)?;
        let head = match head {
            None => None,
            Some(row) => {
                let seq: i64 = row.try_get("last_seq").map_err(from_sqlx)?;
                let hash: String = row.try_get("last_hash").map_err(from_sqlx)?;
                let hash = decode_hash(&hash, "ledger head hash").map_err(StoreError::Corrupt)?;
                Some((seq, hash))
            }
        };

        let mut verifier = ChainVerifier::new();
        let mut after = i64::MIN;
        'pages: loop {
            let rows = sqlx::query(&format!(
                "SELECT {ISSUANCE_COLUMNS} FROM issuances WHERE seq > $1 ORDER BY seq LIMIT $2"
            ))
            .bind(after)
            .bind(VERIFY_PAGE)
            .fetch_all(&mut *tx)
            .await
            .map_err(from_sqlx)?;
            for row in &rows {
                let seq: i64 = row.try_get("seq").map_err(from_sqlx)?;
                after = seq;
                if !verifier.check(seq, decode_entry(row)) {
                    break 'pages;
                }
            }
            if (rows.len() as i64) < VERIFY_PAGE {
                break;
            }
        }
        tx.rollback().await.map_err(from_sqlx)?;
        Ok(verifier.finish(head))
    }

    async fn live_counts_by_authority(&self, now: i64) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT authority_id, COUNT(*) AS live FROM issuances \
             WHERE not_after > $1 GROUP BY authority_id",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(from_sqlx)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("authority_id").map_err(from_sqlx)?;
            let live: i64 = row.try_get("live").map_err(from_sqlx)?;
            let live = u64::try_from(live)
                .map_err(|_| StoreError::Corrupt("negative certificate count".into()))?;
            out.push((id, live));
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_query_numbers_its_placeholders_in_order() {
        let filter = LedgerFilter {
            spiffe_id: Some("s".into()),
            authority_id: Some("a".into()),
            live_at: Some(5),
            limit: Some(10),
        };
        let (sql, params) = issuance_query(&filter);
        assert!(sql.ends_with(
            "WHERE spiffe_id = $1 AND authority_id = $2 AND not_before <= $3 AND not_after > $4 \
             ORDER BY seq LIMIT $5"
        ), "{sql}");
        assert_eq!(params.len(), 5);
        let (sql, params) = issuance_query(&LedgerFilter::default());
        assert!(sql.ends_with("FROM issuances ORDER BY seq"), "{sql}");
        assert!(params.is_empty());
    }

    #[test]
    fn insert_sql_has_twelve_placeholders_per_row() {
        let sql = insert_sql(2, Dialect::Postgres);
        assert!(sql.contains("($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12), ($13,"));
        assert!(sql.ends_with("$24)"));
        let sql = insert_sql(2, Dialect::Sqlite);
        let row = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
        assert!(sql.ends_with(&format!("VALUES {row}, {row}")), "{sql}");
        assert!(!sql.contains('$'), "{sql}");
    }
}
