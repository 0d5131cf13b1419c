//! The SQL side of leases (one statement set for SQLite and PostgreSQL).

use crate::error::{StoreError, from_sqlx};
use crate::lease::{Lease, LeaseStore};
use crate::sql::{SqlStore, column};

#[async_trait::async_trait]
impl LeaseStore for SqlStore {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        // One atomic upsert: the row is written only when it is new, ours, or lapsed, so two
        // replicas racing for a lapsed lease cannot both get it.
        let affected = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at <= $4",
        )
        .bind(name)
        .bind(holder)
        .bind(expires_at)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(from_sqlx)?
        .rows_affected();
        Ok(affected == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, StoreError> {
        let affected = sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(from_sqlx)?
            .rows_affected();
        Ok(affected == 1)
    }

    async fn get_lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        let row = sqlx::query("SELECT name, holder, expires_at FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(from_sqlx)?;
        let Some(row) = row else { return Ok(None) };
        let read = || -> Result<Lease, String> {
            Ok(Lease {
                name: column(&row, "name")?,
                holder: column(&row, "holder")?,
                expires_at: column(&row, "expires_at")?,
            })
        };
        read()
            .map(Some)
            .map_err(|reason| StoreError::Corrupt(format!("lease row: {reason}")))
    }
}
