//! Loading the signing authority at start-up and publishing the trust bundle.

use citadel_identity::{TrustBundle, TrustDomain};
use citadel_store::{AuthorityRecord, AuthorityState, AuthorityStore, StoreError};
use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::authority::Authority;
use crate::keystore::{KeyPem, KeyStore, KeyStoreError};
use crate::pemutil::{cert_to_pem, certs_from_pem};

/// `key_ref` of an authority whose key lives in the operator's `--ca-dir`.
pub const PLUGIN_KEY_REF: &str = "plugin:ca-dir";

/// Rebuilds a record from an authority.
pub fn record_of(a: &Authority, state: AuthorityState, key_ref: &str, now: i64) -> AuthorityRecord {
    AuthorityRecord {
        id: a.id().to_owned(),
        state,
        cert_pem: cert_to_pem(a.signer()),
        chain_pem: a.intermediates().iter().map(|c| cert_to_pem(c)).collect(),
        root_pem: cert_to_pem(a.root()),
        not_before: a.window().not_before,
        not_after: a.window().not_after,
        key_ref: key_ref.to_owned(),
        created_at: now,
    }
}

fn one_cert(text: &str, what: &str) -> anyhow::Result<CertificateDer<'static>> {
    let mut certs = certs_from_pem(text, what).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        certs.len() == 1,
        "{what}: expected one certificate, found {}",
        certs.len()
    );
    Ok(certs.remove(0))
}

async fn load_record(rec: &AuthorityRecord, keys: &dyn KeyStore) -> anyhow::Result<Authority> {
    let key = keys
        .load(&rec.key_ref)
        .await
        .map_err(|e| anyhow::anyhow!("authority {}: {e}", rec.id))?;
    let intermediates = certs_from_pem(&rec.chain_pem, "chain").map_err(anyhow::Error::msg)?;
    Ok(Authority::from_parts(
        one_cert(&rec.cert_pem, "signing certificate")?,
        intermediates,
        one_cert(&rec.root_pem, "root certificate")?,
        &key,
    )?)
}

/// Turns stored authority records into signing authorities: keys from the key store, or
/// (for authorities recorded by earlier releases with [`PLUGIN_KEY_REF`]) from `--ca-dir`.
#[derive(Clone)]
pub struct AuthorityLoader {
    /// Where authority keys live.
    pub keys: Arc<dyn KeyStore>,
    /// The operator's CA directory, if the CA runs with one.
    pub ca_dir: Option<PathBuf>,
}

impl AuthorityLoader {
    /// Loads the authority of `rec`, with its key, checked as a signing set.
    pub async fn load(&self, rec: &AuthorityRecord) -> anyhow::Result<Authority> {
        if rec.key_ref != PLUGIN_KEY_REF {
            return load_record(rec, self.keys.as_ref()).await;
        }
        let dir = self.ca_dir.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "authority {} was imported from a CA directory; start with --ca-dir",
                rec.id
            )
        })?;
        let (authority, _key) = Authority::import_dir(dir)?;
        anyhow::ensure!(
            authority.id() == rec.id,
            "authority {} was imported from {}, which now holds authority {}",
            rec.id,
            dir.display(),
            authority.id()
        );
        Ok(authority)
    }
}

/// The key reference under which an authority's key is kept in the key store.
pub fn key_ref_for(authority: &Authority) -> String {
    format!("{}.key.pem", authority.id())
}

/// Saves `key` for `authority` in the key store; a key already there under that name is
/// the same key (the name is derived from the certificate it signs for).
pub async fn save_key(
    keys: &dyn KeyStore,
    authority: &Authority,
    key: &KeyPem,
) -> anyhow::Result<String> {
    let key_ref = key_ref_for(authority);
    match keys.save(&key_ref, key).await {
        Ok(()) | Err(KeyStoreError::Exists(_)) => Ok(key_ref),
        Err(e) => Err(e.into()),
    }
}

/// Reads the operator's CA from `dir` and checks it as a signing set: a complete layout,
/// the key matching the signing certificate, the chain to the root, and a probe leaf signed
/// with it and verified by our own chain verifier. Changes nothing.
pub fn check_ca_dir(
    dir: &Path,
    trust_domain: &TrustDomain,
    now: i64,
) -> Result<(Authority, KeyPem), crate::authority::AuthorityError> {
    let (authority, key) = Authority::import_dir(dir)?;
    crate::authority::probe(&authority, trust_domain, now)?;
    Ok((authority, key))
}

/// Imports the operator's CA from `dir` (checked with [`check_ca_dir`]) and records it
/// ([`record_ca_dir`]); returns its ID.
pub async fn import_ca_dir(
    store: &dyn AuthorityStore,
    keys: &dyn KeyStore,
    trust_domain: &TrustDomain,
    dir: &Path,
    now: i64,
) -> anyhow::Result<String> {
    let (authority, key) = check_ca_dir(dir, trust_domain, now)?;
    record_ca_dir(store, keys, &authority, &key, dir, now).await?;
    Ok(authority.id().to_owned())
}

/// Records a checked operator CA: a new one enters as `prepared` (its key copied into the
/// key store), and is activated here only when no authority is active at all (the first
/// start); otherwise the running CA activates it once every live agent's proxies hold its
/// root ([`crate::ca_dir_watch`]). An authority the store already knows keeps its state, so
/// restarting with `--ca-dir`, or importing the same set twice (two replicas, or one round
/// after another), never undoes an activation, retirement or removal made from the CLI.
pub async fn record_ca_dir(
    store: &dyn AuthorityStore,
    keys: &dyn KeyStore,
    authority: &Authority,
    key: &KeyPem,
    dir: &Path,
    now: i64,
) -> anyhow::Result<()> {
    let records = store.list_authorities().await?;
    let no_active = !records.iter().any(|r| r.state == AuthorityState::Active);
    match records.iter().find(|r| r.id == authority.id()) {
        None => {
            let key_ref = save_key(keys, authority, key).await?;
            let rec = record_of(authority, AuthorityState::Prepared, &key_ref, now);
            match store.insert_authority(&rec).await {
                Ok(()) => {}
                // Another replica recorded the same set first: it keeps the state it has.
                Err(StoreError::Conflict(_)) if !no_active => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            if no_active {
                store
                    .set_authority_state(authority.id(), AuthorityState::Active)
                    .await?;
                tracing::info!(authority = authority.id(), dir = %dir.display(), "signing with the operator's CA");
            } else {
                tracing::info!(
                    authority = authority.id(),
                    dir = %dir.display(),
                    "the operator's CA entered the trust bundle as prepared; it signs once every live agent's proxies hold its root"
                );
            }
        }
        Some(r) if r.state == AuthorityState::Prepared && no_active => {
            store
                .set_authority_state(authority.id(), AuthorityState::Active)
                .await?;
        }
        Some(r) => {
            tracing::debug!(authority = authority.id(), state = %r.state, "the operator's CA is known to the store; its state stays");
        }
    }
    Ok(())
}

/// Finds the active authority, creating a self-signed root on first start
/// or importing the operator's CA from `ca_dir` ([`import_ca_dir`]).
pub async fn load_or_create(
    store: &dyn AuthorityStore,
    loader: &AuthorityLoader,
    trust_domain: &TrustDomain,
    root_lifetime_secs: i64,
    now: i64,
) -> anyhow::Result<Authority> {
    let keys = loader.keys.as_ref();
    if let Some(dir) = loader.ca_dir.as_deref() {
        import_ca_dir(store, keys, trust_domain, dir, now).await?;
    }
    // Two replicas starting at once may both try to create the first root;
    // the store admits one, and the other loads it.
    for _ in 0..2 {
        let records = store.list_authorities().await?;
        if let Some(active) = records.iter().find(|r| r.state == AuthorityState::Active) {
            let authority = loader.load(active).await?;
            tracing::info!(authority = authority.id(), "loaded the active authority");
            return Ok(authority);
        }
        let (authority, key) = Authority::create_root(trust_domain, now, root_lifetime_secs)?;
        let key_ref = save_key(keys, &authority, &key).await?;
        match store
            .insert_authority(&record_of(
                &authority,
                AuthorityState::Active,
                &key_ref,
                now,
            ))
            .await
        {
            Ok(()) => {
                tracing::info!(authority = authority.id(), "created a new self-signed root");
                return Ok(authority);
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("could not settle on an active authority")
}

/// The roots of every prepared, active or retired authority among `records`.
pub fn bundle_of(
    records: &[AuthorityRecord],
    trust_domain: &TrustDomain,
) -> anyhow::Result<TrustBundle> {
    let mut roots: Vec<CertificateDer<'static>> = Vec::new();
    for r in records.iter().filter(|r| in_bundle(r.state)) {
        let root = one_cert(&r.root_pem, "root certificate")?;
        // Two intermediates under one root publish the root once.
        if !roots.contains(&root) {
            roots.push(root);
        }
    }
    Ok(TrustBundle::new(trust_domain.clone(), roots)?)
}

/// Whether an authority in `state` has its root in the trust bundle.
pub fn in_bundle(state: AuthorityState) -> bool {
    matches!(
        state,
        AuthorityState::Prepared | AuthorityState::Active | AuthorityState::Retired
    )
}

/// The trust bundle: the roots of every prepared, active or retired authority.
pub async fn current_bundle(
    store: &dyn AuthorityStore,
    trust_domain: &TrustDomain,
) -> anyhow::Result<TrustBundle> {
    bundle_of(&store.list_authorities().await?, trust_domain)
}

/// Writes the bundle PEM atomically (0644: it is public).
pub fn write_bundle(path: &Path, bundle: &TrustBundle) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, bundle.to_pem())?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
