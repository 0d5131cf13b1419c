//! The agent's own identity, `spiffe://<td>/citadel/node/<name>`: obtained
//! once with a join token, kept in the data directory (key 0600), renewed at
//! half-life with itself as the credential.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use citadel_identity::{Backoff, SpiffeId, TrustBundle, check_x509_svid, until_renewal};
use rustls_pki_types::CertificateDer;

use crate::bundle::BundleWatch;
use crate::ca_client::{CertificateAuthority, GrpcCa, NodeCredential, SignRequest};
use crate::svid::{PendingKey, WorkloadSvid, accept_chain};
use crate::{random_unit, unix_now};

/// The path prefix of node identities.
pub const NODE_PATH_PREFIX: &str = "/citadel/node/";
const CHAIN_FILE: &str = "node.pem";
const KEY_FILE: &str = "node.key";

/// The node's certificate (chain with roots left out) and key.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The certificate and key.
    pub svid: WorkloadSvid,
}

impl NodeIdentity {
    /// The node's SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.svid.spiffe_id
    }

    /// As a CA credential.
    pub fn credential(&self) -> NodeCredential {
        NodeCredential::Certificate {
            chain_pem: self.svid.chain_pem().to_owned(),
            key_pem: self.svid.key.pem().to_owned(),
        }
    }
}

/// Checks that `id` is a node identity.
pub fn check_node_id(id: &SpiffeId) -> anyhow::Result<()> {
    match id.path().strip_prefix(NODE_PATH_PREFIX) {
        Some(name) if !name.is_empty() && !name.contains('/') => Ok(()),
        _ => bail!("{id} is not a node identity (spiffe://<td>{NODE_PATH_PREFIX}<name>)"),
    }
}

/// Loads the node identity saved in `data_dir`, if there is one that is
/// still valid at `now` and whose key matches.
pub fn load(data_dir: &Path, roots_pem: &str, now: i64) -> anyhow::Result<Option<NodeIdentity>> {
    let chain_path = data_dir.join(CHAIN_FILE);
    let key_path = data_dir.join(KEY_FILE);
    if !chain_path.exists() || !key_path.exists() {
        return Ok(None);
    }
    let meta = std::fs::metadata(&key_path).with_context(|| key_path.display().to_string())?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is readable by others (mode {:o}); chmod 600 it",
            key_path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let chain_pem =
        std::fs::read_to_string(&chain_path).with_context(|| chain_path.display().to_string())?;
    let key_pem =
        std::fs::read_to_string(&key_path).with_context(|| key_path.display().to_string())?;
    let chain: Vec<CertificateDer<'static>> = pem::parse_many(&chain_pem)
        .with_context(|| chain_path.display().to_string())?
        .into_iter()
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    let leaf = chain.first().context("node.pem holds no certificate")?;
    let svid = check_x509_svid(leaf).with_context(|| chain_path.display().to_string())?;
    check_node_id(&svid.spiffe_id)?;
    if svid.not_after <= now {
        tracing::warn!(spiffe_id = %svid.spiffe_id, "saved node certificate has expired; a new join token is needed");
        return Ok(None);
    }
    let key = pem::parse(&key_pem).with_context(|| key_path.display().to_string())?;
    let pending = PendingKey::from_pkcs8(key.contents()).context("node.key")?;
    let bundle = TrustBundle::from_pem(svid.spiffe_id.trust_domain().clone(), roots_pem)
        .context("--ca-bundle")?;
    let pems: Vec<String> = vec![chain_pem];
    let checked = accept_chain(&pending, Some(&svid.spiffe_id), &pems, &bundle, now)
        .context("saved node certificate")?;
    Ok(Some(NodeIdentity { svid: checked }))
}

/// Saves the node identity in `data_dir` (0700): the chain 0644, the key
/// 0600, each written to a temporary file and renamed.
pub fn save(data_dir: &Path, node: &NodeIdentity) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir).with_context(|| data_dir.display().to_string())?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| data_dir.display().to_string())?;
    write_atomic(
        &data_dir.join(KEY_FILE),
        node.svid.key.pem().as_bytes(),
        0o600,
    )?;
    write_atomic(
        &data_dir.join(CHAIN_FILE),
        node.svid.chain_pem().as_bytes(),
        0o644,
    )?;
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| tmp.display().to_string())?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    Ok(())
}

/// Exchanges a join token for the node identity. `ca` must be configured
/// with the token as its credential; `roots_pem` are the trusted roots.
pub async fn join(
    ca: &GrpcCa,
    roots_pem: &str,
    ttl: std::time::Duration,
) -> anyhow::Result<NodeIdentity> {
    let pending = PendingKey::generate(None)?;
    let chain = ca
        .sign(SignRequest {
            csr_pem: pending.csr_pem.clone(),
            ttl,
            impersonate: None,
        })
        .await
        .context("exchanging the join token")?;
    let leaf_pem = chain.first().context("the CA returned no certificate")?;
    let leaf = pem::parse(leaf_pem).context("the CA returned a malformed certificate")?;
    let svid = check_x509_svid(leaf.contents()).context("the CA returned an invalid SVID")?;
    check_node_id(&svid.spiffe_id)?;
    let bundle = TrustBundle::from_pem(svid.spiffe_id.trust_domain().clone(), roots_pem)
        .context("--ca-bundle")?;
    let checked = accept_chain(&pending, Some(&svid.spiffe_id), &chain, &bundle, unix_now())?;
    Ok(NodeIdentity { svid: checked })
}

/// Renews the node identity at half-life, forever; each new one is saved
/// and becomes the CA credential.
pub async fn keep_renewed(
    ca: Arc<GrpcCa>,
    mut node: NodeIdentity,
    data_dir: PathBuf,
    bundle: BundleWatch,
    ttl: std::time::Duration,
) {
    let backoff = Backoff::default();
    let mut failures = 0u32;
    // As for workloads, the lifetime counts from receipt, not from the
    // backdated notBefore.
    let mut received_at = unix_now();
    loop {
        let wait = if failures == 0 {
            until_renewal(
                node.svid.not_before.max(received_at),
                node.svid.not_after,
                unix_now(),
                random_unit(),
            )
        } else {
            backoff.delay(failures, random_unit())
        };
        tokio::time::sleep(wait).await;
        match renew_once(&ca, &node, &bundle, ttl).await {
            Ok(renewed) => {
                if let Err(e) = save(&data_dir, &renewed) {
                    tracing::error!(error = %format!("{e:#}"), "cannot save the renewed node certificate");
                }
                if let Err(e) = ca.set_credential(renewed.credential()) {
                    tracing::error!(error = %e, "cannot use the renewed node certificate");
                }
                tracing::info!(spiffe_id = %renewed.spiffe_id(), serial = %renewed.svid.serial_hex, "node certificate renewed");
                node = renewed;
                received_at = unix_now();
                failures = 0;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %format!("{e:#}"), "node certificate renewal failed");
            }
        }
    }
}

async fn renew_once(
    ca: &GrpcCa,
    node: &NodeIdentity,
    bundle: &BundleWatch,
    ttl: std::time::Duration,
) -> anyhow::Result<NodeIdentity> {
    let pending = PendingKey::generate(Some(node.spiffe_id()))?;
    let chain = ca
        .sign(SignRequest {
            csr_pem: pending.csr_pem.clone(),
            ttl,
            impersonate: None,
        })
        .await?;
    let state = bundle.borrow().clone().context("no trust bundle yet")?;
    let svid = accept_chain(
        &pending,
        Some(node.spiffe_id()),
        &chain,
        &state.bundle,
        unix_now(),
    )?;
    Ok(NodeIdentity { svid })
}
