//! The store's error type and the mapping from sqlx errors onto it.

/// Why a store operation failed.
///
/// Messages describe what failed; they never contain a connection URL, a password or key
/// material.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The database cannot be reached or answered with a transient failure (connection refused,
    /// pool timeout, I/O error, closed pool, lock contention). Retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The database URL or the database's settings are unusable.
    #[error("store configuration: {0}")]
    Config(String),
    /// The write contradicts what is stored (duplicate id, a second active authority, a
    /// duplicate serial number).
    #[error("store conflict: {0}")]
    Conflict(String),
    /// The named record does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Stored data cannot be read back as what was written (bad hex, unknown state, missing
    /// ledger head).
    #[error("store data corrupt: {0}")]
    Corrupt(String),
    /// Applying the embedded schema migrations failed.
    #[error("store migration failed: {0}")]
    Migration(String),
}

/// Maps a sqlx error onto [`StoreError`].
///
/// Only the error's own description is kept; sqlx never puts the connection URL into these.
pub(crate) fn from_sqlx(err: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match err {
        E::Io(e) => StoreError::Unavailable(format!("I/O error: {e}")),
        E::Tls(e) => StoreError::Unavailable(format!("TLS error: {e}")),
        E::PoolTimedOut => {
            StoreError::Unavailable("timed out waiting for a database connection".into())
        }
        E::PoolClosed => StoreError::Unavailable("the connection pool is closed".into()),
        E::WorkerCrashed => StoreError::Unavailable("the database worker stopped".into()),
        E::Protocol(msg) => StoreError::Unavailable(format!("protocol error: {msg}")),
        E::Configuration(e) => StoreError::Config(e.to_string()),
        E::AnyDriverError(e) => StoreError::Config(e.to_string()),
        E::Migrate(e) => StoreError::Migration(e.to_string()),
        E::Database(db) => {
            if db.is_unique_violation() {
                StoreError::Conflict(db.message().to_string())
            } else {
                StoreError::Unavailable(format!("database error: {}", db.message()))
            }
        }
        E::RowNotFound => StoreError::NotFound("row".into()),
        E::ColumnDecode { index, source } => {
            StoreError::Corrupt(format!("column {index} cannot be decoded: {source}"))
        }
        E::Decode(e) => StoreError::Corrupt(format!("value cannot be decoded: {e}")),
        E::ColumnNotFound(c) => StoreError::Corrupt(format!("column {c} is missing")),
        E::TypeNotFound { type_name } => StoreError::Corrupt(format!("unknown type {type_name}")),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Removes every occurrence of `secret` from the message of `err` (defence in depth for errors
/// raised while connecting with a URL that carries a password).
pub(crate) fn scrub(err: StoreError, secret: Option<&str>) -> StoreError {
    let Some(secret) = secret.filter(|s| !s.is_empty()) else {
        return err;
    };
    let clean = |m: String| m.replace(secret, "***");
    match err {
        StoreError::Unavailable(m) => StoreError::Unavailable(clean(m)),
        StoreError::Config(m) => StoreError::Config(clean(m)),
        StoreError::Conflict(m) => StoreError::Conflict(clean(m)),
        StoreError::NotFound(m) => StoreError::NotFound(clean(m)),
        StoreError::Corrupt(m) => StoreError::Corrupt(clean(m)),
        StoreError::Migration(m) => StoreError::Migration(clean(m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_the_secret_from_every_variant() {
        let cases = [
            StoreError::Unavailable("pw=hunter2".into()),
            StoreError::Config("pw=hunter2".into()),
            StoreError::Conflict("pw=hunter2".into()),
            StoreError::NotFound("pw=hunter2".into()),
            StoreError::Corrupt("pw=hunter2".into()),
            StoreError::Migration("pw=hunter2".into()),
        ];
        for case in cases {
            let out = scrub(case, Some("hunter2")).to_string();
            assert!(!out.contains("hunter2"), "{out}");
            assert!(out.contains("pw=***"), "{out}");
        }
    }

    #[test]
    fn pool_timeout_and_io_errors_are_unavailable() {
        assert!(matches!(
            from_sqlx(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            from_sqlx(sqlx::Error::PoolClosed),
            StoreError::Unavailable(_)
        ));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(
            from_sqlx(sqlx::Error::Io(io)),
            StoreError::Unavailable(_)
        ));
    }
}
