//! The SQL backends: one implementation over sqlx's `AnyPool` for SQLite and PostgreSQL.
//!
//! The SQL is shared (`$N` placeholders work on both); only the migrations, the statement
//! that opens a transaction and the connection set-up differ per dialect.
//!
//! This file opens the store; each seam's statements live beside it: `sql_authorities`,
//! `sql_ledger`, `sql_nodes` (and join tokens in `sql_agents`), `sql_agents` (acknowledgements),
//! `sql_lease`.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, ConnectOptions, Connection, Executor, Row};

use crate::error::{StoreError, from_sqlx, scrub};
use crate::key_blobs::KeyBlobStore;
use crate::store::{HealthStore, Store};

static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");

/// How long a caller waits for a pooled connection before the store reports `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long SQLite waits for another writer's lock.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Page cache of each SQLite connection, KiB (SQLite's default is 2 MiB): the ledger's serial
/// index takes one random page per issuance, which a small cache reads back from the file.
const SQLITE_CACHE_KIB: i64 = 16 * 1024;

/// What a database URL points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A SQLite database file (the text after `sqlite://`, taken literally).
    Sqlite(PathBuf),
    /// A PostgreSQL server; `password` is kept only to scrub it from error messages.
    Postgres {
        url: String,
        password: Option<String>,
    },
}

/// Classifies a database URL without touching the network or the file system. Errors never
/// repeat the URL.
pub(crate) fn parse_url(url: &str) -> Result<Target, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::Config("sqlite:// URL names no file".into()));
        }
        if path == ":memory:" {
            return Err(StoreError::Config(
                "in-memory SQLite is not durable; give a file path".into(),
            ));
        }
        if path.contains(['?', '#']) {
            return Err(StoreError::Config(
                "sqlite:// URLs take a plain file path, without query parameters".into(),
            ));
        }
        return Ok(Target::Sqlite(PathBuf::from(path)));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Target::Postgres {
            url: url.to_string(),
            password: url_password(url),
        });
    }
    let scheme = url.split_once("://").map(|(scheme, _)| scheme).filter(|s| {
        s.len() <= 16
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    Err(StoreError::Config(match scheme {
        Some(scheme) => {
            format!("unsupported database URL scheme {scheme:?}; expected sqlite:// or postgres://")
        }
        None => "unsupported database URL; expected sqlite://PATH or postgres://…".into(),
    }))
}

/// The password in a PostgreSQL URL, from the user-info part or a `password=` parameter.
fn url_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let from_userinfo = authority
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password.to_string());
    let from_query = rest.split_once('?').and_then(|(_, query)| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("password="))
            .map(str::to_string)
    });
    from_userinfo.or(from_query).filter(|p| !p.is_empty())
}

/// Opens the store at `url` (`sqlite://PATH`, `postgres://…` or `postgresql://…`) and applies
/// the embedded migrations.
///
/// SQLite: the file is created with mode 0600 if missing; WAL journal, `synchronous=FULL`
/// (a commit is durable), 5 s busy timeout, temporary tables and journals in memory, a
/// 16 MiB page cache per connection, ledger appends on a connection of their own. Every
/// backend: a connection is awaited at most 3 s, after which the call fails with
/// [`StoreError::Unavailable`]. Any other URL is a [`StoreError::Config`]. Error messages
/// never contain the URL's password.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    sqlx::any::install_default_drivers();
    let store = match parse_url(url)? {
        Target::Sqlite(path) => connect_sqlite(&path).await?,
        Target::Postgres { url, password } => connect_postgres(&url)
            .await
            .map_err(|e| scrub(e, password.as_deref()))?,
    };
    Ok(Arc::new(store))
}

/// Opens the sealed-key table of the store at `url` (same URLs, migrations and errors as
/// [`connect`]), on a pool of its own: the CA uses it only when a key-encryption key is configured.
pub async fn connect_key_blobs(url: &str) -> Result<Arc<dyn KeyBlobStore>, StoreError> {
    sqlx::any::install_default_drivers();
    let store = match parse_url(url)? {
        Target::Sqlite(path) => connect_sqlite(&path).await?,
        Target::Postgres { url, password } => connect_postgres(&url)
            .await
            .map_err(|e| scrub(e, password.as_deref()))?,
    };
    Ok(Arc::new(store))
}

/// Creates `path` with mode 0600 unless it exists (an existing file keeps its mode).
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| StoreError::Unavailable(format!("cannot open the SQLite database file: {e}")))
}

async fn connect_sqlite(path: &Path) -> Result<SqlStore, StoreError> {
    create_private_file(path)?;
    let url = SqliteConnectOptions::new().filename(path).to_url_lossy();
    let options = AnyConnectOptions::from_url(&url).map_err(from_sqlx)?;
    enable_wal(&options).await?;
    let pool = sqlite_pool_options(4)
        .connect_with(options.clone())
        .await
        .map_err(from_sqlx)?;
    SQLITE_MIGRATOR.run(&pool).await.map_err(from_migrate)?;
    // Opened at the first append: a store that never appends (the sealed-key store) keeps
    // no idle connection for it.
    let ledger_writer = sqlite_pool_options(1).connect_lazy_with(options);
    Ok(SqlStore {
        pool,
        ledger_writer,
        dialect: Dialect::Sqlite,
    })
}

/// Pool options of every SQLite connection: the pragmas each connection needs.
fn sqlite_pool_options(max_connections: u32) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_release(|conn, _meta| Box::pin(async move { Ok(outside_transaction(conn)) }))
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("PRAGMA synchronous = FULL").await?;
                // Neither touches durability (the WAL and its fsync at commit do): the
                // statement journal of a multi-row ledger INSERT stays in memory instead of a
                // temporary file written for every batch, and the index pages a batch of
                // random serials lands on stay cached instead of being read again.
                conn.execute("PRAGMA temp_store = MEMORY").await?;
                let cache = format!("PRAGMA cache_size = -{SQLITE_CACHE_KIB}");
                conn.execute(cache.as_str()).await?;
                let busy = format!("PRAGMA busy_timeout = {}", SQLITE_BUSY_TIMEOUT.as_millis());
                conn.execute(busy.as_str()).await?;
                Ok(())
            })
        })
}

/// Whether a connection handed back to the pool is outside any transaction. A COMMIT or
/// ROLLBACK that failed (SQLite's `SQLITE_FULL` on a full disk, a dropped PostgreSQL link) leaves
/// the driver counting a transaction the database may already have ended, and every later
/// `begin_with` on that connection fails; such a connection is closed instead of reused. A
/// transaction dropped on an error path may still have its rollback queued: closing that
/// connection too costs one reconnect, on error paths only.
fn outside_transaction(conn: &sqlx::AnyConnection) -> bool {
    use sqlx::TransactionManager as _;
    sqlx::any::AnyTransactionManager::get_transaction_depth(conn) == 0
}

/// Switches the database file to WAL once, before the pool opens. The switch needs an
/// exclusive lock that SQLite does not wait for, so a racing replica is retried briefly.
async fn enable_wal(options: &AnyConnectOptions) -> Result<(), StoreError> {
    let deadline = Instant::now() + SQLITE_BUSY_TIMEOUT;
    loop {
        let attempt = async {
            let mut conn = options.connect().await?;
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
                .fetch_one(&mut conn)
                .await?;
            conn.close().await?;
            Ok::<_, sqlx::Error>(mode)
        }
        .await;
        match attempt.map_err(from_sqlx) {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => {
                return Err(StoreError::Config(format!(
                    "SQLite kept journal mode {mode:?} instead of WAL"
                )));
            }
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn connect_postgres(url: &str) -> Result<SqlStore, StoreError> {
    let options = AnyConnectOptions::from_str(url)
        .map_err(|_| StoreError::Config("the PostgreSQL URL cannot be parsed".into()))?;
    let pool = AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_release(|conn, _meta| Box::pin(async move { Ok(outside_transaction(conn)) }))
        .connect_with(options)
        .await
        .map_err(from_sqlx)?;
    POSTGRES_MIGRATOR.run(&pool).await.map_err(from_migrate)?;
    Ok(SqlStore {
        ledger_writer: pool.clone(),
        pool,
        dialect: Dialect::Postgres,
    })
}

fn from_migrate(err: MigrateError) -> StoreError {
    match err {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => match from_sqlx(e) {
            unavailable @ StoreError::Unavailable(_) => unavailable,
            other => StoreError::Migration(other.to_string()),
        },
        other => StoreError::Migration(other.to_string()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Opens a transaction that will write. SQLite takes its write lock at once (waiting up to
    /// the busy timeout), so a transaction never has to upgrade a stale read snapshot.
    pub(crate) fn begin_write(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }

    /// What to append to a `SELECT` that reads rows the transaction will change: PostgreSQL
    /// locks them (concurrent writers wait); SQLite's write transaction already holds the
    /// database lock.
    pub(crate) fn lock_rows(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }

    /// Opens a read-only transaction that sees one consistent snapshot.
    pub(crate) fn begin_snapshot(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN",
            Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        }
    }
}

/// The SQL store: its pools and the dialect it speaks.
pub(crate) struct SqlStore {
    pub(crate) pool: AnyPool,
    /// Where [`crate::LedgerStore::append_issuances`] writes: the group-commit writer's batches,
    /// the hottest writes the CA makes. SQLite: one connection of its own. A SQLite connection
    /// drops its whole page cache whenever another connection has committed since its last
    /// transaction, so batches spread over the shared pool read their index pages back from
    /// the file every time; on one connection they stay cached, and the appends never wait
    /// behind the shared pool's readers. PostgreSQL keeps no such cache: the shared pool.
    pub(crate) ledger_writer: AnyPool,
    pub(crate) dialect: Dialect,
}

pub(crate) fn decode_hash(hex_text: &str, column: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out)
        .map_err(|_| format!("{column} is not 64 hexadecimal characters"))?;
    Ok(out)
}

pub(crate) fn column<'r, T>(row: &'r AnyRow, name: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(name)
        .map_err(|e| format!("column {name} cannot be read: {e}"))
}

#[async_trait::async_trait]
impl HealthStore for SqlStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(from_sqlx)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_url_is_a_literal_path() {
        assert_eq!(
            parse_url("sqlite:///var/lib/citadel/citadel.db"),
            Ok(Target::Sqlite(PathBuf::from("/var/lib/citadel/citadel.db")))
        );
        assert_eq!(
            parse_url("sqlite://data/citadel db.sqlite"),
            Ok(Target::Sqlite(PathBuf::from("data/citadel db.sqlite")))
        );
    }

    #[test]
    fn rejects_sqlite_url_without_a_durable_file() {
        for url in [
            "sqlite://",
            "sqlite://:memory:",
            "sqlite://a.db?mode=memory",
        ] {
            assert!(
                matches!(parse_url(url), Err(StoreError::Config(_))),
                "{url}"
            );
        }
    }

    #[test]
    fn accepts_both_postgres_schemes() {
        for url in ["postgres://u@h/db", "postgresql://u@h/db"] {
            assert!(
                matches!(parse_url(url), Ok(Target::Postgres { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn rejects_unknown_schemes_without_echoing_the_url() {
        for url in [
            "mysql://root:hunter2@localhost/db",
            "hunter2",
            "sqlite:relative.db",
            "",
        ] {
            let err = parse_url(url).unwrap_err();
            assert!(matches!(err, StoreError::Config(_)), "{url}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn finds_the_password_to_scrub() {
        assert_eq!(
            url_password("postgres://citadel:s3cret@db:5432/citadel"),
            Some("s3cret".into())
        );
        assert_eq!(
            url_password("postgres://citadel@db/citadel?password=s3cret&sslmode=require"),
            Some("s3cret".into())
        );
        assert_eq!(url_password("postgres://citadel@db/citadel"), None);
        assert_eq!(url_password("postgres://db/citadel"), None);
    }

    #[tokio::test]
    async fn sqlite_connections_commit_durably_and_wait_for_locks() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let store = connect_sqlite(&dir.path().join("citadel.db"))
            .await
            .unwrap();
        // The ledger writer's connection is set up like the shared pool's.
        for pool in [&store.pool, &store.ledger_writer] {
            let mut conn = pool.acquire().await.unwrap();
            // synchronous = FULL (2): a commit is on disk before it returns.
            assert_eq!(pragma::<i64>(&mut conn, "synchronous").await, 2);
            assert_eq!(pragma::<i64>(&mut conn, "busy_timeout").await, 5_000);
            assert_eq!(pragma::<String>(&mut conn, "journal_mode").await, "wal");
            // temp_store = MEMORY (2); cache_size negative = KiB.
            assert_eq!(pragma::<i64>(&mut conn, "temp_store").await, 2);
            assert_eq!(
                pragma::<i64>(&mut conn, "cache_size").await,
                -SQLITE_CACHE_KIB
            );
        }
    }

    /// The current value of SQLite's `PRAGMA name` on `conn`.
    async fn pragma<T>(conn: &mut sqlx::AnyConnection, name: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + Send + Unpin,
    {
        sqlx::query_scalar(&format!("PRAGMA {name}"))
            .fetch_one(conn)
            .await
            .unwrap()
    }

    /// The SQLite ledger keeps no index on the SPIFFE ID (each issuance would write and sync
    /// one more random page of it): a new database has none, an upgraded one loses it, and the
    /// serial's uniqueness and the expiry index stay.
    #[tokio::test]
    async fn sqlite_ledger_has_no_index_on_the_spiffe_id() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("citadel.db");
        let store = connect_sqlite(&path).await.unwrap();
        let indexes = |store: SqlStore| async move {
            let names: Vec<String> = sqlx::query_scalar(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'issuances' \
                 AND sql IS NOT NULL ORDER BY name",
            )
            .fetch_all(&store.pool)
            .await
            .unwrap();
            store.pool.close().await;
            names
        };
        let expected = ["issuances_authority_serial", "issuances_not_after"];
        assert_eq!(indexes(store).await, expected);

        // A database written by the release before (schema version 7) has the index.
        let old = connect_sqlite(&path).await.unwrap();
        old.pool
            .execute(
                "CREATE INDEX issuances_spiffe_id ON issuances (spiffe_id, seq); \
                 DELETE FROM _sqlx_migrations WHERE version = 8",
            )
            .await
            .unwrap();
        old.pool.close().await;
        let upgraded = connect_sqlite(&path).await.unwrap();
        assert_eq!(indexes(upgraded).await, expected);
    }

    /// Readers holding every connection of the shared pool (a long `ledger verify`, a burst
    /// of status queries) do not hold up issuance: ledger appends have their own connection.
    #[tokio::test]
    async fn ledger_appends_do_not_wait_for_the_shared_pool() {
        use crate::model::NewIssuance;
        use crate::store::LedgerStore as _;
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let store = connect_sqlite(&dir.path().join("citadel.db"))
            .await
            .unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(store.pool.acquire().await.unwrap());
        }
        let issuance = NewIssuance {
            serial_hex: "0a".repeat(16),
            spiffe_id: "spiffe://cluster.local/ns/default/sa/web".into(),
            authority_id: "auth-1".into(),
            not_before: 1_000,
            not_after: 90_000,
            requester: "spiffe://cluster.local/ns/default/sa/web".into(),
            node: None,
            der_sha256: [7; 32],
            issued_at: 1_120,
        };
        // Well below ACQUIRE_TIMEOUT: an append queued behind the shared pool would time out.
        let appended = tokio::time::timeout(
            Duration::from_secs(2),
            store.append_issuances(std::slice::from_ref(&issuance)),
        )
        .await
        .expect("the append waited for the shared pool")
        .unwrap();
        assert_eq!(appended.len(), 1);
        assert_eq!(appended[0].issuance, issuance);
        drop(held);
        let verification = store.verify_ledger().await.unwrap();
        assert!(verification.is_valid(), "{verification:?}");
        assert_eq!(verification.rows_checked, 1);
    }

    /// A failed COMMIT (SQLITE_FULL on a full disk) can leave a connection whose driver still
    /// counts an open transaction that the database already ended; every later `begin_with` on
    /// it fails. Such a connection must leave the pool instead of going back into it.
    #[tokio::test]
    async fn a_connection_left_inside_a_transaction_is_not_reused() {
        use sqlx::Executor as _;
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let store = connect_sqlite(&dir.path().join("citadel.db"))
            .await
            .unwrap();
        {
            // End the transaction behind the driver's back, as a failed commit does: the
            // driver's depth stays 1 and the rollback on drop then fails.
            let mut tx = store
                .pool
                .begin_with(store.dialect.begin_write())
                .await
                .unwrap();
            tx.execute("COMMIT").await.unwrap();
        }
        for round in 0..8 {
            let tx = store
                .pool
                .begin_with(store.dialect.begin_write())
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            tx.commit().await.unwrap();
        }
    }
}
