//! Store conformance suite: every test body is written once and runs against SQLite,
//! PostgreSQL and the in-memory store (tests that need a database URL: the two SQL backends).
//!
//! PostgreSQL: `CITADEL_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! each test runs in a fresh schema that is dropped afterwards. If the server is unreachable
//! the PostgreSQL tests fail when `CI` is set and are skipped (loudly) otherwise.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use citadel_store::memory::MemoryStore;
use citadel_store::{
    AuthorityRecord, AuthorityState, BundleAck, GENESIS_HASH, GroupCommitLedger, JoinTokenRecord,
    JoinTokenRefusal, LAST_SEEN_GRANULARITY_SECS, LedgerEntry, LedgerFilter,
    MAX_POLICY_VERSION_LEN, NewIssuance, NodeCertificateRole, NodeCertificateUse, NodeGrant,
    NodeIssuanceOutcome, NodeRecord, NodeRefusal, PolicyAck, Store, StoreError, connect, row_hash,
};
use citadel_store::{KeyBlobStore, LedgerCheckpoint, MemoryKeyBlobs, connect_key_blobs};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A store under test, plus what the tamper tests need to change data behind its back.
struct Backend {
    store: Arc<dyn Store>,
    /// The database URL (SQL backends only), for raw SQL and for a second `connect`.
    url: Option<String>,
    /// The same store, typed (memory backend only).
    memory: Option<Arc<MemoryStore>>,
}

impl Backend {
    fn url(&self) -> &str {
        self.url.as_deref().expect("this test needs a SQL backend")
    }

    /// Runs raw SQL on the store's database, bypassing the store.
    async fn raw_sql(&self, sql: &str) {
        let pool = raw_pool(self.url()).await;
        pool.execute(sql).await.unwrap();
        pool.close().await;
    }

    /// Rewrites row `seq`'s SPIFFE ID without touching its hashes.
    async fn tamper_spiffe_id(&self, seq: i64, spiffe_id: &str) {
        match &self.memory {
            Some(memory) => memory.tamper_with_ledger(|rows| {
                let row = rows.iter_mut().find(|r| r.seq == seq).unwrap();
                row.issuance.spiffe_id = spiffe_id.to_string();
            }),
            None => {
                self.raw_sql(&format!(
                    "UPDATE issuances SET spiffe_id = '{spiffe_id}' WHERE seq = {seq}"
                ))
                .await
            }
        }
    }

    /// Deletes row `seq`, leaving the chain head as it was.
    async fn tamper_delete(&self, seq: i64) {
        match &self.memory {
            Some(memory) => memory.tamper_with_ledger(|rows| rows.retain(|r| r.seq != seq)),
            None => {
                self.raw_sql(&format!("DELETE FROM issuances WHERE seq = {seq}"))
                    .await
            }
        }
    }
}

async fn raw_pool(url: &str) -> AnyPool {
    sqlx::any::install_default_drivers();
    AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(url)
        .await
        .unwrap()
}

async fn with_memory<F, Fut>(body: F)
where
    F: FnOnce(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    let memory = Arc::new(MemoryStore::new());
    body(Backend {
        store: memory.clone(),
        url: None,
        memory: Some(memory),
    })
    .await;
}

async fn with_sqlite<F, Fut>(body: F)
where
    F: FnOnce(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("citadel.db").display());
    let store = connect(&url).await.unwrap();
    body(Backend {
        store,
        url: Some(url),
        memory: None,
    })
    .await;
    drop(dir);
}

fn postgres_base_url() -> String {
    std::env::var("CITADEL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// An admin connection to the test server, or `None` (after a loud message) when it is
/// unreachable outside CI. In CI an unreachable server fails the test.
async fn postgres_admin() -> Option<(String, AnyPool)> {
    sqlx::any::install_default_drivers();
    let base = postgres_base_url();
    let admin = AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&base)
        .await;
    match admin {
        Ok(pool) => Some((base, pool)),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("PostgreSQL not reachable at {base} (CI is set): {e}")
        }
        Err(e) => {
            eprintln!(
                "SKIPPED: PostgreSQL not reachable at {base} ({e}); \
                 set CITADEL_TEST_POSTGRES_URL to run the PostgreSQL conformance tests"
            );
            None
        }
    }
}

fn random_schema_name() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut bytes).unwrap();
    format!("citadel_test_{}", hex::encode(bytes))
}

fn url_with_search_path(base: &str, schema: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

async fn with_postgres<F, Fut>(body: F)
where
    F: FnOnce(Backend) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some((base, admin)) = postgres_admin().await else {
        return;
    };
    let schema = random_schema_name();
    admin
        .execute(format!("CREATE SCHEMA {schema}").as_str())
        .await
        .unwrap();
    let url = url_with_search_path(&base, &schema);
    let outcome = match connect(&url).await {
        Ok(store) => {
            // Run the body as its own task so a failing assertion still lets us drop the schema.
            tokio::spawn(body(Backend {
                store,
                url: Some(url),
                memory: None,
            }))
            .await
            .map_err(|e| match e.try_into_panic() {
                Ok(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "test body panicked".to_string()),
                Err(e) => format!("test body did not finish: {e}"),
            })
        }
        Err(e) => Err(format!("connect to the test schema failed: {e}")),
    };
    let _ = admin.execute("SET lock_timeout = '10s'").await;
    if let Err(e) = admin
        .execute(format!("DROP SCHEMA {schema} CASCADE").as_str())
        .await
    {
        eprintln!("warning: could not drop test schema {schema}: {e}");
    }
    admin.close().await;
    if let Err(message) = outcome {
        panic!("{message}");
    }
}

/// Instantiates each test body once per backend: `all` bodies on every backend, `sql` bodies
/// on SQLite and PostgreSQL only.
macro_rules! conformance {
    (all: [$($all:ident),* $(,)?], sql: [$($sql:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $all() { super::with_sqlite(super::$all).await })*
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $sql() { super::with_sqlite(super::$sql).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $all() { super::with_postgres(super::$all).await })*
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $sql() { super::with_postgres(super::$sql).await })*
        }
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $all() { super::with_memory(super::$all).await })*
        }
    };
}

conformance! {
    all: [
        ping_answers,
        authority_insert_and_list_round_trip,
        duplicate_authority_id_is_a_conflict,
        at_most_one_active_authority,
        activating_retires_the_previous_active,
        unknown_authority_id_is_not_found,
        authority_state_changes_persist,
        append_chains_from_genesis,
        empty_append_writes_nothing,
        append_batch_is_all_or_nothing,
        ledger_verify_detects_edited_row,
        ledger_verify_detects_deleted_middle_row,
        ledger_verify_detects_deleted_last_row,
        group_commit_of_200_concurrent_records_is_one_valid_chain,
        ledger_filters_select_by_spiffe_id_authority_live_at_and_limit,
        live_counts_only_count_unexpired_certificates,
        join_token_round_trips_and_find_changes_nothing,
        duplicate_join_token_is_a_conflict,
        join_token_is_single_use,
        expired_join_token_is_refused,
        unknown_join_token_is_refused,
        concurrent_consumers_of_one_join_token_exactly_one_wins,
        joining_records_its_node_with_the_allowed_ids,
        join_records_token_node_and_ledger_row_together,
        failed_ledger_write_in_a_join_leaves_the_token_usable,
        join_token_of_another_node_is_a_conflict_and_writes_nothing,
        renewal_sets_pending_and_its_first_use_promotes_it,
        failed_ledger_write_in_a_renewal_leaves_the_serials_alone,
        evicted_node_refuses_every_certificate_until_it_rejoins,
        unknown_node_is_refused_and_cannot_be_evicted,
        last_seen_follows_accepted_uses_only,
        nodes_are_listed_by_name,
        bundle_sequence_bumps_on_insert_and_on_state_change,
        bundle_ack_upsert_keeps_the_highest_sequence,
        bundle_acks_are_listed_by_agent_id,
        policy_ack_upsert_keeps_the_latest_version,
        policy_acks_are_listed_by_agent_id,
        malformed_policy_version_is_refused_and_writes_nothing,
        two_holders_cannot_both_hold_a_lease,
        an_expired_lease_can_be_taken_over,
        only_the_holder_renews_or_releases_a_lease,
        concurrent_takers_of_a_lapsed_lease_exactly_one_wins,
        sealed_key_blobs_round_trip_and_are_never_replaced,
        checkpoints_keep_the_first_per_seq_and_the_latest_is_the_highest,
        ledger_head_and_row_hashes_follow_appends,
    ],
    sql: [
        ledger_verify_detects_missing_head,
        two_connections_appending_concurrently_form_one_chain,
        migrations_are_idempotent,
        upgrade_from_schema_1_starts_the_bundle_sequence_at_the_authority_count,
        upgrade_from_schema_2_takes_node_serials_from_the_ledger,
        upgrade_from_schema_3_adds_empty_policy_acks,
        upgrade_to_schema_6_adds_an_empty_lease_table,
        upgrade_from_schema_4_adds_an_empty_sealed_key_table,
        sealed_key_blobs_are_shared_by_every_connection,
        upgrade_to_schema_7_adds_an_empty_checkpoint_table,
    ],
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn authority(id: &str, state: AuthorityState, created_at: i64) -> AuthorityRecord {
    AuthorityRecord {
        id: id.to_string(),
        state,
        cert_pem: format!("-----BEGIN CERTIFICATE-----\n{id}\n-----END CERTIFICATE-----\n"),
        chain_pem: String::new(),
        root_pem: format!("-----BEGIN CERTIFICATE-----\nroot-{id}\n-----END CERTIFICATE-----\n"),
        not_before: created_at,
        not_after: created_at + 10 * 365 * 86_400,
        key_ref: format!("{id}.key"),
        created_at,
    }
}

fn issuance(n: u64) -> NewIssuance {
    NewIssuance {
        serial_hex: format!("{n:032x}"),
        spiffe_id: format!("spiffe://cluster.local/ns/default/sa/workload-{}", n % 3),
        authority_id: "a1".to_string(),
        not_before: 1_000,
        not_after: 1_000 + 86_400,
        requester: "spiffe://cluster.local/ns/citadel/sa/citadel-agent".to_string(),
        node: if n.is_multiple_of(2) {
            Some(format!("node-{n}"))
        } else {
            None
        },
        der_sha256: [(n % 251) as u8; 32],
        issued_at: 1_120 + n as i64,
    }
}

fn issuances(range: std::ops::RangeInclusive<u64>) -> Vec<NewIssuance> {
    range.map(issuance).collect()
}

// ---------------------------------------------------------------------------------------------
// Bodies: authorities
// ---------------------------------------------------------------------------------------------

async fn ping_answers(b: Backend) {
    b.store.ping().await.unwrap();
}

async fn authority_insert_and_list_round_trip(b: Backend) {
    let mut c = authority("cc", AuthorityState::Retired, 100);
    c.chain_pem = "-----BEGIN CERTIFICATE-----\nintermediate\n-----END CERTIFICATE-----\n".into();
    let a = authority("aa", AuthorityState::Active, 300);
    let bb = authority("bb", AuthorityState::Prepared, 300);
    for rec in [&a, &c, &bb] {
        b.store.insert_authority(rec).await.unwrap();
    }
    // Ordered by created_at, then id.
    assert_eq!(b.store.list_authorities().await.unwrap(), vec![c, a, bb]);
}

async fn duplicate_authority_id_is_a_conflict(b: Backend) {
    b.store
        .insert_authority(&authority("aa", AuthorityState::Prepared, 1))
        .await
        .unwrap();
    let again = b
        .store
        .insert_authority(&authority("aa", AuthorityState::Retired, 2))
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let listed = b.store.list_authorities().await.unwrap();
    assert_eq!(listed, vec![authority("aa", AuthorityState::Prepared, 1)]);
}

async fn at_most_one_active_authority(b: Backend) {
    b.store
        .insert_authority(&authority("aa", AuthorityState::Active, 1))
        .await
        .unwrap();
    let second = b
        .store
        .insert_authority(&authority("bb", AuthorityState::Active, 2))
        .await;
    assert!(matches!(second, Err(StoreError::Conflict(_))), "{second:?}");
    let listed = b.store.list_authorities().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "aa");
}

async fn activating_retires_the_previous_active(b: Backend) {
    b.store
        .insert_authority(&authority("old", AuthorityState::Active, 1))
        .await
        .unwrap();
    b.store
        .insert_authority(&authority("new", AuthorityState::Prepared, 2))
        .await
        .unwrap();
    b.store
        .set_authority_state("new", AuthorityState::Active)
        .await
        .unwrap();
    let states: Vec<(String, AuthorityState)> = b
        .store
        .list_authorities()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.id, a.state))
        .collect();
    assert_eq!(
        states,
        vec![
            ("old".to_string(), AuthorityState::Retired),
            ("new".to_string(), AuthorityState::Active),
        ]
    );
    // Re-activating the active one changes nothing.
    b.store
        .set_authority_state("new", AuthorityState::Active)
        .await
        .unwrap();
    let active = b
        .store
        .list_authorities()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.state == AuthorityState::Active)
        .count();
    assert_eq!(active, 1);
}

async fn unknown_authority_id_is_not_found(b: Backend) {
    b.store
        .insert_authority(&authority("aa", AuthorityState::Active, 1))
        .await
        .unwrap();
    for state in AuthorityState::ALL {
        let out = b.store.set_authority_state("nope", state).await;
        assert!(matches!(out, Err(StoreError::NotFound(_))), "{out:?}");
    }
    // The failed activation did not retire the active authority.
    assert_eq!(
        b.store.list_authorities().await.unwrap()[0].state,
        AuthorityState::Active
    );
}

async fn authority_state_changes_persist(b: Backend) {
    b.store
        .insert_authority(&authority("aa", AuthorityState::Active, 1))
        .await
        .unwrap();
    for state in [AuthorityState::Retired, AuthorityState::Removed] {
        b.store.set_authority_state("aa", state).await.unwrap();
        assert_eq!(b.store.list_authorities().await.unwrap()[0].state, state);
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies: ledger
// ---------------------------------------------------------------------------------------------

async fn append_chains_from_genesis(b: Backend) {
    let first = b.store.append_issuances(&issuances(1..=3)).await.unwrap();
    let second = b.store.append_issuances(&issuances(4..=5)).await.unwrap();
    let all: Vec<_> = first.into_iter().chain(second).collect();
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let mut prev = GENESIS_HASH;
    for (e, n) in all.iter().zip(1..) {
        assert_eq!(e.issuance, issuance(n));
        assert_eq!(e.prev_hash, prev);
        assert_eq!(e.row_hash, row_hash(e.seq, &prev, &e.issuance));
        prev = e.row_hash;
    }
    // What was returned is what is stored.
    assert_eq!(
        b.store
            .list_issuances(&LedgerFilter::default())
            .await
            .unwrap(),
        all
    );
    let verdict = b.store.verify_ledger().await.unwrap();
    assert_eq!(verdict.first_bad, None);
    assert_eq!(verdict.rows_checked, 5);
}

async fn empty_append_writes_nothing(b: Backend) {
    assert!(b.store.append_issuances(&[]).await.unwrap().is_empty());
    let verdict = b.store.verify_ledger().await.unwrap();
    assert!(verdict.is_valid());
    assert_eq!(verdict.rows_checked, 0);
    let next = b.store.append_issuances(&issuances(1..=1)).await.unwrap();
    assert_eq!(next[0].seq, 1);
}

async fn append_batch_is_all_or_nothing(b: Backend) {
    b.store.append_issuances(&issuances(1..=2)).await.unwrap();
    // The second row repeats serial 1 of authority a1: the whole batch must be refused.
    let batch = vec![issuance(3), issuance(1)];
    let out = b.store.append_issuances(&batch).await;
    assert!(matches!(out, Err(StoreError::Conflict(_))), "{out:?}");
    let rows = b
        .store
        .list_issuances(&LedgerFilter::default())
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "part of the failed batch was written");
    assert!(b.store.verify_ledger().await.unwrap().is_valid());
    let next = b.store.append_issuances(&issuances(3..=3)).await.unwrap();
    assert_eq!(next[0].seq, 3);
    assert_eq!(next[0].prev_hash, rows[1].row_hash);
}

async fn ledger_verify_detects_edited_row(b: Backend) {
    b.store.append_issuances(&issuances(1..=5)).await.unwrap();
    b.tamper_spiffe_id(3, "spiffe://cluster.local/ns/evil/sa/evil")
        .await;
    let fault = b.store.verify_ledger().await.unwrap().first_bad.unwrap();
    assert_eq!(fault.seq, 3);
    assert_eq!(fault.reason, "row hash does not match its contents");
}

async fn ledger_verify_detects_deleted_middle_row(b: Backend) {
    b.store.append_issuances(&issuances(1..=5)).await.unwrap();
    b.tamper_delete(3).await;
    let fault = b.store.verify_ledger().await.unwrap().first_bad.unwrap();
    assert_eq!(fault.seq, 4);
    assert_eq!(fault.reason, "sequence gap: expected 3, found 4");
}

async fn ledger_verify_detects_deleted_last_row(b: Backend) {
    b.store.append_issuances(&issuances(1..=5)).await.unwrap();
    b.tamper_delete(5).await;
    let verdict = b.store.verify_ledger().await.unwrap();
    assert_eq!(verdict.rows_checked, 4);
    let fault = verdict.first_bad.unwrap();
    assert_eq!(fault.seq, 5);
    assert_eq!(fault.reason, "head records seq 5 but the last row is 4");
}

async fn ledger_verify_detects_missing_head(b: Backend) {
    b.store.append_issuances(&issuances(1..=2)).await.unwrap();
    b.raw_sql("DELETE FROM ledger_head").await;
    let fault = b.store.verify_ledger().await.unwrap().first_bad.unwrap();
    assert!(fault.reason.contains("head"), "{fault}");
    // Appending without a head is refused rather than starting a second chain.
    let out = b.store.append_issuances(&issuances(3..=3)).await;
    assert!(matches!(out, Err(StoreError::Corrupt(_))), "{out:?}");
}

async fn group_commit_of_200_concurrent_records_is_one_valid_chain(b: Backend) {
    let ledger = GroupCommitLedger::spawn(b.store.clone(), 64);
    let tasks: Vec<_> = (1..=200)
        .map(|n| {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.record(issuance(n)).await })
        })
        .collect();
    let mut seqs = Vec::new();
    for task in tasks {
        let entry = task.await.unwrap().unwrap();
        seqs.push(entry.seq);
    }
    seqs.sort();
    assert_eq!(seqs, (1..=200).collect::<Vec<i64>>());
    let rows = b
        .store
        .list_issuances(&LedgerFilter::default())
        .await
        .unwrap();
    assert_eq!(rows.len(), 200);
    let verdict = b.store.verify_ledger().await.unwrap();
    assert_eq!(verdict.first_bad, None);
    assert_eq!(verdict.rows_checked, 200);
}

async fn ledger_filters_select_by_spiffe_id_authority_live_at_and_limit(b: Backend) {
    let mk = |n: u64, spiffe: &str, auth: &str, nb: i64, na: i64| NewIssuance {
        spiffe_id: spiffe.to_string(),
        authority_id: auth.to_string(),
        not_before: nb,
        not_after: na,
        ..issuance(n)
    };
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let db = "spiffe://cluster.local/ns/shop/sa/db";
    let batch = vec![
        mk(1, web, "a1", 100, 200),
        mk(2, db, "a1", 150, 250),
        mk(3, web, "a2", 200, 300),
        mk(4, web, "a2", 250, 350),
    ];
    b.store.append_issuances(&batch).await.unwrap();
    let seqs = |filter: LedgerFilter| {
        let store = b.store.clone();
        async move {
            store
                .list_issuances(&filter)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.seq)
                .collect::<Vec<i64>>()
        }
    };
    assert_eq!(seqs(LedgerFilter::default()).await, [1, 2, 3, 4]);
    assert_eq!(
        seqs(LedgerFilter {
            spiffe_id: Some(web.into()),
            ..Default::default()
        })
        .await,
        [1, 3, 4]
    );
    assert_eq!(
        seqs(LedgerFilter {
            authority_id: Some("a2".into()),
            ..Default::default()
        })
        .await,
        [3, 4]
    );
    // Live at t: not_before <= t < not_after.
    assert_eq!(
        seqs(LedgerFilter {
            live_at: Some(200),
            ..Default::default()
        })
        .await,
        [2, 3]
    );
    assert_eq!(
        seqs(LedgerFilter {
            live_at: Some(99),
            ..Default::default()
        })
        .await,
        Vec::<i64>::new()
    );
    assert_eq!(
        seqs(LedgerFilter {
            limit: Some(2),
            ..Default::default()
        })
        .await,
        [1, 2]
    );
    assert_eq!(
        seqs(LedgerFilter {
            spiffe_id: Some(web.into()),
            authority_id: Some("a2".into()),
            live_at: Some(260),
            limit: Some(1),
        })
        .await,
        [3]
    );
    assert_eq!(
        seqs(LedgerFilter {
            spiffe_id: Some("spiffe://cluster.local/ns/shop/sa/nobody".into()),
            ..Default::default()
        })
        .await,
        Vec::<i64>::new()
    );
}

async fn live_counts_only_count_unexpired_certificates(b: Backend) {
    let mk = |n: u64, auth: &str, not_after: i64| NewIssuance {
        authority_id: auth.to_string(),
        not_after,
        ..issuance(n)
    };
    let batch = vec![
        mk(1, "a1", 500),
        mk(2, "a1", 1_500),
        mk(3, "a1", 2_000),
        mk(4, "a2", 999),
        mk(5, "a2", 1_000),
        mk(6, "a3", 5_000),
    ];
    b.store.append_issuances(&batch).await.unwrap();
    assert_eq!(
        b.store.live_counts_by_authority(1_000).await.unwrap(),
        vec![("a1".to_string(), 2), ("a3".to_string(), 1)]
    );
    assert_eq!(
        b.store.live_counts_by_authority(0).await.unwrap(),
        vec![
            ("a1".to_string(), 3),
            ("a2".to_string(), 2),
            ("a3".to_string(), 1)
        ]
    );
    assert!(
        b.store
            .live_counts_by_authority(5_000)
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// Bodies: join tokens and nodes
// ---------------------------------------------------------------------------------------------

const NOW: i64 = 1_000_000;

fn join_token(n: u8, node: &str, allowed: &[&str], expires_at: i64) -> JoinTokenRecord {
    JoinTokenRecord {
        token_sha256: [n; 32],
        node_name: node.to_string(),
        allowed_ids: allowed.iter().map(|s| s.to_string()).collect(),
        created_at: NOW - 60,
        expires_at,
        used_at: None,
    }
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

/// A node certificate for `node` with serial `n` (notAfter 100 000 + n).
fn node_cert(n: u64, node: &str) -> NewIssuance {
    let id = format!("spiffe://cluster.local/citadel/node/{node}");
    NewIssuance {
        serial_hex: format!("{n:032x}"),
        spiffe_id: id.clone(),
        authority_id: "a1".to_string(),
        not_before: 1_000,
        not_after: 100_000 + n as i64,
        requester: id,
        node: Some(node.to_string()),
        der_sha256: [(n % 251) as u8; 32],
        issued_at: NOW,
    }
}

fn serial(n: u64) -> String {
    format!("{n:032x}")
}

/// Joins `node` with token `[token; 32]` and node certificate `cert` at `now`.
async fn join(
    b: &Backend,
    token: u8,
    node: &str,
    cert: u64,
    now: i64,
) -> Result<NodeIssuanceOutcome, StoreError> {
    b.store
        .append_node_issuance(
            node,
            &NodeGrant::Join {
                token_sha256: [token; 32],
            },
            &node_cert(cert, node),
            now,
        )
        .await
}

/// Renews `node`'s certificate `presented` with new certificate `cert` at `now`.
async fn renew(
    b: &Backend,
    node: &str,
    presented: u64,
    cert: u64,
    now: i64,
) -> Result<NodeIssuanceOutcome, StoreError> {
    b.store
        .append_node_issuance(
            node,
            &NodeGrant::Renewal {
                presented_serial: serial(presented),
            },
            &node_cert(cert, node),
            now,
        )
        .await
}

fn recorded(outcome: Result<NodeIssuanceOutcome, StoreError>) -> LedgerEntry {
    match outcome {
        Ok(NodeIssuanceOutcome::Recorded(entry)) => *entry,
        other => panic!("expected a recorded issuance, got {other:?}"),
    }
}

async fn use_cert(b: &Backend, node: &str, cert: u64, now: i64) -> NodeCertificateUse {
    b.store
        .use_node_certificate(node, &serial(cert), now)
        .await
        .unwrap()
}

async fn node(b: &Backend, name: &str) -> NodeRecord {
    b.store
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("node {name} is not listed"))
}

async fn ledger_rows(b: &Backend) -> Vec<LedgerEntry> {
    b.store
        .list_issuances(&LedgerFilter::default())
        .await
        .unwrap()
}

async fn token_used_at(b: &Backend, token: u8) -> Option<i64> {
    b.store
        .find_join_token(&[token; 32])
        .await
        .unwrap()
        .unwrap()
        .used_at
}

async fn join_token_round_trips_and_find_changes_nothing(b: Backend) {
    let rec = join_token(1, "node-a", &[WEB, DB], NOW + 3600);
    b.store.insert_join_token(&rec).await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            b.store.find_join_token(&[1; 32]).await.unwrap(),
            Some(rec.clone())
        );
    }
    assert_eq!(b.store.find_join_token(&[2; 32]).await.unwrap(), None);
    assert_eq!(b.store.node_allowed_ids("node-a").await.unwrap(), None);
    // Still usable: finding it did not use it.
    recorded(join(&b, 1, "node-a", 1, NOW).await);
}

async fn duplicate_join_token_is_a_conflict(b: Backend) {
    let rec = join_token(1, "node-a", &[WEB], NOW + 3600);
    b.store.insert_join_token(&rec).await.unwrap();
    let again = b
        .store
        .insert_join_token(&join_token(1, "node-b", &[DB], NOW + 60))
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(b.store.find_join_token(&[1; 32]).await.unwrap(), Some(rec));
}

async fn join_token_is_single_use(b: Backend) {
    let rec = join_token(1, "node-a", &[WEB], NOW + 3600);
    b.store.insert_join_token(&rec).await.unwrap();
    recorded(join(&b, 1, "node-a", 1, NOW).await);
    assert_eq!(token_used_at(&b, 1).await, Some(NOW));
    let second = join(&b, 1, "node-a", 2, NOW + 1).await.unwrap();
    assert_eq!(
        second,
        NodeIssuanceOutcome::TokenRefused(JoinTokenRefusal::AlreadyUsed)
    );
    // The refusal changed nothing: used_at is still the first use, one ledger row, the node
    // keeps its first certificate.
    assert_eq!(token_used_at(&b, 1).await, Some(NOW));
    assert_eq!(ledger_rows(&b).await.len(), 1);
    assert_eq!(node(&b, "node-a").await.current_serial, Some(serial(1)));
}

async fn expired_join_token_is_refused(b: Backend) {
    b.store
        .insert_join_token(&join_token(1, "node-a", &[WEB], NOW))
        .await
        .unwrap();
    // expires_at is the first instant at which the token is refused.
    assert_eq!(
        join(&b, 1, "node-a", 1, NOW).await.unwrap(),
        NodeIssuanceOutcome::TokenRefused(JoinTokenRefusal::Expired)
    );
    assert_eq!(token_used_at(&b, 1).await, None);
    assert_eq!(b.store.node_allowed_ids("node-a").await.unwrap(), None);
    assert!(ledger_rows(&b).await.is_empty());
}

async fn unknown_join_token_is_refused(b: Backend) {
    b.store
        .insert_join_token(&join_token(1, "node-a", &[WEB], NOW + 60))
        .await
        .unwrap();
    assert_eq!(
        join(&b, 9, "node-a", 1, NOW).await.unwrap(),
        NodeIssuanceOutcome::TokenRefused(JoinTokenRefusal::Unknown)
    );
    assert_eq!(b.store.node_allowed_ids("node-a").await.unwrap(), None);
    assert!(ledger_rows(&b).await.is_empty());
}

async fn concurrent_consumers_of_one_join_token_exactly_one_wins(b: Backend) {
    b.store
        .insert_join_token(&join_token(1, "node-a", &[WEB], NOW + 60))
        .await
        .unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let store = b.store.clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                store
                    .append_node_issuance(
                        "node-a",
                        &NodeGrant::Join {
                            token_sha256: [1; 32],
                        },
                        &node_cert(i + 1, "node-a"),
                        NOW + i as i64,
                    )
                    .await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap().unwrap() {
            NodeIssuanceOutcome::Recorded(entry) => winners.push(*entry),
            NodeIssuanceOutcome::TokenRefused(r) => assert_eq!(r, JoinTokenRefusal::AlreadyUsed),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one consumer must win");
    // Exactly the winner's certificate is in the ledger and recorded for the node.
    let rows = ledger_rows(&b).await;
    assert_eq!(rows, winners);
    assert_eq!(
        node(&b, "node-a").await.current_serial,
        Some(winners[0].issuance.serial_hex.clone())
    );
    assert!(b.store.verify_ledger().await.unwrap().is_valid());
}

async fn joining_records_its_node_with_the_allowed_ids(b: Backend) {
    b.store
        .insert_join_token(&join_token(1, "node-a", &[WEB, DB], NOW + 60))
        .await
        .unwrap();
    b.store
        .insert_join_token(&join_token(2, "node-a", &[DB], NOW + 60))
        .await
        .unwrap();
    recorded(join(&b, 1, "node-a", 1, NOW).await);
    assert_eq!(
        b.store.node_allowed_ids("node-a").await.unwrap(),
        Some(vec![WEB.to_string(), DB.to_string()])
    );
    assert_eq!(b.store.node_allowed_ids("node-b").await.unwrap(), None);
    // A node that joins again gets the new token's list, not a merge.
    recorded(join(&b, 2, "node-a", 2, NOW + 5).await);
    assert_eq!(
        b.store.node_allowed_ids("node-a").await.unwrap(),
        Some(vec![DB.to_string()])
    );
}

async fn join_records_token_node_and_ledger_row_together(b: Backend) {
    b.store
        .insert_join_token(&join_token(1, "node-a", &[WEB], NOW + 60))
        .await
        .unwrap();
    // Another issuance first: the join's row chains onto it.
    b.store.append_issuances(&issuances(1..=1)).await.unwrap();
    let entry = recorded(join(&b, 1, "node-a", 7, NOW).await);
    assert_eq!(entry.seq, 2);
    assert_eq!(entry.issuance, node_cert(7, "node-a"));
    assert_eq!(ledger_rows(&b).await.last(), Some(&entry));
    assert!(b.store.verify_ledger().await.unwrap().is_valid());
    assert_eq!(token_used_at(&b, 1).await, Some(NOW));
    assert_eq!(
        b.store.list_nodes().await.unwrap(),
        vec![NodeRecord {
            name: "node-a".into(),
            allowed_ids: vec![WEB.to_string()],
            joined_at: NOW,
            current_serial: Some(serial(7)),
            current_not_after: Some(100_007),
            pending_serial: None,
            pending_not_after: None,
            last_seen: Some(NOW),
            evicted_at: None,
        }]
    );
}

async fn failed_ledger_write_in_a_join_leaves_the_token_usable(b: Backend) {
    b.store
        .insert_join_token(&join_token(1, "node-a", &[WEB], NOW + 60))
        .await
        .unwrap();
    // A row with the serial the join will repeat: the join's ledger insert fails inside its
    // transaction, after the token was claimed and the node written.
    let mut clash = issuance(1);
    clash.serial_hex = serial(5);
    b.store.append_issuances(&[clash]).await.unwrap();
    let out = join(&b, 1, "node-a", 5, NOW).await;
    assert!(matches!(out, Err(StoreError::Conflict(_))), "{out:?}");
    assert_eq!(token_used_at(&b, 1).await, None, "the token was spent");
    assert_eq!(b.store.node_allowed_ids("node-a").await.unwrap(), None);
    assert!(b.store.list_nodes().await.unwrap().is_empty());
    assert_eq!(ledger_rows(&b).await.len(), 1);
    // The same token works once the ledger does.
    let entry = recorded(join(&b, 1, "node-a", 6, NOW + 1).await);
    assert_eq!(entry.seq, 2);
    assert!(b.store.verify_ledger().await.unwrap().is_valid());
}

async fn join_token_of_another_node_is_a_conflict_and_writes_nothing(b: Backend) {
    b.store
        .insert_join_token(&join_token(1, "node-a", &[WEB], NOW + 60))
        .await
        .unwrap();
    let out = join(&b, 1, "node-b", 1, NOW).await;
    assert!(matches!(out, Err(StoreError::Conflict(_))), "{out:?}");
    assert_eq!(token_used_at(&b, 1).await, None);
    assert!(b.store.list_nodes().await.unwrap().is_empty());
    assert!(ledger_rows(&b).await.is_empty());
}

async fn renewal_sets_pending_and_its_first_use_promotes_it(b: Backend) {
    b.store
        .insert_join_token(&join_token(1, "node-a", &[WEB], NOW + 60))
        .await
        .unwrap();
    recorded(join(&b, 1, "node-a", 1, NOW).await);
    assert_eq!(
        use_cert(&b, "node-a", 1, NOW + 1).await,
        NodeCertificateUse::Accepted(NodeCertificateRole::Current)
    );
    let entry = recorded(renew(&b, "node-a", 1, 2, NOW + 2).await);
    assert_eq!(entry.issuance.serial_hex, serial(2));
    let n = node(&b, "node-a").await;
    assert_eq!(n.current_serial, Some(serial(1)));
    assert_eq!(n.pending_serial, Some(serial(2)));
    assert_eq!(n.pending_not_after, Some(100_002));
    // The renewal's answer may have been lost: the old certificate still works ...
    assert_eq!(
        use_cert(&b, "node-a", 1, NOW + 3).await,
        NodeCertificateUse::Accepted(NodeCertificateRole::Current)
    );
    // ... until the new one is used, which makes it current.
    assert_eq!(
        use_cert(&b, "node-a", 2, NOW + 4).await,
        NodeCertificateUse::Accepted(NodeCertificateRole::Pending)
    );
    let n = node(&b, "node-a").await;
    assert_eq!(n.current_serial, Some(serial(2)));
    assert_eq!(n.current_not_after, Some(100_002));
    assert_eq!(n.pending_serial, None);
    assert_eq!(n.pending_not_after, None);
    assert_eq!(
        use_cert(&b, "node-a", 2, NOW + 5).await,
        NodeCertificateUse::Accepted(NodeCertificateRole::Current)
    );
    // The old one is superseded: refused for use and for renewal, which writes nothing.
    assert_eq!(
        use_cert(&b, "node-a", 1, NOW + 6).await,
        NodeCertificateUse::Refused(NodeRefusal::Superseded)
    );
    let rows = ledger_rows(&b).await.len();
    assert_eq!(
        renew(&b, "node-a", 1, 3, NOW + 7).await.unwrap(),
        NodeIssuanceOutcome::NodeRefused(NodeRefusal::Superseded)
    );
    assert_eq!(ledger_rows(&b).await.len(), rows);
    assert_eq!(node(&b, "node-a").await.pending_serial, None);
    // A second renewal replaces an unused pending certificate: only the newest is pending.
    recorded(renew(&b, "node-a", 2, 3, NOW + 8).await);
    recorded(renew(&b, "node-a", 2, 4, NOW + 9).await);
    assert_eq!(
        use_cert(&b, "node-a", 3, NOW + 10).await,
        NodeCertificateUse::Refused(NodeRefusal::Superseded)
    );
    assert_eq!(
        use_cert(&b, "node-a", 4, NOW + 11).await,
        NodeCertificateUse::Accepted(NodeCertificateRole::Pending)
    );
    assert!(b.store.verify_ledger().await.unwrap().is_valid());
}

async fn failed_ledger_write_in_a_renewal_leaves_the_serials_alone(b: Backend) {
    b.store
        .insert_join_token(&join_token(1, "node-a", &[WEB], NOW + 60))
        .await
        .unwrap();
    recorded(join(&b, 1, "node-a", 1, NOW).await);
    let before = node(&b, "node-a").await;
    // Certificate 1's serial again: the ledger insert fails inside the renewal's transaction.
    let out = renew(&b, "node-a", 1, 1, NOW + 1).await;
    assert!(matches!(out, Err(StoreError::Conflict(_))), "{out:?}");
    assert_eq!(node(&b, "node-a").await, before);
    assert_eq!(ledger_rows(&b).await.len(), 1);
}

async fn evicted_node_refuses_every_certificate_until_it_rejoins(b: Backend) {
    for token in [1, 2] {
        b.store
            .insert_join_token(&join_token(token, "node-a", &[WEB], NOW + 60))
            .await
            .unwrap();
    }
    recorded(join(&b, 1, "node-a", 1, NOW).await);
    recorded(renew(&b, "node-a", 1, 2, NOW + 1).await);
    assert!(b.store.evict_node("node-a", NOW + 2).await.unwrap());
    // Evicting again is a no-op that keeps the first time.
    assert!(!b.store.evict_node("node-a", NOW + 3).await.unwrap());
    let n = node(&b, "node-a").await;
    assert_eq!(n.evicted_at, Some(NOW + 2));
    assert_eq!(n.state(), "evicted");
    for cert in [1, 2] {
        assert_eq!(
            use_cert(&b, "node-a", cert, NOW + 4).await,
            NodeCertificateUse::Refused(NodeRefusal::Evicted)
        );
        assert_eq!(
            renew(&b, "node-a", cert, 10 + cert, NOW + 4).await.unwrap(),
            NodeIssuanceOutcome::NodeRefused(NodeRefusal::Evicted)
        );
    }
    assert_eq!(ledger_rows(&b).await.len(), 2);
    // A refused use is not a sign of life.
    assert_eq!(node(&b, "node-a").await.last_seen, Some(NOW + 1));
    // A new token re-admits the node with a fresh certificate; the old ones stay refused.
    recorded(join(&b, 2, "node-a", 3, NOW + 5).await);
    let n = node(&b, "node-a").await;
    assert_eq!(n.evicted_at, None);
    assert_eq!(n.state(), "active");
    assert_eq!(n.current_serial, Some(serial(3)));
    assert_eq!(n.pending_serial, None);
    for cert in [1, 2] {
        assert_eq!(
            use_cert(&b, "node-a", cert, NOW + 6).await,
            NodeCertificateUse::Refused(NodeRefusal::Superseded)
        );
    }
    assert_eq!(
        use_cert(&b, "node-a", 3, NOW + 6).await,
        NodeCertificateUse::Accepted(NodeCertificateRole::Current)
    );
}

async fn unknown_node_is_refused_and_cannot_be_evicted(b: Backend) {
    assert_eq!(
        use_cert(&b, "nope", 1, NOW).await,
        NodeCertificateUse::Refused(NodeRefusal::Unknown)
    );
    assert_eq!(
        renew(&b, "nope", 1, 2, NOW).await.unwrap(),
        NodeIssuanceOutcome::NodeRefused(NodeRefusal::Unknown)
    );
    let out = b.store.evict_node("nope", NOW).await;
    assert!(matches!(out, Err(StoreError::NotFound(_))), "{out:?}");
    assert!(b.store.list_nodes().await.unwrap().is_empty());
    assert!(ledger_rows(&b).await.is_empty());
}

async fn last_seen_follows_accepted_uses_only(b: Backend) {
    b.store
        .insert_join_token(&join_token(1, "node-a", &[WEB], NOW + 60))
        .await
        .unwrap();
    recorded(join(&b, 1, "node-a", 1, NOW).await);
    assert_eq!(node(&b, "node-a").await.last_seen, Some(NOW));
    // Within the granularity a use is accepted without a write.
    use_cert(&b, "node-a", 1, NOW + 10).await;
    assert_eq!(node(&b, "node-a").await.last_seen, Some(NOW));
    let later = NOW + LAST_SEEN_GRANULARITY_SECS;
    use_cert(&b, "node-a", 1, later).await;
    assert_eq!(node(&b, "node-a").await.last_seen, Some(later));
    assert_eq!(
        use_cert(&b, "node-a", 99, later + 100).await,
        NodeCertificateUse::Refused(NodeRefusal::Superseded)
    );
    assert_eq!(node(&b, "node-a").await.last_seen, Some(later));
}

async fn nodes_are_listed_by_name(b: Backend) {
    assert!(b.store.list_nodes().await.unwrap().is_empty());
    for (token, name, allowed) in [(1, "node-c", WEB), (2, "node-a", DB), (3, "node-b", WEB)] {
        b.store
            .insert_join_token(&join_token(token, name, &[allowed], NOW + 60))
            .await
            .unwrap();
        recorded(join(&b, token, name, u64::from(token), NOW).await);
    }
    let listed: Vec<(String, Vec<String>)> = b
        .store
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.name, n.allowed_ids))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("node-a".to_string(), vec![DB.to_string()]),
            ("node-b".to_string(), vec![WEB.to_string()]),
            ("node-c".to_string(), vec![WEB.to_string()]),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Bodies: trust-bundle sequence and acknowledgements
// ---------------------------------------------------------------------------------------------

async fn bundle_sequence_bumps_on_insert_and_on_state_change(b: Backend) {
    let seq = || {
        let store = b.store.clone();
        async move { store.bundle_sequence().await.unwrap() }
    };
    assert_eq!(seq().await, 0);
    b.store
        .insert_authority(&authority("aa", AuthorityState::Active, 1))
        .await
        .unwrap();
    let after_insert = seq().await;
    assert!(after_insert >= 1);
    b.store
        .insert_authority(&authority("bb", AuthorityState::Prepared, 2))
        .await
        .unwrap();
    let after_prepare = seq().await;
    assert!(after_prepare > after_insert);
    b.store
        .set_authority_state("bb", AuthorityState::Active)
        .await
        .unwrap();
    let after_activate = seq().await;
    assert!(after_activate > after_prepare);
    // Refused writes and no-ops change nothing.
    assert!(
        b.store
            .insert_authority(&authority("aa", AuthorityState::Prepared, 3))
            .await
            .is_err()
    );
    assert!(
        b.store
            .set_authority_state("nope", AuthorityState::Retired)
            .await
            .is_err()
    );
    b.store
        .set_authority_state("bb", AuthorityState::Active)
        .await
        .unwrap();
    assert_eq!(seq().await, after_activate);
    b.store
        .set_authority_state("aa", AuthorityState::Removed)
        .await
        .unwrap();
    assert!(seq().await > after_activate);
}

async fn bundle_ack_upsert_keeps_the_highest_sequence(b: Backend) {
    let agent = "spiffe://cluster.local/citadel/node/node-a";
    let ack = |sequence: u64, acked_at: i64| BundleAck {
        agent_id: agent.to_string(),
        sequence,
        acked_at,
    };
    b.store.record_bundle_ack(agent, 3, NOW).await.unwrap();
    assert_eq!(b.store.list_bundle_acks().await.unwrap(), vec![ack(3, NOW)]);
    b.store.record_bundle_ack(agent, 5, NOW + 1).await.unwrap();
    assert_eq!(
        b.store.list_bundle_acks().await.unwrap(),
        vec![ack(5, NOW + 1)]
    );
    // An older acknowledgement keeps the higher sequence but counts as a sign of life.
    b.store.record_bundle_ack(agent, 4, NOW + 2).await.unwrap();
    assert_eq!(
        b.store.list_bundle_acks().await.unwrap(),
        vec![ack(5, NOW + 2)]
    );
    let out = b.store.record_bundle_ack(agent, u64::MAX, NOW + 3).await;
    assert!(matches!(out, Err(StoreError::Conflict(_))), "{out:?}");
    assert_eq!(
        b.store.list_bundle_acks().await.unwrap(),
        vec![ack(5, NOW + 2)]
    );
}

async fn bundle_acks_are_listed_by_agent_id(b: Backend) {
    assert!(b.store.list_bundle_acks().await.unwrap().is_empty());
    for (agent, seq) in [
        ("spiffe://td/c", 1),
        ("spiffe://td/a", 2),
        ("spiffe://td/b", 3),
    ] {
        b.store.record_bundle_ack(agent, seq, NOW).await.unwrap();
    }
    let listed: Vec<(String, u64)> = b
        .store
        .list_bundle_acks()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.agent_id, a.sequence))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("spiffe://td/a".to_string(), 2),
            ("spiffe://td/b".to_string(), 3),
            ("spiffe://td/c".to_string(), 1),
        ]
    );
}

async fn policy_ack_upsert_keeps_the_latest_version(b: Backend) {
    let agent = "spiffe://cluster.local/citadel/node/node-a";
    let ack = |version: &str, acked_at: i64| PolicyAck {
        agent_id: agent.to_string(),
        version: version.to_string(),
        acked_at,
    };
    let (v1, v2) = ("a".repeat(64), "b".repeat(64));
    assert!(b.store.list_policy_acks().await.unwrap().is_empty());
    b.store.record_policy_ack(agent, &v2, NOW).await.unwrap();
    assert_eq!(
        b.store.list_policy_acks().await.unwrap(),
        vec![ack(&v2, NOW)]
    );
    // Versions are hashes, not ordered: the latest acknowledgement wins even when it sorts lower.
    b.store
        .record_policy_ack(agent, &v1, NOW + 1)
        .await
        .unwrap();
    assert_eq!(
        b.store.list_policy_acks().await.unwrap(),
        vec![ack(&v1, NOW + 1)]
    );
    // Bundle acknowledgements are a separate record.
    assert!(b.store.list_bundle_acks().await.unwrap().is_empty());
}

async fn policy_acks_are_listed_by_agent_id(b: Backend) {
    for (agent, version) in [
        ("spiffe://td/c", "c1"),
        ("spiffe://td/a", "a1"),
        ("spiffe://td/b", "b1"),
    ] {
        b.store
            .record_policy_ack(agent, version, NOW)
            .await
            .unwrap();
    }
    let listed: Vec<(String, String)> = b
        .store
        .list_policy_acks()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.agent_id, a.version))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("spiffe://td/a".to_string(), "a1".to_string()),
            ("spiffe://td/b".to_string(), "b1".to_string()),
            ("spiffe://td/c".to_string(), "c1".to_string()),
        ]
    );
}

async fn malformed_policy_version_is_refused_and_writes_nothing(b: Backend) {
    let agent = "spiffe://td/a";
    b.store.record_policy_ack(agent, "v1", NOW).await.unwrap();
    for bad in [
        String::new(),
        "x".repeat(MAX_POLICY_VERSION_LEN + 1),
        "v 2".into(),
        "v\n2".into(),
    ] {
        let out = b.store.record_policy_ack(agent, &bad, NOW + 1).await;
        assert!(
            matches!(out, Err(StoreError::Conflict(_))),
            "{bad:?}: {out:?}"
        );
    }
    let listed = b.store.list_policy_acks().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].version.as_str(), listed[0].acked_at),
        ("v1", NOW)
    );
}

// ---------------------------------------------------------------------------------------------
// Bodies: SQL only
// ---------------------------------------------------------------------------------------------

async fn two_connections_appending_concurrently_form_one_chain(b: Backend) {
    // Two replicas: separate `connect`s, separate pools and writer tasks, one database.
    let replica_a = b.store.clone();
    let replica_b = connect(b.url()).await.unwrap();
    let ledgers = [
        GroupCommitLedger::spawn(replica_a.clone(), 8),
        GroupCommitLedger::spawn(replica_b.clone(), 8),
    ];
    let mut tasks = Vec::new();
    for n in 1..=120u64 {
        let ledger = ledgers[(n % 2) as usize].clone();
        tasks.push(tokio::spawn(
            async move { ledger.record(issuance(n)).await },
        ));
    }
    // And direct batch appends from both replicas at the same time.
    for (i, store) in [replica_a.clone(), replica_b.clone()]
        .into_iter()
        .enumerate()
    {
        let base = 1_000 + 100 * i as u64;
        tasks.push(tokio::spawn(async move {
            let batch = issuances(base + 1..=base + 5);
            let entries = store.append_issuances(&batch).await?;
            Ok(entries[0].clone())
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    for store in [&replica_a, &replica_b] {
        let rows = store
            .list_issuances(&LedgerFilter::default())
            .await
            .unwrap();
        assert_eq!(
            rows.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=130).collect::<Vec<i64>>()
        );
        let verdict = store.verify_ledger().await.unwrap();
        assert_eq!(verdict.first_bad, None);
        assert_eq!(verdict.rows_checked, 130);
    }
}

async fn migrations_are_idempotent(b: Backend) {
    b.store
        .insert_authority(&authority("aa", AuthorityState::Active, 1))
        .await
        .unwrap();
    b.store.append_issuances(&issuances(1..=2)).await.unwrap();
    for _ in 0..2 {
        let again = connect(b.url()).await.unwrap();
        assert_eq!(again.list_authorities().await.unwrap().len(), 1);
        assert_eq!(
            again
                .list_issuances(&LedgerFilter::default())
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(again.verify_ledger().await.unwrap().is_valid());
        assert_eq!(again.bundle_sequence().await.unwrap(), 1);
    }
}

async fn upgrade_from_schema_1_starts_the_bundle_sequence_at_the_authority_count(b: Backend) {
    for (id, at) in [("aa", 1), ("bb", 2)] {
        b.store
            .insert_authority(&authority(id, AuthorityState::Prepared, at))
            .await
            .unwrap();
    }
    // Back to schema version 1, as a database written by the previous release.
    b.raw_sql(
        "DROP TABLE join_tokens; DROP TABLE nodes; DROP TABLE bundle_state; \
         DROP TABLE bundle_acks; DROP TABLE policy_acks; DROP TABLE sealed_keys; DROP TABLE leases; \
         DROP TABLE ledger_checkpoints; DELETE FROM _sqlx_migrations WHERE version >= 2",
    )
    .await;
    let upgraded = connect(b.url()).await.unwrap();
    assert_eq!(upgraded.bundle_sequence().await.unwrap(), 2);
    upgraded
        .set_authority_state("aa", AuthorityState::Active)
        .await
        .unwrap();
    assert_eq!(upgraded.bundle_sequence().await.unwrap(), 3);
}

async fn upgrade_from_schema_3_adds_empty_policy_acks(b: Backend) {
    b.store
        .record_bundle_ack("spiffe://td/a", 2, NOW)
        .await
        .unwrap();
    // Back to schema version 3, as a database written by the previous release.
    b.raw_sql("DROP TABLE policy_acks; DELETE FROM _sqlx_migrations WHERE version = 4")
        .await;
    let upgraded = connect(b.url()).await.unwrap();
    assert!(upgraded.list_policy_acks().await.unwrap().is_empty());
    assert_eq!(upgraded.list_bundle_acks().await.unwrap().len(), 1);
    upgraded
        .record_policy_ack("spiffe://td/a", "v1", NOW)
        .await
        .unwrap();
    assert_eq!(upgraded.list_policy_acks().await.unwrap().len(), 1);
}

async fn upgrade_to_schema_6_adds_an_empty_lease_table(b: Backend) {
    assert!(
        b.store
            .acquire_lease(LEASE, "a", NOW, NOW + 10)
            .await
            .unwrap()
    );
    // Back to the schema before leases, as a database written by the previous release.
    b.raw_sql("DROP TABLE leases; DELETE FROM _sqlx_migrations WHERE version = 6")
        .await;
    let upgraded = connect(b.url()).await.unwrap();
    assert_eq!(upgraded.get_lease(LEASE).await.unwrap(), None);
    assert!(
        upgraded
            .acquire_lease(LEASE, "b", NOW, NOW + 10)
            .await
            .unwrap()
    );
}

async fn upgrade_from_schema_4_adds_an_empty_sealed_key_table(b: Backend) {
    b.store
        .insert_authority(&authority("aa", AuthorityState::Active, 1))
        .await
        .unwrap();
    // Back to schema version 4, as a database written by the previous release.
    b.raw_sql("DROP TABLE sealed_keys; DELETE FROM _sqlx_migrations WHERE version = 5")
        .await;
    let blobs = connect_key_blobs(b.url()).await.unwrap();
    assert_eq!(blobs.find_key_blob("aa.key.pem").await.unwrap(), None);
    blobs
        .insert_key_blob("aa.key.pem", "citadel-sealed-key:v1:x:AAAA", 2)
        .await
        .unwrap();
    let upgraded = connect(b.url()).await.unwrap();
    assert_eq!(upgraded.list_authorities().await.unwrap().len(), 1);
}

async fn upgrade_from_schema_2_takes_node_serials_from_the_ledger(b: Backend) {
    // Ledger rows as the previous release wrote them: node-a joined (1) and renewed twice
    // (2, 3), with a workload certificate (4) in between; node-b joined once (5); node-c
    // joined but its node row has no certificate in the ledger.
    let workload = NewIssuance {
        spiffe_id: WEB.to_string(),
        ..node_cert(4, "node-a")
    };
    b.store
        .append_issuances(&[
            node_cert(1, "node-a"),
            node_cert(2, "node-a"),
            workload,
            node_cert(3, "node-a"),
            node_cert(5, "node-b"),
        ])
        .await
        .unwrap();
    // Back to schema version 2, with three joined nodes.
    let columns = [
        "current_serial",
        "current_not_after",
        "pending_serial",
        "pending_not_after",
        "last_seen",
        "evicted_at",
    ];
    let mut sql = String::new();
    for column in columns {
        sql.push_str(&format!("ALTER TABLE nodes DROP COLUMN {column}; "));
    }
    sql.push_str(
        "DELETE FROM _sqlx_migrations WHERE version = 3;          INSERT INTO nodes (name, allowed_ids, joined_at) VALUES          ('node-a', '[]', 10), ('node-b', '[]', 20), ('node-c', '[]', 30)",
    );
    b.raw_sql(&sql).await;
    let upgraded = connect(b.url()).await.unwrap();
    let nodes = upgraded.list_nodes().await.unwrap();
    let a = &nodes[0];
    assert_eq!(a.name, "node-a");
    assert_eq!(a.pending_serial, Some(serial(3)));
    assert_eq!(a.pending_not_after, Some(100_003));
    assert_eq!(a.current_serial, Some(serial(2)));
    assert_eq!(a.current_not_after, Some(100_002));
    assert_eq!(a.last_seen, Some(10));
    assert_eq!(a.evicted_at, None);
    let b_node = &nodes[1];
    assert_eq!(b_node.pending_serial, Some(serial(5)));
    assert_eq!(b_node.current_serial, None);
    let c = &nodes[2];
    assert_eq!(
        (c.current_serial.as_ref(), c.pending_serial.as_ref()),
        (None, None)
    );
    // The agent of node-a keeps working with the latest certificate, which supersedes the rest.
    assert_eq!(
        upgraded
            .use_node_certificate("node-a", &serial(3), NOW)
            .await
            .unwrap(),
        NodeCertificateUse::Accepted(NodeCertificateRole::Pending)
    );
    assert_eq!(
        upgraded
            .use_node_certificate("node-a", &serial(2), NOW)
            .await
            .unwrap(),
        NodeCertificateUse::Refused(NodeRefusal::Superseded)
    );
}

// ---------------------------------------------------------------------------------------------
// Connection rules
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unreachable_database_is_unavailable() {
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        connect("postgres://citadel@127.0.0.1:1/citadel"),
    )
    .await
    .expect("connect did not give up within 10 s");
    assert!(
        matches!(out, Err(StoreError::Unavailable(_))),
        "{:?}",
        out.err()
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn connection_errors_never_contain_the_password() {
    let urls = [
        "postgres://citadel:Hunter2Secret@127.0.0.1:1/citadel",
        "postgresql://citadel@127.0.0.1:1/citadel?password=Hunter2Secret",
        "mysql://citadel:Hunter2Secret@127.0.0.1:1/citadel",
        "postgres://citadel:Hunter2Secret@127.0.0.1:notaport/citadel",
    ];
    for url in urls {
        let err = match connect(url).await {
            Ok(_) => panic!("connected to {url}"),
            Err(e) => e,
        };
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("Hunter2Secret"), "{shown}");
    }
}

#[tokio::test]
async fn unsupported_database_url_is_a_config_error() {
    for url in [
        "mysql://root@localhost/db",
        "sqlite::memory:",
        "sqlite://:memory:",
        "/var/lib/citadel.db",
    ] {
        let out = connect(url).await;
        assert!(
            matches!(out, Err(StoreError::Config(_))),
            "{url}: {:?}",
            out.err()
        );
    }
}

#[tokio::test]
async fn sqlite_database_file_is_created_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("citadel.db");
    let store = connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    store.append_issuances(&issuances(1..=1)).await.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    // SQLite gives its WAL and shared-memory files the database file's mode.
    let mut side_files = 0;
    for suffix in ["-wal", "-shm"] {
        let side = dir.path().join(format!("citadel.db{suffix}"));
        if let Ok(meta) = std::fs::metadata(&side) {
            side_files += 1;
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{suffix} mode {mode:o}");
        }
    }
    assert!(side_files > 0, "no WAL files next to an open WAL database");
}

#[tokio::test]
async fn sqlite_database_uses_the_wal_journal() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("citadel.db").display());
    connect(&url).await.unwrap();
    let pool = raw_pool(&url).await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

// ---------------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------------

const LEASE: &str = "root-renewal";

async fn two_holders_cannot_both_hold_a_lease(b: Backend) {
    assert!(
        b.store
            .acquire_lease(LEASE, "a", NOW, NOW + 30)
            .await
            .unwrap()
    );
    assert!(
        !b.store
            .acquire_lease(LEASE, "b", NOW + 29, NOW + 59)
            .await
            .unwrap(),
        "b took a lease a holds"
    );
    let held = b.store.get_lease(LEASE).await.unwrap().unwrap();
    assert_eq!((held.holder.as_str(), held.expires_at), ("a", NOW + 30));
    // Another lease name is independent.
    assert!(
        b.store
            .acquire_lease("other", "b", NOW, NOW + 30)
            .await
            .unwrap()
    );
}

async fn an_expired_lease_can_be_taken_over(b: Backend) {
    assert!(
        b.store
            .acquire_lease(LEASE, "a", NOW, NOW + 30)
            .await
            .unwrap()
    );
    assert!(
        b.store
            .acquire_lease(LEASE, "b", NOW + 30, NOW + 60)
            .await
            .unwrap()
    );
    let held = b.store.get_lease(LEASE).await.unwrap().unwrap();
    assert_eq!((held.holder.as_str(), held.expires_at), ("b", NOW + 60));
    // The previous holder has lost it: it can neither renew nor release it.
    assert!(
        !b.store
            .acquire_lease(LEASE, "a", NOW + 31, NOW + 61)
            .await
            .unwrap()
    );
    assert!(!b.store.release_lease(LEASE, "a").await.unwrap());
}

async fn only_the_holder_renews_or_releases_a_lease(b: Backend) {
    assert_eq!(b.store.get_lease(LEASE).await.unwrap(), None);
    assert!(!b.store.release_lease(LEASE, "a").await.unwrap());
    assert!(
        b.store
            .acquire_lease(LEASE, "a", NOW, NOW + 30)
            .await
            .unwrap()
    );
    assert!(
        b.store
            .acquire_lease(LEASE, "a", NOW + 10, NOW + 40)
            .await
            .unwrap()
    );
    assert_eq!(
        b.store.get_lease(LEASE).await.unwrap().unwrap().expires_at,
        NOW + 40
    );
    assert!(!b.store.release_lease(LEASE, "b").await.unwrap());
    assert!(b.store.release_lease(LEASE, "a").await.unwrap());
    assert_eq!(b.store.get_lease(LEASE).await.unwrap(), None);
    // Released: anyone may take it at once.
    assert!(
        b.store
            .acquire_lease(LEASE, "b", NOW + 11, NOW + 41)
            .await
            .unwrap()
    );
}

async fn concurrent_takers_of_a_lapsed_lease_exactly_one_wins(b: Backend) {
    assert!(
        b.store
            .acquire_lease(LEASE, "dead", NOW, NOW + 1)
            .await
            .unwrap()
    );
    let takers = (0..8).map(|i| {
        let store = b.store.clone();
        tokio::spawn(async move {
            let holder = format!("replica-{i}");
            let won = store
                .acquire_lease(LEASE, &holder, NOW + 5, NOW + 35)
                .await
                .unwrap();
            (holder, won)
        })
    });
    let results = futures_join(takers).await;
    let winners: Vec<_> = results.iter().filter(|(_, won)| *won).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let held = b.store.get_lease(LEASE).await.unwrap().unwrap();
    assert_eq!(held.holder, winners[0].0);
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Sealed key blobs
// ---------------------------------------------------------------------------------------------

/// The sealed-key seam of the backend under test.
async fn key_blobs(b: &Backend) -> Arc<dyn KeyBlobStore> {
    match &b.url {
        Some(url) => connect_key_blobs(url).await.unwrap(),
        None => Arc::new(MemoryKeyBlobs::default()),
    }
}

async fn sealed_key_blobs_round_trip_and_are_never_replaced(b: Backend) {
    let blobs = key_blobs(&b).await;
    assert_eq!(blobs.find_key_blob("a.key.pem").await.unwrap(), None);
    blobs
        .insert_key_blob("a.key.pem", "citadel-sealed-key:v1:x:AAAA", 7)
        .await
        .unwrap();
    blobs
        .insert_key_blob("b.key.pem", "citadel-sealed-key:v1:x:BBBB", 8)
        .await
        .unwrap();
    assert!(matches!(
        blobs
            .insert_key_blob("a.key.pem", "citadel-sealed-key:v1:x:CCCC", 9)
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        blobs.find_key_blob("a.key.pem").await.unwrap().as_deref(),
        Some("citadel-sealed-key:v1:x:AAAA"),
        "a conflicting insert leaves the first blob"
    );
    assert_eq!(
        blobs.find_key_blob("b.key.pem").await.unwrap().as_deref(),
        Some("citadel-sealed-key:v1:x:BBBB")
    );
}

async fn sealed_key_blobs_are_shared_by_every_connection(b: Backend) {
    let first = connect_key_blobs(b.url()).await.unwrap();
    first
        .insert_key_blob("r.key.pem", "citadel-sealed-key:v1:x:RRRR", 1)
        .await
        .unwrap();
    let second = connect_key_blobs(b.url()).await.unwrap();
    assert_eq!(
        second.find_key_blob("r.key.pem").await.unwrap().as_deref(),
        Some("citadel-sealed-key:v1:x:RRRR")
    );
    let pool = raw_pool(b.url()).await;
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT key_ref, sealed, created_at FROM sealed_keys")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!(
        rows,
        vec![(
            "r.key.pem".to_string(),
            "citadel-sealed-key:v1:x:RRRR".to_string(),
            1
        )]
    );
}

// ---------------------------------------------------------------------------------------------
// Bodies: ledger checkpoints
// ---------------------------------------------------------------------------------------------

fn checkpoint(seq: i64, hash: u8, signed_at: i64) -> LedgerCheckpoint {
    LedgerCheckpoint {
        seq,
        head_hash: [hash; 32],
        signed_at,
        key_id: [0xab; 32],
        signature: vec![0x30, 0x44, hash, 0x00, 0xff],
    }
}

async fn checkpoints_keep_the_first_per_seq_and_the_latest_is_the_highest(b: Backend) {
    assert_eq!(b.store.latest_checkpoint().await.unwrap(), None);
    let first = checkpoint(5, 1, NOW);
    assert!(b.store.insert_checkpoint(&first).await.unwrap());
    assert_eq!(
        b.store.latest_checkpoint().await.unwrap(),
        Some(first.clone())
    );
    // A second replica checkpointing the same head: harmless, the first one stays.
    assert!(
        !b.store
            .insert_checkpoint(&checkpoint(5, 2, NOW + 1))
            .await
            .unwrap()
    );
    assert_eq!(b.store.latest_checkpoint().await.unwrap(), Some(first));
    let later = checkpoint(9, 3, NOW + 2);
    assert!(b.store.insert_checkpoint(&later).await.unwrap());
    // An older head signed afterwards (a slow replica) does not hide the newer one.
    assert!(
        b.store
            .insert_checkpoint(&checkpoint(7, 4, NOW + 3))
            .await
            .unwrap()
    );
    assert_eq!(b.store.latest_checkpoint().await.unwrap(), Some(later));
}

async fn ledger_head_and_row_hashes_follow_appends(b: Backend) {
    assert_eq!(b.store.ledger_head().await.unwrap(), (0, GENESIS_HASH));
    assert_eq!(b.store.ledger_row_hash(1).await.unwrap(), None);
    let rows = b.store.append_issuances(&issuances(1..=3)).await.unwrap();
    assert_eq!(b.store.ledger_head().await.unwrap(), (3, rows[2].row_hash));
    assert_eq!(
        b.store.ledger_row_hash(2).await.unwrap(),
        Some(rows[1].row_hash)
    );
    assert_eq!(b.store.ledger_row_hash(4).await.unwrap(), None);
}

async fn upgrade_to_schema_7_adds_an_empty_checkpoint_table(b: Backend) {
    assert!(
        b.store
            .insert_checkpoint(&checkpoint(1, 1, NOW))
            .await
            .unwrap()
    );
    // Back to the schema before checkpoints, as a database written by the previous release.
    b.raw_sql("DROP TABLE ledger_checkpoints; DELETE FROM _sqlx_migrations WHERE version = 7")
        .await;
    let upgraded = connect(b.url()).await.unwrap();
    assert_eq!(upgraded.latest_checkpoint().await.unwrap(), None);
    assert!(
        upgraded
            .insert_checkpoint(&checkpoint(1, 2, NOW))
            .await
            .unwrap()
    );
}
