//! Operator commands that read the store: `root status`, `ledger verify`, `certs list`.

use crate::clock::unix_now;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use citadel_identity::TrustDomain;
use citadel_store::{AuthorityState, LedgerFilter, Store};

use crate::authorities::current_bundle;

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

/// `citadel root status`: each authority, its state and expiry, its live
/// certificates, the trust-bundle sequence, each agent's last acknowledged
/// sequence (when, and whether it is current), then the trust bundle PEM.
pub async fn root_status(
    store: &dyn Store,
    trust_domain: &TrustDomain,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let now = unix_now();
    let authorities = store.list_authorities().await?;
    let live = store.live_counts_by_authority(now).await?;
    writeln!(
        out,
        "{:<34} {:<9} {:<22} {:>12}  ROOT",
        "AUTHORITY", "STATE", "NOT AFTER", "LIVE CERTS"
    )?;
    for a in &authorities {
        let count = live
            .iter()
            .find(|(id, _)| *id == a.id)
            .map_or(0, |(_, n)| *n);
        let root = if a.cert_pem == a.root_pem {
            "self-signed"
        } else {
            "intermediate"
        };
        writeln!(
            out,
            "{:<34} {:<9} {:<22} {:>12}  {}",
            a.id,
            a.state.as_str(),
            fmt_time(a.not_after),
            count,
            root
        )?;
    }
    if !authorities
        .iter()
        .any(|a| a.state == AuthorityState::Active)
    {
        writeln!(out, "warning: no active authority")?;
    }
    // The sequence before the bundle, as the CA publishes them: the bundle is never older.
    let sequence = store.bundle_sequence().await?;
    let acks = store.list_bundle_acks().await?;
    let bundle = current_bundle(store, trust_domain).await?;
    writeln!(out, "\nTrust-bundle sequence: {sequence}")?;
    if acks.is_empty() {
        writeln!(out, "Agents: none has acknowledged a trust bundle")?;
    } else {
        let current = acks
            .iter()
            .filter(|a| agent_status(a.sequence, sequence) == "current")
            .count();
        writeln!(
            out,
            "Agents: {current} of {} hold the current bundle",
            acks.len()
        )?;
        writeln!(
            out,
            "{:<56} {:>9}  {:<22} STATUS",
            "AGENT", "ACKED SEQ", "ACKED AT"
        )?;
        for a in &acks {
            writeln!(
                out,
                "{:<56} {:>9}  {:<22} {}",
                a.agent_id,
                a.sequence,
                fmt_time(a.acked_at),
                agent_status(a.sequence, sequence)
            )?;
        }
    }
    writeln!(out, "\nTrust bundle ({} root(s)):", bundle.roots().len())?;
    write!(out, "{}", bundle.to_pem())?;
    Ok(())
}

/// `current` when an agent has acknowledged the store's bundle sequence, else `behind` (pure).
pub fn agent_status(acked: u64, current: u64) -> &'static str {
    if acked >= current {
        "current"
    } else {
        "behind"
    }
}

/// `citadel ledger verify`: `Ok(true)` when the chain is intact.
pub async fn ledger_verify(store: &dyn Store, out: &mut dyn Write) -> anyhow::Result<bool> {
    let v = store.verify_ledger().await?;
    match v.first_bad {
        None => {
            writeln!(out, "ledger OK: {} row(s) verified", v.rows_checked)?;
            Ok(true)
        }
        Some(fault) => {
            writeln!(
                out,
                "ledger BROKEN at row {}: {} ({} row(s) verified before it)",
                fault.seq, fault.reason, v.rows_checked
            )?;
            Ok(false)
        }
    }
}

/// `citadel certs list`.
pub async fn certs_list(
    store: &dyn Store,
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
