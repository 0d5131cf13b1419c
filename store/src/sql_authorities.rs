//! The SQL side of signing authorities and the trust-bundle sequence (one implementation for
//! SQLite and PostgreSQL, like the rest of [`crate::sql`]).

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::error::{StoreError, from_sqlx};
use crate::model::{AuthorityRecord, AuthorityState};
use crate::sql::{SqlStore, column};
use crate::sql_agents::bump_bundle_sequence;
use crate::store::AuthorityStore;

const AUTHORITY_COLUMNS: &str =
    "id, state, cert_pem, chain_pem, root_pem, not_before, not_after, key_ref, created_at";

fn decode_authority(row: &AnyRow) -> Result<AuthorityRecord, StoreError> {
    let read = || -> Result<AuthorityRecord, String> {
        let state: String = column(row, "state")?;
        Ok(AuthorityRecord {
            id: column(row, "id")?,
            state: state.parse().map_err(|e| format!("{e}"))?,
            cert_pem: column(row, "cert_pem")?,
            chain_pem: column(row, "chain_pem")?,
            root_pem: column(row, "root_pem")?,
            not_before: column(row, "not_before")?,
            not_after: column(row, "not_after")?,
            key_ref: column(row, "key_ref")?,
            created_at: column(row, "created_at")?,
        })
    };
    read().map_err(|reason| StoreError::Corrupt(format!("authority row: {reason}")))
}

#[async_trait::async_trait]
impl AuthorityStore for SqlStore {
    async fn list_authorities(&self) -> Result<Vec<AuthorityRecord>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {AUTHORITY_COLUMNS} FROM authorities"))
            .fetch_all(&self.pool)
            .await
            .map_err(from_sqlx)?;
        let mut out = rows
            .iter()
            .map(decode_authority)
            .collect::<Result<Vec<_>, _>>()?;
        // Sorted here rather than in SQL so both backends agree on string order.
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn insert_authority(&self, rec: &AuthorityRecord) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with(self.dialect.begin_write())
            .await
            .map_err(from_sqlx)?;
        let existing = sqlx::query("SELECT id FROM authorities WHERE id = $1")
            .bind(rec.id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(from_sqlx)?;
        if existing.is_some() {
            return Err(StoreError::Conflict(format!(
                "authority {} already exists",
                rec.id
            )));
        }
        if rec.state == AuthorityState::Active {
            let active = sqlx::query("SELECT id FROM authorities WHERE state = 'active'")
                .fetch_optional(&mut *tx)
                .await
                .map_err(from_sqlx)?;
            if let Some(row) = active {
                let other: String = row.try_get("id").map_err(from_sqlx)?;
                return Err(StoreError::Conflict(format!(
                    "authority {other} is already active"
                )));
            }
        }
        sqlx::query(&format!(
            "INSERT INTO authorities ({AUTHORITY_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))
        .bind(rec.id.as_str())
        .bind(rec.state.as_str())
        .bind(rec.cert_pem.as_str())
        .bind(rec.chain_pem.as_str())
        .bind(rec.root_pem.as_str())
        .bind(rec.not_before)
        .bind(rec.not_after)
        .bind(rec.key_ref.as_str())
        .bind(rec.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| match from_sqlx(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!(
                "authority {} conflicts with one written concurrently",
                rec.id
            )),
            other => other,
        })?;
        bump_bundle_sequence(&mut tx).await?;
        tx.commit().await.map_err(from_sqlx)
    }

    async fn set_authority_state(&self, id: &str, state: AuthorityState) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin_with(self.dialect.begin_write())
            .await
            .map_err(from_sqlx)?;
        let existing = sqlx::query("SELECT id FROM authorities WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(from_sqlx)?;
        if existing.is_none() {
            return Err(StoreError::NotFound(format!("authority {id}")));
        }
        let mut changed = 0;
        if state == AuthorityState::Active {
            changed += sqlx::query(
                "UPDATE authorities SET state = 'retired' WHERE state = 'active' AND id <> $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(from_sqlx)?
            .rows_affected();
        }
        changed += sqlx::query("UPDATE authorities SET state = $1 WHERE id = $2 AND state <> $3")
            .bind(state.as_str())
            .bind(id)
            .bind(state.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| match from_sqlx(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!(
                    "another authority was activated concurrently with {id}; retry"
                )),
                other => other,
            })?
            .rows_affected();
        // A no-op (the authority already had that state) is not a change of the bundle.
        if changed > 0 {
            bump_bundle_sequence(&mut tx).await?;
        }
        tx.commit().await.map_err(from_sqlx)
    }

    async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        self.sql_bundle_sequence().await
    }
}
