//! `citadel token create` and the agents section of `citadel root status`, run as the real
//! binary against a store in a temporary data directory.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use citadel_ca::authorities::record_of;
use citadel_ca::authority::Authority;
use citadel_ca::join_token::{TOKEN_PREFIX, token_hash};
use citadel_e2e::unix_now;
use citadel_store::AuthorityState;
use sqlx::Connection;
use support::{Harness, WEB};

fn citadel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_citadel"))
        .args(args)
        .env_remove("CITADEL_TRUST_DOMAIN")
        .env_remove("CITADEL_DATABASE_URL")
        .env_remove("CITADEL_DATA_DIR")
        .output()
        .expect("run citadel")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A data directory with an empty, migrated store, as after a first `citadel serve`.
async fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("citadel.db").display());
    citadel_store::connect(&url).await.unwrap();
    dir
}

/// The bytes of `path` (empty if missing), read by `cat`.
fn read_by_another_process(path: &Path) -> Vec<u8> {
    Command::new("cat")
        .arg(path)
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default()
}

/// Rows in `join_tokens`, read behind the store's back.
async fn join_token_rows(dir: &Path) -> i64 {
    let url = format!("sqlite://{}", dir.join("citadel.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query_scalar("SELECT COUNT(*) FROM join_tokens")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn token_create_prints_only_the_token() {
    let dir = data_dir().await;
    let data = dir.path().display().to_string();
    let db = "spiffe://cluster.local/ns/shop/sa/db";
    let before = unix_now();
    let out = citadel(&[
        "token",
        "create",
        "--data-dir",
        &data,
        "--node",
        "node-a",
        "--allow",
        WEB,
        "--allow",
        db,
        "--ttl",
        "10m",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must be the token alone: {stdout:?}");
    let token = lines[0];
    let body = token.strip_prefix(TOKEN_PREFIX).expect("token prefix");
    // 32 bytes in unpadded base64url.
    assert_eq!(body.len(), 43, "{token}");
    assert!(
        body.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{token}"
    );
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains(body),
        "the token leaked to stderr: {stderr}"
    );
    assert!(stderr.contains("node-a"), "{stderr}");

    let url = format!("sqlite://{}", dir.path().join("citadel.db").display());
    let store = citadel_store::connect(&url).await.unwrap();
    let rec = store
        .find_join_token(&token_hash(token))
        .await
        .unwrap()
        .expect("the token's hash is stored");
    assert_eq!(rec.node_name, "node-a");
    assert_eq!(rec.allowed_ids, vec![WEB.to_string(), db.to_string()]);
    assert_eq!(rec.used_at, None);
    assert!((rec.expires_at - rec.created_at) == 600, "{rec:?}");
    assert!(rec.created_at >= before && rec.created_at <= unix_now());
    // Only the hash: the database file never contains the token.
    // Read by another process: opening and closing the database file in this one would drop
    // the POSIX locks SQLite holds on it here (they are per process), and the store open in
    // this test would then miss later commits by other processes.
    let raw = read_by_another_process(&dir.path().join("citadel.db"));
    let wal = read_by_another_process(&dir.path().join("citadel.db-wal"));
    for bytes in [raw, wal] {
        assert!(
            !bytes.windows(body.len()).any(|w| w == body.as_bytes()),
            "the token is stored in clear"
        );
    }
    // A second token is a different one.
    let again = citadel(&[
        "token",
        "create",
        "--data-dir",
        &data,
        "--node",
        "node-a",
        "--allow",
        WEB,
    ]);
    assert!(again.status.success(), "stderr: {}", text(&again.stderr));
    let second = text(&again.stdout).trim().to_owned();
    assert_ne!(second, token);
    let found = store.find_join_token(&token_hash(&second)).await.unwrap();
    assert_eq!(found.map(|r| r.node_name), Some("node-a".to_owned()));
}

#[tokio::test]
async fn token_create_rejects_bad_input_and_stores_nothing() {
    let dir = data_dir().await;
    let data = dir.path().display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--node", "Node_A", "--allow", WEB], "node name"),
        (&["--node", "node-", "--allow", WEB], "node name"),
        (&["--node", "node-a"], "at least one --allow"),
        (&["--node", "node-a", "--allow", "web"], "--allow \"web\""),
        (
            &[
                "--node",
                "node-a",
                "--allow",
                "spiffe://other.org/ns/a/sa/b",
            ],
            "not in trust domain cluster.local",
        ),
        (
            &[
                "--node",
                "node-a",
                "--allow",
                WEB,
                "--allow",
                "spiffe://cluster.local/citadel/node/x",
            ],
            "reserved",
        ),
        (
            &["--node", "node-a", "--allow", WEB, "--ttl", "0s"],
            "--ttl",
        ),
        (
            &["--node", "node-a", "--allow", WEB, "--ttl", "8d"],
            "at most 7d",
        ),
        (
            &["--node", "node-a", "--allow", WEB, "--ttl", "soon"],
            "--ttl",
        ),
        (
            &[
                "--node",
                "node-a",
                "--allow",
                WEB,
                "--trust-domain",
                "spiffe://x",
            ],
            "--trust-domain",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["token", "create", "--data-dir", &data];
        full.extend_from_slice(args);
        let out = citadel(&full);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed {:?}",
            text(&out.stdout)
        );
        assert!(
            stderr.contains(expected),
            "{args:?}: missing {expected:?} in {stderr}"
        );
    }
    assert_eq!(
        join_token_rows(dir.path()).await,
        0,
        "a refused token was stored"
    );
    // A data directory without a CA is an error too, not a new database.
    let empty = tempfile::tempdir().unwrap();
    let out = citadel(&[
        "token",
        "create",
        "--data-dir",
        &empty.path().display().to_string(),
        "--node",
        "node-a",
        "--allow",
        WEB,
    ]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(!empty.path().join("citadel.db").exists());
}

#[tokio::test]
async fn root_status_lists_agent_acknowledgements() {
    let h = Harness::start().await;
    let data = h.data_dir.display().to_string();
    let node_a = "spiffe://cluster.local/citadel/node/node-a";
    let node_b = "spiffe://cluster.local/citadel/node/node-b";
    let out = citadel(&["root", "status", "--data-dir", &data]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let before = text(&out.stdout);
    assert!(before.contains("Trust-bundle sequence: 1"), "{before}");
    assert!(before.contains("none has acknowledged"), "{before}");

    // node-a acknowledges bundle 1; then a new root is prepared (sequence 2) and only node-b,
    // which joined later, acknowledges that.
    h.store
        .record_bundle_ack(node_a, 1, 1_700_000_000)
        .await
        .unwrap();
    let (next, _key) = Authority::create_root(&h.trust_domain(), unix_now(), 86_400 * 365).unwrap();
    h.store
        .insert_authority(&record_of(
            &next,
            AuthorityState::Prepared,
            "n.key.pem",
            unix_now(),
        ))
        .await
        .unwrap();
    h.store
        .record_bundle_ack(node_b, 2, 1_700_000_060)
        .await
        .unwrap();

    let out = citadel(&["root", "status", "--data-dir", &data]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let status = text(&out.stdout);
    assert!(status.contains("Trust-bundle sequence: 2"), "{status}");
    assert!(
        status.contains("Agents: 1 of 2 hold the current bundle"),
        "{status}"
    );
    let line = |agent: &str| {
        status
            .lines()
            .find(|l| l.starts_with(agent))
            .unwrap_or_else(|| panic!("no line for {agent} in:\n{status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line(node_a),
        [node_a, "1", "2023-11-14T22:13:20Z", "behind", "stale"]
    );
    assert_eq!(
        line(node_b),
        [node_b, "2", "2023-11-14T22:14:20Z", "current", "stale"]
    );
    // node-a sorts before node-b, and the bundle PEM (now two roots) still follows.
    assert!(status.find(node_a) < status.find(node_b));
    assert!(status.contains("Trust bundle (2 root(s))"), "{status}");
    h.stop().await;
}
