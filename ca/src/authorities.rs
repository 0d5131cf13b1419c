//! Loading the signing authority at start-up and publishing the trust bundle.

use citadel_identity::{TrustBundle, TrustDomain};
use citadel_store::{AuthorityRecord, AuthorityState, Store, StoreError};
use rustls_pki_types::CertificateDer;
use std::path::Path;

use crate::authority::Authority;
use crate::keystore::KeyStore;
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

/// Finds the active authority, creating a self-signed root on first start
/// or importing the operator's CA from `ca_dir`.
pub async fn load_or_create(
    store: &dyn Store,
    keys: &dyn KeyStore,
    trust_domain: &TrustDomain,
    ca_dir: Option<&Path>,
    root_lifetime_secs: i64,
    now: i64,
) -> anyhow::Result<Authority> {
    if let Some(dir) = ca_dir {
        let (authority, _key) = Authority::import_dir(dir)?;
        let existing = store.list_authorities().await?;
        match existing.iter().find(|r| r.id == authority.id()) {
            None => {
                // Inserted as prepared, then activated: activation retires
                // whichever authority signed before, in one transaction.
                let rec = record_of(&authority, AuthorityState::Prepared, PLUGIN_KEY_REF, now);
                store.insert_authority(&rec).await?;
                store
                    .set_authority_state(authority.id(), AuthorityState::Active)
                    .await?;
            }
            Some(r) if r.state != AuthorityState::Active => {
                store
                    .set_authority_state(authority.id(), AuthorityState::Active)
                    .await?;
            }
            Some(_) => {}
        }
        tracing::info!(authority = authority.id(), dir = %dir.display(), "signing with the operator's CA");
        return Ok(authority);
    }
    // Two replicas starting at once may both try to create the first root;
    // the store admits one, and the other loads it.
    for _ in 0..2 {
        let records = store.list_authorities().await?;
        if let Some(active) = records.iter().find(|r| r.state == AuthorityState::Active) {
            anyhow::ensure!(
                active.key_ref != PLUGIN_KEY_REF,
                "the active authority {} was imported from a CA directory; start with --ca-dir",
                active.id
            );
            let authority = load_record(active, keys).await?;
            tracing::info!(authority = authority.id(), "loaded the active authority");
            return Ok(authority);
        }
        let (authority, key) = Authority::create_root(trust_domain, now, root_lifetime_secs)?;
        let key_ref = format!("{}.key.pem", authority.id());
        keys.save(&key_ref, &key).await?;
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

/// The trust bundle: the roots of every prepared, active or retired authority.
pub async fn current_bundle(
    store: &dyn Store,
    trust_domain: &TrustDomain,
) -> anyhow::Result<TrustBundle> {
    let records = store.list_authorities().await?;
    let mut roots = Vec::new();
    for r in records.iter().filter(|r| {
        matches!(
            r.state,
            AuthorityState::Prepared | AuthorityState::Active | AuthorityState::Retired
        )
    }) {
        roots.push(one_cert(&r.root_pem, "root certificate")?);
    }
    Ok(TrustBundle::new(trust_domain.clone(), roots)?)
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
