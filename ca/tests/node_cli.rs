//! `citadel node list` and `citadel node evict`, run as the real binary against the store of
//! an in-process CA.

mod support;

use std::process::{Command, Output};

use citadel_e2e::unix_now;
use support::{Harness, WEB};
use tonic::Code;

const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

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

#[tokio::test]
async fn node_list_shows_nodes_as_a_table_and_as_json() {
    let h = Harness::start().await;
    let data = h.data_dir.display().to_string();
    let out = citadel(&["node", "list", "--data-dir", &data]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "no node has joined");
    let out = citadel(&["node", "list", "--data-dir", &data, "--json"]);
    assert_eq!(text(&out.stdout).trim(), "[]");

    let (chain_b, _key_b) = h.join("node-b", &[WEB, DB]).await;
    h.join("node-a", &[WEB]).await;
    h.store
        .record_bundle_ack("spiffe://cluster.local/citadel/node/node-a", 1, unix_now())
        .await
        .unwrap();
    let policy_version = "0123456789abcdef".repeat(4);
    h.store
        .record_policy_ack(
            "spiffe://cluster.local/citadel/node/node-a",
            &policy_version,
            unix_now(),
        )
        .await
        .unwrap();
    assert!(h.store.evict_node("node-b", unix_now()).await.unwrap());
    // The first certificate of the chain is the leaf.
    let not_after_b = citadel_identity::check_citadel_leaf(&support::chain_der(&[chain_b])[0])
        .unwrap()
        .not_after;

    let out = citadel(&["node", "list", "--data-dir", &data]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("NODE") && lines[0].contains("STATE"),
        "{table}"
    );
    let a: Vec<&str> = lines[1].split_whitespace().collect();
    let b: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(a[0], "node-a", "{table}");
    assert_eq!(a[1], "active", "{table}");
    assert_eq!(a[4], "1", "bundle sequence: {table}");
    assert_eq!(a[5], "0123456789ab", "short policy version: {table}");
    assert_eq!(a[6], WEB, "{table}");
    assert_eq!(b[0], "node-b", "{table}");
    assert_eq!(b[1], "evicted", "{table}");
    assert_eq!(b[2], citadel_ca::cli::fmt_time(not_after_b), "{table}");
    assert_eq!(b[4], "-", "node-b never acknowledged a bundle: {table}");
    assert_eq!(b[5], "-", "node-b never acknowledged a policy set: {table}");
    assert_eq!(b[6], format!("{WEB},{DB}"), "{table}");

    let out = citadel(&["node", "list", "--data-dir", &data, "--json"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["node"], "node-a");
    assert_eq!(
        rows[0]["spiffe_id"],
        "spiffe://cluster.local/citadel/node/node-a"
    );
    assert_eq!(rows[0]["state"], "active");
    assert_eq!(rows[0]["allowed_ids"], serde_json::json!([WEB]));
    assert_eq!(rows[0]["bundle_sequence"], 1);
    assert_eq!(rows[0]["policy_version"], policy_version.as_str());
    assert!(rows[1]["policy_version"].is_null(), "{rows:?}");
    assert!(rows[0]["last_seen"].is_string(), "{rows:?}");
    assert!(rows[0]["joined_at"].is_string(), "{rows:?}");
    assert!(rows[0]["evicted_at"].is_null(), "{rows:?}");
    assert_eq!(rows[1]["node"], "node-b");
    assert_eq!(rows[1]["state"], "evicted");
    assert_eq!(rows[1]["allowed_ids"], serde_json::json!([WEB, DB]));
    assert_eq!(
        rows[1]["not_after"],
        citadel_ca::cli::fmt_time(not_after_b).as_str()
    );
    assert!(rows[1]["bundle_sequence"].is_null(), "{rows:?}");
    assert!(rows[1]["evicted_at"].is_string(), "{rows:?}");
    let mut keys: Vec<&str> = rows[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "allowed_ids",
            "bundle_sequence",
            "evicted_at",
            "joined_at",
            "last_seen",
            "node",
            "not_after",
            "policy_version",
            "spiffe_id",
            "state"
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn node_evict_refuses_the_nodes_certificates_at_once() {
    let h = Harness::start().await;
    let data = h.data_dir.display().to_string();
    let (chain, key) = h.join("node-a", &[WEB]).await;
    h.impersonate((&chain, &key), WEB).await.unwrap();

    let out = citadel(&["node", "evict", "node-a", "--data-dir", &data]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("node node-a evicted"),
        "{}",
        text(&out.stdout)
    );
    // The running CA follows the store: the node's certificate is refused from now on.
    let before = h.ledger_len().await;
    let err = h.impersonate((&chain, &key), WEB).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = h.renew_node("node-a", (&chain, &key)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(h.ledger_len().await, before);
    // Evicting again is harmless.
    let out = citadel(&["node", "evict", "node-a", "--data-dir", &data]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("already evicted"),
        "{}",
        text(&out.stdout)
    );
    h.stop().await;
}

#[tokio::test]
async fn node_evict_of_an_unknown_node_exits_1() {
    let h = Harness::start().await;
    let data = h.data_dir.display().to_string();
    h.join("node-a", &[WEB]).await;
    for (name, expected) in [
        ("node-z", "no node named node-z has joined"),
        ("Node_A", "node name"),
    ] {
        let out = citadel(&["node", "evict", name, "--data-dir", &data]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "{name}: {}", text(&out.stdout));
        let stderr = text(&out.stderr);
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
    // Nothing changed for the node that exists.
    let nodes = h.store.list_nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].evicted_at, None);
    h.stop().await;
}
