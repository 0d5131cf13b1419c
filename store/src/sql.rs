//! The SQL backends: one implementation over sqlx's `AnyPool` for SQLite and PostgreSQL.
//!
//! The SQL is shared (`$N` placeholders work on both); only the migrations, the statement
//! that opens a transaction and the connection set-up differ per dialect.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection, Executor, Row};

use crate::agents::{BundleAck, JoinTokenRecord, PolicyAck};
use crate::chain::{ChainVerifier, chain_batch};
use crate::error::{StoreError, from_sqlx, scrub};
use crate::key_blobs::KeyBlobStore;
use crate::model::{
    AuthorityRecord, AuthorityState, LedgerEntry, LedgerFilter, LedgerVerification, NewIssuance,
};
use crate::nodes::{NodeCertificateUse, NodeGrant, NodeIssuanceOutcome, NodeRecord};
use crate::sql_agents::bump_bundle_sequence;
use crate::store::Store;

static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");

/// How long a caller waits for a pooled connection before the store reports `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long SQLite waits for another writer's lock.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows per multi-row INSERT (12 parameters each, below SQLite's historic 999 limit).
const INSERT_CHUNK: usize = 64;
/// Rows read per page while verifying the ledger.
const VERIFY_PAGE: i64 = 1_000;

const ISSUANCE_COLUMNS: &str = "seq, serial_hex, spiffe_id, authority_id, not_before, not_after, \
     requester, node, der_sha256, issued_at, prev_hash, row_hash";
const AUTHORITY_COLUMNS: &str =
    "id, state, cert_pem, chain_pem, root_pem, not_before, not_after, key_ref, created_at";

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
/// (a commit is durable), 5 s busy timeout. Every backend: a connection is awaited at most
/// 3 s, after which the call fails with [`StoreError::Unavailable`]. Any other URL is a
/// [`StoreError::Config`]. Error messages never contain the URL's password.
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
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("PRAGMA synchronous = FULL").await?;
                let busy = format!("PRAGMA busy_timeout = {}", SQLITE_BUSY_TIMEOUT.as_millis());
                conn.execute(busy.as_str()).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(from_sqlx)?;
    SQLITE_MIGRATOR.run(&pool).await.map_err(from_migrate)?;
    Ok(SqlStore {
        pool,
        dialect: Dialect::Sqlite,
    })
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
        .connect_with(options)
        .await
        .map_err(from_sqlx)?;
    POSTGRES_MIGRATOR.run(&pool).await.map_err(from_migrate)?;
    Ok(SqlStore {
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
    fn begin_snapshot(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN",
            Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        }
    }
}

/// The SQL store: a pool and the dialect it speaks.
pub(crate) struct SqlStore {
    pub(crate) pool: AnyPool,
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

/// `INSERT INTO issuances … VALUES (…), (…)` for `rows` rows.
fn insert_sql(rows: usize) -> String {
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
            sql.push_str(&format!("${}", r * 12 + c + 1));
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
    batch: &[NewIssuance],
) -> Result<Vec<LedgerEntry>, StoreError> {
    // Lock the head first: concurrent appenders (other tasks or other replicas) queue here,
    // so each one reads the head only after the previous one committed.
    let locked = sqlx::query("UPDATE ledger_head SET last_seq = last_seq WHERE id = 1")
        .execute(&mut *conn)
        .await
        .map_err(from_sqlx)?
        .rows_affected();
    if locked != 1 {
        return Err(StoreError::Corrupt("the ledger head row is missing".into()));
    }
    let head = sqlx::query("SELECT last_seq, last_hash FROM ledger_head WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(from_sqlx)?;
    let last_seq: i64 = head.try_get("last_seq").map_err(from_sqlx)?;
    let last_hash: String = head.try_get("last_hash").map_err(from_sqlx)?;
    let last_hash = decode_hash(&last_hash, "ledger head hash").map_err(StoreError::Corrupt)?;

    let entries = chain_batch(last_seq, last_hash, batch);
    for chunk in entries.chunks(INSERT_CHUNK) {
        let sql = insert_sql(chunk.len());
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
impl Store for SqlStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(from_sqlx)?;
        Ok(())
    }

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

    async fn append_issuances(
        &self,
        batch: &[NewIssuance],
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self
            .pool
            .begin_with(self.dialect.begin_write())
            .await
            .map_err(from_sqlx)?;
        let entries = append_chained(&mut tx, batch).await?;
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

    async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        self.sql_bundle_sequence().await
    }

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

    #[tokio::test]
    async fn sqlite_connections_commit_durably_and_wait_for_locks() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let store = connect_sqlite(&dir.path().join("citadel.db"))
            .await
            .unwrap();
        let mut conn = store.pool.acquire().await.unwrap();
        // synchronous = FULL (2): a commit is on disk before it returns.
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(synchronous, 2);
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(busy, 5_000);
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(journal, "wal");
    }

    #[test]
    fn insert_sql_has_twelve_placeholders_per_row() {
        let sql = insert_sql(2);
        assert!(sql.contains("($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12), ($13,"));
        assert!(sql.ends_with("$24)"));
    }
}
