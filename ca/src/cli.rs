//! Operator commands that work on the store: `ledger verify`, `certs list`, `node list`,
//! `node evict` (the `root` commands are in [`crate::root_cmd`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use citadel_identity::TrustDomain;
use citadel_store::{
    AckStore, BundleAck, CheckpointStore, LedgerFilter, LedgerStore, NodeRecord, NodeStore,
    PolicyAck, Store, StoreError,
};

use crate::checkpoint::{CheckpointVerdict, LedgerPublicKey, judge, short_id};
use crate::node::{node_identity, validate_node_name};

/// Where the store is.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Data directory of the CA (its SQLite database lives here by default).
    #[arg(long, env = "CITADEL_DATA_DIR", default_value = "./citadel-data")]
    pub data_dir: PathBuf,
    /// Store URL (sqlite://PATH or postgres://…); default: SQLite in the data directory.
    #[arg(long, env = "CITADEL_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl StoreArgs {
    /// The store URL in effect.
    pub fn url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("citadel.db").display()))
    }

    /// Opens the store; a missing SQLite database is an error, not a new one.
    pub async fn open(&self) -> anyhow::Result<std::sync::Arc<dyn Store>> {
        if self.database_url.is_none() {
            let db = self.data_dir.join("citadel.db");
            anyhow::ensure!(
                db.exists(),
                "no CA database at {} (has `citadel serve --data-dir {}` run?)",
                db.display(),
                self.data_dir.display()
            );
        }
        citadel_store::connect(&self.url())
            .await
            .context("opening the store")
    }
}

/// Unix seconds as RFC 3339 UTC (`2025-01-31T12:00:00Z`), or the number if out of range.
pub fn fmt_time(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// `citadel ledger verify`: `Ok(true)` when the chain is intact **and** the newest signed
/// checkpoint verifies with the public key in `key_file` and still matches its row (see
/// [`crate::checkpoint`]). Every outcome is one line on `out`.
pub async fn ledger_verify(
    ledger: &dyn LedgerStore,
    checkpoints: &dyn CheckpointStore,
    key_file: &Path,
    out: &mut dyn Write,
) -> anyhow::Result<bool> {
    // Without the pinned key a rewritten ledger would pass: refuse to call it OK.
    let key = match std::fs::read_to_string(key_file) {
        Ok(text) => LedgerPublicKey::from_pem(&text)
            .with_context(|| format!("ledger public key {}", key_file.display()))?,
        Err(e) => {
            writeln!(
                out,
                "ledger UNVERIFIED: cannot read the pinned ledger public key {}: {e} (give the CA's --data-dir, or --ledger-public-key FILE)",
                key_file.display()
            )?;
            return Ok(false);
        }
    };
    // The checkpoint first: rows appended meanwhile only extend the chain verified next.
    let checkpoint = checkpoints.latest_checkpoint().await?;
    let v = ledger.verify_ledger().await?;
    if let Some(fault) = v.first_bad {
        writeln!(
            out,
            "ledger BROKEN at row {}: {} ({} row(s) verified before it)",
            fault.seq, fault.reason, v.rows_checked
        )?;
        return Ok(false);
    }
    let row_hash = match &checkpoint {
        Some(c) => checkpoints.ledger_row_hash(c.seq).await?,
        None => None,
    };
    match judge(&key, checkpoint.as_ref(), row_hash, v.rows_checked) {
        CheckpointVerdict::Empty => {
            writeln!(out, "ledger OK: empty, nothing checkpointed yet")?;
            Ok(true)
        }
        CheckpointVerdict::Vouched(c) => {
            writeln!(
                out,
                "ledger OK: {} row(s) verified; signed checkpoint at row {} ({}, ledger key {}) matches; {} row(s) after it are chained to it",
                v.rows_checked,
                c.seq,
                fmt_time(c.signed_at),
                short_id(&c.key_id),
                i64::try_from(v.rows_checked)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(c.seq)
            )?;
            Ok(true)
        }
        CheckpointVerdict::Broken(reason) => {
            writeln!(
                out,
                "ledger BROKEN: {reason} (the hash chain of {} row(s) is self-consistent; the signed checkpoint is not)",
                v.rows_checked
            )?;
            Ok(false)
        }
    }
}

/// `citadel certs list`.
pub async fn certs_list(
    store: &dyn LedgerStore,
    filter: &LedgerFilter,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let rows = store.list_issuances(filter).await?;
    if json {
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|e| {
                serde_json::json!({
                    "seq": e.seq,
                    "serial": e.issuance.serial_hex,
                    "spiffe_id": e.issuance.spiffe_id,
                    "authority": e.issuance.authority_id,
                    "not_before": fmt_time(e.issuance.not_before),
                    "not_after": fmt_time(e.issuance.not_after),
                    "requester": e.issuance.requester,
                    "node": e.issuance.node,
                    "sha256": hex::encode(e.issuance.der_sha256),
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>6}  {:<32}  {:<22}  SPIFFE ID",
        "SEQ", "SERIAL", "NOT AFTER"
    )?;
    for e in &rows {
        writeln!(
            out,
            "{:>6}  {:<32}  {:<22}  {}",
            e.seq,
            e.issuance.serial_hex,
            fmt_time(e.issuance.not_after),
            e.issuance.spiffe_id
        )?;
    }
    Ok(())
}

/// One row of `citadel node list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// The node name.
    pub node: String,
    /// Its agent's identity, `spiffe://<td>/citadel/node/<node>`.
    pub spiffe_id: String,
    /// `active` or `evicted`.
    pub state: &'static str,
    /// SPIFFE IDs its agent may request for workloads.
    pub allowed_ids: Vec<String>,
    /// notAfter of the node certificate in use, unix seconds.
    pub not_after: Option<i64>,
    /// When a node certificate of it was last accepted (or it joined), unix seconds.
    pub last_seen: Option<i64>,
    /// The trust-bundle sequence its agent last acknowledged.
    pub bundle_sequence: Option<u64>,
    /// The policy-set version its agent last acknowledged.
    pub policy_version: Option<String>,
    /// When it last joined, unix seconds.
    pub joined_at: i64,
    /// When it was evicted, unix seconds.
    pub evicted_at: Option<i64>,
}

/// Joins nodes with their agents' bundle and policy acknowledgements (keyed by the node
/// identity in `trust_domain`), in the order of `nodes` (pure).
pub fn node_rows(
    nodes: &[NodeRecord],
    acks: &[BundleAck],
    policy_acks: &[PolicyAck],
    trust_domain: &TrustDomain,
) -> Vec<NodeRow> {
    nodes
        .iter()
        .map(|n| {
            let spiffe_id = node_identity(trust_domain, &n.name)
                .map(|id| id.to_string())
                .unwrap_or_else(|_| format!("spiffe://{trust_domain}/citadel/node/{}", n.name));
            let bundle_sequence = acks
                .iter()
                .find(|a| a.agent_id == spiffe_id)
                .map(|a| a.sequence);
            let policy_version = policy_acks
                .iter()
                .find(|a| a.agent_id == spiffe_id)
                .map(|a| a.version.clone());
            NodeRow {
                node: n.name.clone(),
                state: n.state(),
                allowed_ids: n.allowed_ids.clone(),
                not_after: n.current_not_after,
                last_seen: n.last_seen,
                bundle_sequence,
                policy_version,
                joined_at: n.joined_at,
                evicted_at: n.evicted_at,
                spiffe_id,
            }
        })
        .collect()
}

fn fmt_opt_time(t: Option<i64>) -> String {
    t.map_or_else(|| "-".to_owned(), fmt_time)
}

/// `citadel node list`: every joined node, as a table or (`json`) a JSON array whose fields
/// are documented in docs/ca.md.
pub async fn node_list<S: NodeStore + AckStore + ?Sized>(
    store: &S,
    trust_domain: &TrustDomain,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let nodes = store.list_nodes().await?;
    let acks = store.list_bundle_acks().await?;
    let policy_acks = store.list_policy_acks().await?;
    let rows = node_rows(&nodes, &acks, &policy_acks, trust_domain);
    if json {
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "node": r.node,
                    "spiffe_id": r.spiffe_id,
                    "state": r.state,
                    "allowed_ids": r.allowed_ids,
                    "not_after": r.not_after.map(fmt_time),
                    "last_seen": r.last_seen.map(fmt_time),
                    "bundle_sequence": r.bundle_sequence,
                    "policy_version": r.policy_version,
                    "joined_at": fmt_time(r.joined_at),
                    "evicted_at": r.evicted_at.map(fmt_time),
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
        return Ok(());
    }
    if rows.is_empty() {
        writeln!(out, "no node has joined")?;
        return Ok(());
    }
    let width = rows.iter().map(|r| r.node.len()).max().unwrap_or(0).max(4);
    writeln!(
        out,
        "{:<width$}  {:<7}  {:<20}  {:<20}  {:>10}  {:<12}  ALLOWED IDS",
        "NODE", "STATE", "CERT NOT AFTER", "LAST SEEN", "BUNDLE SEQ", "POLICY"
    )?;
    for r in &rows {
        let sequence = r
            .bundle_sequence
            .map_or_else(|| "-".to_owned(), |s| s.to_string());
        // The first 12 hex digits, like a short commit id; --json has the whole version.
        let policy = r
            .policy_version
            .as_deref()
            .map_or_else(|| "-".to_owned(), |v| v.chars().take(12).collect());
        writeln!(
            out,
            "{:<width$}  {:<7}  {:<20}  {:<20}  {:>10}  {:<12}  {}",
            r.node,
            r.state,
            fmt_opt_time(r.not_after),
            fmt_opt_time(r.last_seen),
            sequence,
            policy,
            r.allowed_ids.join(",")
        )?;
    }
    Ok(())
}

/// `citadel node evict NAME`: from `now` on, every certificate of the node is refused (renewal,
/// workload certificates, the trust-bundle stream) until it joins again with a new token.
/// An unknown or malformed node name is an error.
pub async fn node_evict(
    store: &dyn NodeStore,
    node: &str,
    now: i64,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    validate_node_name(node)?;
    match store.evict_node(node, now).await {
        Ok(true) => writeln!(
            out,
            "node {node} evicted: its node certificates are refused from now on; \
             re-admit it with `citadel token create --node {node} …` and a new join"
        )?,
        Ok(false) => writeln!(out, "node {node} was already evicted")?,
        Err(StoreError::NotFound(_)) => {
            anyhow::bail!("no node named {node} has joined; nothing evicted")
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, evicted_at: Option<i64>) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            allowed_ids: vec!["spiffe://td/ns/a/sa/web".into()],
            joined_at: 10,
            current_serial: Some("aa".into()),
            current_not_after: Some(100),
            pending_serial: None,
            pending_not_after: None,
            last_seen: Some(50),
            evicted_at,
        }
    }

    #[test]
    fn node_rows_carry_each_agents_acknowledged_bundle_sequence_and_policy_version() {
        let td = TrustDomain::new("td").unwrap();
        let acks = [BundleAck {
            agent_id: "spiffe://td/citadel/node/node-b".into(),
            sequence: 7,
            acked_at: 60,
        }];
        let policy_acks = [PolicyAck {
            agent_id: "spiffe://td/citadel/node/node-a".into(),
            version: "abc".into(),
            acked_at: 60,
        }];
        let rows = node_rows(
            &[record("node-a", None), record("node-b", Some(70))],
            &acks,
            &policy_acks,
            &td,
        );
        assert_eq!(rows[0].policy_version.as_deref(), Some("abc"));
        assert_eq!(rows[1].policy_version, None);
        assert_eq!(rows[0].spiffe_id, "spiffe://td/citadel/node/node-a");
        assert_eq!(rows[0].bundle_sequence, None);
        assert_eq!(rows[0].state, "active");
        assert_eq!(rows[1].bundle_sequence, Some(7));
        assert_eq!(rows[1].state, "evicted");
        assert_eq!(rows[1].not_after, Some(100));
        assert_eq!(rows[1].last_seen, Some(50));
    }
}
