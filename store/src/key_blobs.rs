//! Sealed authority keys: opaque text the CA's sealed key store wrote (a private key wrapped
//! under a key-encryption key the store never sees), kept by key reference so that every
//! replica sharing the database can load them. The store neither seals nor opens them.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::{StoreError, from_sqlx};
use crate::sql::SqlStore;

/// Where sealed key blobs live. Implemented by the SQL backends (see [`crate::connect_key_blobs`])
/// and by [`MemoryKeyBlobs`].
#[async_trait::async_trait]
pub trait KeyBlobStore: Send + Sync + 'static {
    /// Stores `sealed` under `key_ref`; [`StoreError::Conflict`] if a blob is already stored
    /// under that reference (blobs are never replaced).
    async fn insert_key_blob(
        &self,
        key_ref: &str,
        sealed: &str,
        created_at: i64,
    ) -> Result<(), StoreError>;

    /// The blob stored under `key_ref`, if any.
    async fn find_key_blob(&self, key_ref: &str) -> Result<Option<String>, StoreError>;
}

#[async_trait::async_trait]
impl KeyBlobStore for SqlStore {
    async fn insert_key_blob(
        &self,
        key_ref: &str,
        sealed: &str,
        created_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO sealed_keys (key_ref, sealed, created_at) VALUES ($1, $2, $3)")
            .bind(key_ref)
            .bind(sealed)
            .bind(created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| match from_sqlx(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!(
                    "a sealed key is already stored under {key_ref:?}"
                )),
                other => other,
            })?;
        Ok(())
    }

    async fn find_key_blob(&self, key_ref: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar::<_, String>("SELECT sealed FROM sealed_keys WHERE key_ref = $1")
            .bind(key_ref)
            .fetch_optional(&self.pool)
            .await
            .map_err(from_sqlx)
    }
}

/// Sealed key blobs held in memory, for tests. Not durable.
#[derive(Debug, Default)]
pub struct MemoryKeyBlobs {
    blobs: Mutex<HashMap<String, String>>,
}

impl MemoryKeyBlobs {
    /// Replaces the blob under `key_ref` behind the store's back (tamper tests).
    pub fn overwrite(&self, key_ref: &str, sealed: &str) {
        let mut blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        blobs.insert(key_ref.to_owned(), sealed.to_owned());
    }
}

#[async_trait::async_trait]
impl KeyBlobStore for MemoryKeyBlobs {
    async fn insert_key_blob(
        &self,
        key_ref: &str,
        sealed: &str,
        _created_at: i64,
    ) -> Result<(), StoreError> {
        let mut blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        if blobs.contains_key(key_ref) {
            return Err(StoreError::Conflict(format!(
                "a sealed key is already stored under {key_ref:?}"
            )));
        }
        blobs.insert(key_ref.to_owned(), sealed.to_owned());
        Ok(())
    }

    async fn find_key_blob(&self, key_ref: &str) -> Result<Option<String>, StoreError> {
        let blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        Ok(blobs.get(key_ref).cloned())
    }
}
