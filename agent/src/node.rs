//! The agent's own identity, `spiffe://<td>/citadel/node/<name>`: obtained
//! once with a join token, kept in the data directory (key 0600), renewed at
//! half-life with itself as the credential.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use citadel_identity::{Backoff, Escaped, SpiffeId, TrustBundle, check_x509_svid, until_renewal};

use crate::bundle::BundleWatch;
use crate::ca_client::{CaError, CertificateAuthority, GrpcCa, NodeCredential, SignRequest};
use crate::files::{ensure_private_dir, write_atomic};
use crate::svid::{PendingKey, WorkloadSvid, accept_chain};
use crate::{random_unit, unix_now};

/// The path prefix of node identities.
pub const NODE_PATH_PREFIX: &str = "/citadel/node/";
/// The node's key, certificate chain and the hash of the join token they
/// came from, as one file (0600): written and renamed as a unit, so a crash
/// never leaves a key beside a certificate it does not match.
pub const IDENTITY_FILE: &str = "node-identity.pem";
/// Earlier releases kept chain and key in two files; still read, replaced
/// by [`IDENTITY_FILE`] on the next save.
const LEGACY_CHAIN_FILE: &str = "node.pem";
const LEGACY_KEY_FILE: &str = "node.key";
const KEY_TAG: &str = "PRIVATE KEY";
const CERT_TAG: &str = "CERTIFICATE";
const TOKEN_HASH_TAG: &str = "CITADEL JOIN TOKEN SHA-256";

/// The node's certificate (chain with roots left out) and key.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The certificate and key.
    pub svid: WorkloadSvid,
    /// SHA-256 of the join token this identity descends from (renewals
    /// keep it), so a restart with the same token in its environment does
    /// not try to spend it again, and a new token means "re-join".
    pub joined_with: Option<[u8; 32]>,
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

/// SHA-256 of a join token: all the agent keeps of it.
pub fn token_hash(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Checks that `id` is a node identity.
pub fn check_node_id(id: &SpiffeId) -> anyhow::Result<()> {
    match id.path().strip_prefix(NODE_PATH_PREFIX) {
        Some(name) if !name.is_empty() && !name.contains('/') => Ok(()),
        _ => bail!("{id} is not a node identity (spiffe://<td>{NODE_PATH_PREFIX}<name>)"),
    }
}

/// What the data directory holds.
#[derive(Debug)]
pub enum SavedIdentity {
    /// No node identity was ever saved.
    Missing,
    /// A node identity that verifies against the trusted roots now.
    Usable(Box<NodeIdentity>),
    /// A saved identity that cannot be used, and why (expired, no longer
    /// verifies after a root change, damaged).
    Unusable {
        /// Why.
        reason: String,
        /// The join token it came from, if recorded.
        joined_with: Option<[u8; 32]>,
    },
}

/// What to do at start-up about the node identity.
#[derive(Debug)]
pub enum Startup {
    /// Serve with the saved identity.
    UseSaved(Box<NodeIdentity>),
    /// Exchange the join token; `replacing` says why a saved identity is
    /// being replaced (logged at `warn`).
    Join {
        /// Why the saved identity is replaced, if there is one.
        replacing: Option<String>,
    },
}

/// The agent has no usable identity and was given no join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no usable node identity in {data_dir} ({reason}) and no join token: run `citadel token create --node NAME --allow SPIFFE_ID...` where the CA runs, then start the agent with --join-token (or CITADEL_JOIN_TOKEN)"
)]
pub struct NeedsJoinToken {
    /// The agent's data directory.
    pub data_dir: String,
    /// What is wrong with what is there.
    pub reason: String,
}

/// Decides how the agent gets its identity (pure): a usable saved identity
/// is kept unless a join token other than the one it came from is given
/// (an operator hands a new token to re-join, e.g. after an eviction); an
/// unusable or missing one is replaced through the token, if there is one.
pub fn decide_startup(
    saved: SavedIdentity,
    token: Option<&str>,
    data_dir: &Path,
) -> Result<Startup, NeedsJoinToken> {
    let needs = |reason: String| NeedsJoinToken {
        data_dir: data_dir.display().to_string(),
        reason,
    };
    match (saved, token) {
        (SavedIdentity::Usable(node), None) => Ok(Startup::UseSaved(node)),
        (SavedIdentity::Usable(node), Some(token)) => match node.joined_with {
            Some(hash) if hash != token_hash(token) => Ok(Startup::Join {
                replacing: Some(format!(
                    "a join token other than the one {} came from was given",
                    node.spiffe_id()
                )),
            }),
            // The same token (left in the environment), or an identity
            // saved before tokens were recorded: the token is spent.
            _ => Ok(Startup::UseSaved(node)),
        },
        (SavedIdentity::Unusable { reason, .. }, Some(_)) => Ok(Startup::Join {
            replacing: Some(reason),
        }),
        (SavedIdentity::Missing, Some(_)) => Ok(Startup::Join { replacing: None }),
        (SavedIdentity::Unusable { reason, .. }, None) => Err(needs(reason)),
        (SavedIdentity::Missing, None) => Err(needs("nothing is saved there".to_owned())),
    }
}

/// Reads the node identity saved in `data_dir` and checks it against
/// `roots_pem` at `now`. A key file readable by others is an error (it
/// must be fixed, not silently replaced); anything else wrong with what is
/// saved makes it [`SavedIdentity::Unusable`].
pub fn load(data_dir: &Path, roots_pem: &str, now: i64) -> anyhow::Result<SavedIdentity> {
    let unit = data_dir.join(IDENTITY_FILE);
    let legacy_key = data_dir.join(LEGACY_KEY_FILE);
    let legacy_chain = data_dir.join(LEGACY_CHAIN_FILE);
    let (key_path, text) = if unit.exists() {
        (unit.clone(), None)
    } else if legacy_key.exists() && legacy_chain.exists() {
        (legacy_key.clone(), Some(()))
    } else {
        return Ok(SavedIdentity::Missing);
    };
    let meta = std::fs::metadata(&key_path).with_context(|| key_path.display().to_string())?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is readable by others (mode {:o}); chmod 600 it",
            key_path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| p.display().to_string());
    let pem_text = match text {
        None => read(&unit)?,
        Some(()) => format!("{}\n{}", read(&legacy_key)?, read(&legacy_chain)?),
    };
    Ok(parse_saved(&pem_text, roots_pem, now))
}

fn parse_saved(text: &str, roots_pem: &str, now: i64) -> SavedIdentity {
    let blocks = match pem::parse_many(text) {
        Ok(b) => b,
        Err(e) => {
            return SavedIdentity::Unusable {
                reason: format!("the saved identity is not PEM: {e}"),
                joined_with: None,
            };
        }
    };
    let joined_with = blocks
        .iter()
        .find(|b| b.tag() == TOKEN_HASH_TAG)
        .and_then(|b| <[u8; 32]>::try_from(b.contents()).ok());
    let unusable = |reason: String| SavedIdentity::Unusable {
        reason,
        joined_with,
    };
    let Some(key) = blocks.iter().find(|b| b.tag() == KEY_TAG) else {
        return unusable("the saved identity has no key".to_owned());
    };
    let chain: Vec<String> = blocks
        .iter()
        .filter(|b| b.tag() == CERT_TAG)
        .map(encode_pem)
        .collect();
    let Some(leaf) = blocks.iter().find(|b| b.tag() == CERT_TAG) else {
        return unusable("the saved identity has no certificate".to_owned());
    };
    let svid = match check_x509_svid(leaf.contents()) {
        Ok(s) => s,
        Err(e) => return unusable(format!("the saved certificate is not an SVID: {e}")),
    };
    if let Err(e) = check_node_id(&svid.spiffe_id) {
        return unusable(e.to_string());
    }
    if svid.not_after <= now {
        return unusable(format!(
            "the saved node certificate of {} has expired",
            svid.spiffe_id
        ));
    }
    let pending = match PendingKey::from_pkcs8(key.contents()) {
        Ok(k) => k,
        Err(e) => return unusable(format!("the saved key is unusable: {e}")),
    };
    let bundle = match TrustBundle::from_pem(svid.spiffe_id.trust_domain().clone(), roots_pem) {
        Ok(b) => b,
        Err(e) => return unusable(format!("the trusted roots are unusable: {e}")),
    };
    match accept_chain(&pending, Some(&svid.spiffe_id), &chain, &bundle, now) {
        Ok(checked) => SavedIdentity::Usable(Box::new(NodeIdentity {
            svid: checked,
            joined_with,
        })),
        Err(e) => unusable(format!(
            "the saved node certificate of {}: {e}",
            svid.spiffe_id
        )),
    }
}

fn encode_pem(block: &pem::Pem) -> String {
    pem::encode_config(
        block,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Saves the node identity in `data_dir` (0700) as one 0600 file, written
/// to a temporary file and renamed; removes the files of the older layout.
pub fn save(data_dir: &Path, node: &NodeIdentity) -> anyhow::Result<()> {
    ensure_private_dir(data_dir)?;
    let mut text = node.svid.key.pem().to_owned();
    text.push_str(node.svid.chain_pem());
    if let Some(hash) = node.joined_with {
        text.push_str(&encode_pem(&pem::Pem::new(TOKEN_HASH_TAG, hash.to_vec())));
    }
    write_atomic(&data_dir.join(IDENTITY_FILE), text.as_bytes(), 0o600)?;
    for legacy in [LEGACY_KEY_FILE, LEGACY_CHAIN_FILE] {
        let _ = std::fs::remove_file(data_dir.join(legacy));
    }
    Ok(())
}

/// Exchanges a join token for the node identity. `ca` must be configured
/// with the token as its credential, whose hash is `joined_with`;
/// `roots_pem` are the trusted roots.
pub async fn join(
    ca: &GrpcCa,
    joined_with: [u8; 32],
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
    Ok(NodeIdentity {
        svid: checked,
        joined_with: Some(joined_with),
    })
}

/// Renews the node identity at half-life, forever; each new one is saved
/// and becomes the CA credential. When the CA activates another authority,
/// the node certificate is re-issued within `reissue_window` (as workload
/// certificates are), so the old root can leave the bundle.
pub async fn keep_renewed(
    ca: Arc<GrpcCa>,
    mut node: NodeIdentity,
    data_dir: PathBuf,
    mut bundle: BundleWatch,
    ttl: std::time::Duration,
    reissue_window: std::time::Duration,
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
        let mut due = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => break,
                changed = bundle.changed() => {
                    if changed.is_err() {
                        // The bundle follower is gone: plain half-life renewal from here.
                        tokio::time::sleep_until(due).await;
                        break;
                    }
                    let reissue = bundle
                        .borrow_and_update()
                        .as_deref()
                        .is_some_and(|b| crate::manager::needs_reissue(&node.svid, b));
                    if reissue {
                        let at = tokio::time::Instant::now()
                            + crate::manager::reissue_delay(reissue_window, random_unit());
                        if at < due {
                            tracing::info!("a new authority is active; re-issuing the node certificate within the re-issue window");
                            due = at;
                        }
                    }
                }
            }
        }
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
                let refused = e
                    .downcast_ref::<CaError>()
                    .is_some_and(|c| c.code == tonic::Code::PermissionDenied);
                if refused {
                    tracing::error!(error = %Escaped(format!("{e:#}")), "the CA refuses this node's certificate (evicted, or superseded by a copy of it); re-join with a new token from `citadel token create`");
                } else {
                    tracing::warn!(error = %Escaped(format!("{e:#}")), "node certificate renewal failed");
                }
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
    Ok(NodeIdentity {
        svid,
        joined_with: node.joined_with,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeCa;
    use citadel_identity::TrustDomain;

    async fn issued(ca: &FakeCa, joined_with: Option<[u8; 32]>) -> NodeIdentity {
        let pending = PendingKey::generate(None).unwrap();
        let chain = ca
            .sign(SignRequest {
                csr_pem: pending.csr_pem.clone(),
                ttl: std::time::Duration::from_secs(3600),
                impersonate: None,
            })
            .await
            .unwrap();
        let svid = accept_chain(&pending, None, &chain, &ca.bundle(), unix_now()).unwrap();
        NodeIdentity { svid, joined_with }
    }

    fn fake_ca() -> FakeCa {
        FakeCa::new(TrustDomain::new("cluster.local").unwrap())
    }

    fn roots_pem(bundle: &TrustBundle) -> String {
        bundle
            .roots()
            .iter()
            .map(|r| encode_pem(&pem::Pem::new(CERT_TAG, r.to_vec())))
            .collect()
    }

    #[tokio::test]
    async fn saved_identity_round_trips_as_one_private_file() {
        let ca = fake_ca();
        let node = issued(&ca, Some(token_hash("citadel-join.a"))).await;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        save(&data, &node).unwrap();
        let names: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![IDENTITY_FILE.to_owned()]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data.join(IDENTITY_FILE)), 0o600);
        assert_eq!(mode(&data), 0o700);
        let text = std::fs::read_to_string(data.join(IDENTITY_FILE)).unwrap();
        assert!(
            !text.contains("citadel-join.a"),
            "only the token's hash is kept"
        );
        match load(&data, &roots_pem(&ca.bundle()), unix_now()).unwrap() {
            SavedIdentity::Usable(back) => {
                assert_eq!(back.svid.serial_hex, node.svid.serial_hex);
                assert_eq!(back.joined_with, node.joined_with);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn identity_that_no_longer_verifies_is_unusable_not_an_error() {
        let ca = fake_ca();
        let node = issued(&ca, None).await;
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &node).unwrap();
        match load(dir.path(), &roots_pem(&ca.foreign_bundle()), unix_now()).unwrap() {
            SavedIdentity::Unusable { reason, .. } => {
                assert!(reason.contains("/citadel/node/fake"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // And expired later on.
        let later = node.svid.not_after + 1;
        assert!(matches!(
            load(dir.path(), &roots_pem(&ca.bundle()), later).unwrap(),
            SavedIdentity::Unusable { .. }
        ));
    }

    #[tokio::test]
    async fn rejects_saved_key_that_does_not_match_its_certificate() {
        let ca = fake_ca();
        let a = issued(&ca, None).await;
        let b = issued(&ca, None).await;
        let dir = tempfile::tempdir().unwrap();
        // What a crash between two renames used to be able to leave.
        let mixed = format!("{}{}", b.svid.key.pem(), a.svid.chain_pem());
        write_atomic(&dir.path().join(IDENTITY_FILE), mixed.as_bytes(), 0o600).unwrap();
        assert!(matches!(
            load(dir.path(), &roots_pem(&ca.bundle()), unix_now()).unwrap(),
            SavedIdentity::Unusable { .. }
        ));
    }

    #[tokio::test]
    async fn refuses_identity_file_readable_by_others() {
        let ca = fake_ca();
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &issued(&ca, None).await).unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(dir.path(), &roots_pem(&ca.bundle()), unix_now()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[tokio::test]
    async fn legacy_two_file_layout_is_read_and_replaced_on_save() {
        let ca = fake_ca();
        let node = issued(&ca, None).await;
        let dir = tempfile::tempdir().unwrap();
        write_atomic(
            &dir.path().join(LEGACY_KEY_FILE),
            node.svid.key.pem().as_bytes(),
            0o600,
        )
        .unwrap();
        write_atomic(
            &dir.path().join(LEGACY_CHAIN_FILE),
            node.svid.chain_pem().as_bytes(),
            0o644,
        )
        .unwrap();
        let SavedIdentity::Usable(back) =
            load(dir.path(), &roots_pem(&ca.bundle()), unix_now()).unwrap()
        else {
            panic!("legacy layout not read");
        };
        assert_eq!(back.joined_with, None);
        save(dir.path(), back.as_ref()).unwrap();
        assert!(!dir.path().join(LEGACY_KEY_FILE).exists());
        assert!(!dir.path().join(LEGACY_CHAIN_FILE).exists());
        assert!(dir.path().join(IDENTITY_FILE).exists());
    }

    #[tokio::test]
    async fn decides_startup_from_the_saved_identity_and_the_token() {
        let ca = fake_ca();
        let dir = Path::new("/var/lib/citadel-agent");
        let node = issued(&ca, Some(token_hash("old"))).await;
        let usable = || SavedIdentity::Usable(Box::new(node.clone()));
        let unusable = || SavedIdentity::Unusable {
            reason: "expired".into(),
            joined_with: None,
        };
        let decide = |s, t| decide_startup(s, t, dir);
        assert!(matches!(decide(usable(), None), Ok(Startup::UseSaved(_))));
        // The token it came from, left in the environment: not spent again.
        assert!(matches!(
            decide(usable(), Some("old")),
            Ok(Startup::UseSaved(_))
        ));
        // A new token: re-join (after an eviction, a CA change).
        assert!(matches!(
            decide(usable(), Some("new")),
            Ok(Startup::Join { replacing: Some(_) })
        ));
        // An identity saved before tokens were recorded keeps being used.
        let legacy = SavedIdentity::Usable(Box::new(NodeIdentity {
            joined_with: None,
            ..node.clone()
        }));
        assert!(matches!(
            decide(legacy, Some("any")),
            Ok(Startup::UseSaved(_))
        ));
        match decide(unusable(), Some("new")) {
            Ok(Startup::Join { replacing }) => assert_eq!(replacing.as_deref(), Some("expired")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(SavedIdentity::Missing, Some("new")),
            Ok(Startup::Join { replacing: None })
        ));
        let err = decide(unusable(), None).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert!(err.to_string().contains("citadel token create"), "{err}");
        assert!(decide(SavedIdentity::Missing, None).is_err());
    }
}
