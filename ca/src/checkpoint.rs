//! Signed ledger checkpoints.
//!
//! The ledger's hash chain shows an edited, deleted or truncated row, but someone who can write
//! the database can also rewrite *every* row and the head consistently. So the CA signs, every
//! `--ledger-checkpoint-interval`, at start-up and at clean shutdown, a checkpoint of the head
//! (sequence, row hash, time) with a **ledger key** of its own, and `citadel ledger verify`
//! requires the checkpointed row to still carry the checkpointed hash.
//!
//! # Where the key lives, and why a database writer cannot forge a checkpoint
//! The ledger key (ECDSA P-256) is kept exactly like the authority keys, under the reference
//! [`LEDGER_KEY_REF`] of the CA's key store: a 0600 file in `<data-dir>/keys`, sealed into the
//! store under the key-encryption key, or in the Kubernetes Secret. Its public key is **pinned**
//! in the data directory ([`PINNED_KEY_FILE`], written by the first start, compared by every
//! later one) and that file, not anything in the database, is what `ledger verify` trusts (or
//! `--ledger-public-key FILE`, for an auditor holding a copy). A database writer can neither read
//! the private key (it is not there in the clear) nor change which public key is trusted.
//!
//! # What is signed (version 1)
//! ECDSA P-256 with SHA-256 (ASN.1 DER signature) over [`checkpoint_message`]: `str(tag)`,
//! `seq` (8 bytes big-endian), the head hash (32 bytes), `signed_at` (8 bytes big-endian) and
//! the key id (32 bytes: SHA-256 of the public key's SubjectPublicKeyInfo DER), where `str(s)`
//! is the length of `s` as 8 bytes big-endian followed by its bytes.
//!
//! # Several replicas
//! They share the key (sealed store or Secret), so any of them may checkpoint: a checkpoint for
//! a seq already checkpointed is dropped by the store, and each one is valid for the seq it
//! names, so racing writers are harmless and no lease is needed.
//!
//! # Limits
//! Deleting checkpoint rows hides rewrites made after the newest remaining one; `ledger verify`
//! fails when rows exist but no checkpoint does, and prints the checkpoint it used so an operator
//! can keep it elsewhere. The CA signs the head it reads; it first checks the newest checkpoint
//! still holds (and refuses to sign otherwise), so a writer active while the CA runs can rewrite
//! unnoticed only the rows newer than the newest checkpoint.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use citadel_store::{CheckpointStore, LedgerCheckpoint, StoreError};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use tokio::sync::watch;

use crate::clock::unix_now;
use crate::keystore::{KeyPem, KeyStore, KeyStoreError};

/// The ledger key's reference in the CA's key store.
pub const LEDGER_KEY_REF: &str = "ledger-checkpoint.key.pem";
/// The pinned public key, in the data directory (PEM `PUBLIC KEY`).
pub const PINNED_KEY_FILE: &str = "ledger-key.pub.pem";
/// Default time between two checkpoints (only taken when the ledger grew).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

const DOMAIN_TAG: &str = "citadel.ledger.checkpoint.v1";
/// DER of a P-256 SubjectPublicKeyInfo up to the 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const P256_POINT_LEN: usize = 65;

/// Why a ledger key or a checkpoint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The ledger private key is not a PKCS#8 P-256 key.
    #[error("ledger key: {0}")]
    BadKey(String),
    /// The public key is not a P-256 SubjectPublicKeyInfo.
    #[error("ledger public key: {0}")]
    BadPublicKey(String),
    /// Signing failed.
    #[error("signing a ledger checkpoint failed")]
    Sign,
}

/// The public half of the ledger key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerPublicKey {
    spki: Vec<u8>,
}

impl LedgerPublicKey {
    /// From SubjectPublicKeyInfo DER; only P-256 keys are accepted.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, CheckpointError> {
        let point = der
            .strip_prefix(P256_SPKI_PREFIX.as_slice())
            .ok_or_else(|| CheckpointError::BadPublicKey("not an ECDSA P-256 key".into()))?;
        if point.len() != P256_POINT_LEN || point.first() != Some(&0x04) {
            return Err(CheckpointError::BadPublicKey(
                "not an uncompressed P-256 point".into(),
            ));
        }
        Ok(Self { spki: der.to_vec() })
    }

    /// From PEM text holding one `PUBLIC KEY` block.
    pub fn from_pem(text: &str) -> Result<Self, CheckpointError> {
        let parsed =
            pem::parse(text).map_err(|_| CheckpointError::BadPublicKey("not PEM".into()))?;
        if parsed.tag() != "PUBLIC KEY" {
            return Err(CheckpointError::BadPublicKey(format!(
                "expected a PUBLIC KEY block, found {:?}",
                parsed.tag()
            )));
        }
        Self::from_spki_der(parsed.contents())
    }

    /// As PEM (`PUBLIC KEY`).
    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PUBLIC KEY", self.spki.clone()))
    }

    /// SHA-256 of the SubjectPublicKeyInfo DER: names the key in every checkpoint.
    pub fn key_id(&self) -> [u8; 32] {
        sha256(&self.spki)
    }

    fn point(&self) -> &[u8] {
        self.spki.get(P256_SPKI_PREFIX.len()..).unwrap_or_default()
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

/// The bytes a checkpoint signature covers (format in the module documentation). Pure.
pub fn checkpoint_message(
    seq: i64,
    head_hash: &[u8; 32],
    signed_at: i64,
    key_id: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + DOMAIN_TAG.len() + 8 + 32 + 8 + 32);
    m.extend_from_slice(&(DOMAIN_TAG.len() as u64).to_be_bytes());
    m.extend_from_slice(DOMAIN_TAG.as_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head_hash);
    m.extend_from_slice(&signed_at.to_be_bytes());
    m.extend_from_slice(key_id);
    m
}

/// The ledger private key, ready to sign checkpoints. `Debug` shows the key id only.
pub struct LedgerSigner {
    pair: EcdsaKeyPair,
    public: LedgerPublicKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for LedgerSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LedgerSigner(key_id={})",
            hex::encode(self.public.key_id())
        )
    }
}

impl LedgerSigner {
    /// A new random key, and its PKCS#8 PEM for the key store.
    pub fn generate() -> Result<(Self, KeyPem), CheckpointError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| CheckpointError::BadKey("cannot generate a P-256 key".into()))?;
        let pem = KeyPem::new(pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            pkcs8.as_ref().to_vec(),
        )));
        Ok((Self::from_key_pem(&pem)?, pem))
    }

    /// From PKCS#8 PEM (`PRIVATE KEY`) of a P-256 key.
    pub fn from_key_pem(key: &KeyPem) -> Result<Self, CheckpointError> {
        let parsed =
            pem::parse(key.expose()).map_err(|_| CheckpointError::BadKey("not PEM".into()))?;
        if parsed.tag() != "PRIVATE KEY" {
            return Err(CheckpointError::BadKey(
                "expected a PKCS#8 PRIVATE KEY block".into(),
            ));
        }
        let rng = SystemRandom::new();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, parsed.contents(), &rng)
                .map_err(|_| CheckpointError::BadKey("not a PKCS#8 ECDSA P-256 key".into()))?;
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        let public = LedgerPublicKey::from_spki_der(&spki)?;
        Ok(Self { pair, public, rng })
    }

    /// The public half.
    pub fn public(&self) -> &LedgerPublicKey {
        &self.public
    }

    /// Signs a checkpoint of head `(seq, head_hash)` at `now`.
    pub fn sign(
        &self,
        seq: i64,
        head_hash: [u8; 32],
        now: i64,
    ) -> Result<LedgerCheckpoint, CheckpointError> {
        let key_id = self.public.key_id();
        let message = checkpoint_message(seq, &head_hash, now, &key_id);
        let signature = self
            .pair
            .sign(&self.rng, &message)
            .map_err(|_| CheckpointError::Sign)?;
        Ok(LedgerCheckpoint {
            seq,
            head_hash,
            signed_at: now,
            key_id,
            signature: signature.as_ref().to_vec(),
        })
    }
}

/// Checks that `checkpoint` was signed by `key`, over exactly its fields. The error says why
/// not, in words for the operator.
pub fn verify_signature(
    key: &LedgerPublicKey,
    checkpoint: &LedgerCheckpoint,
) -> Result<(), String> {
    if checkpoint.key_id != key.key_id() {
        return Err(format!(
            "the checkpoint at seq {} names ledger key {}, not the pinned key {}",
            checkpoint.seq,
            short_id(&checkpoint.key_id),
            short_id(&key.key_id())
        ));
    }
    let message = checkpoint_message(
        checkpoint.seq,
        &checkpoint.head_hash,
        checkpoint.signed_at,
        &checkpoint.key_id,
    );
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.point())
        .verify(&message, &checkpoint.signature)
        .map_err(|_| {
            format!(
                "the signature of the checkpoint at seq {} does not verify: the checkpoint was forged or altered",
                checkpoint.seq
            )
        })
}

/// The first 16 hex digits of a key id (enough to tell keys apart in messages).
pub fn short_id(key_id: &[u8; 32]) -> String {
    hex::encode(key_id.get(..8).unwrap_or_default())
}

/// What the newest checkpoint says about a ledger whose chain is intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointVerdict {
    /// The ledger is empty and nothing was checkpointed yet.
    Empty,
    /// The checkpoint verifies and its row still carries its hash.
    Vouched(LedgerCheckpoint),
    /// Something is wrong; the reason is for the operator.
    Broken(String),
}

/// Judges the newest `checkpoint` against the pinned `key`, the stored hash of the row it names
/// (`row_hash`, `None` when that row is missing) and the number of rows of the (intact) chain.
/// Pure.
pub fn judge(
    key: &LedgerPublicKey,
    checkpoint: Option<&LedgerCheckpoint>,
    row_hash: Option<[u8; 32]>,
    ledger_rows: u64,
) -> CheckpointVerdict {
    let Some(checkpoint) = checkpoint else {
        return if ledger_rows == 0 {
            CheckpointVerdict::Empty
        } else {
            CheckpointVerdict::Broken(format!(
                "the ledger has {ledger_rows} row(s) but no signed checkpoint: checkpoints were deleted, or no CA has run since the upgrade that introduced them"
            ))
        };
    };
    if let Err(reason) = verify_signature(key, checkpoint) {
        return CheckpointVerdict::Broken(reason);
    }
    match row_hash {
        None => CheckpointVerdict::Broken(format!(
            "row {} named by the signed checkpoint is missing: the ledger was truncated or rewritten",
            checkpoint.seq
        )),
        Some(hash) if hash != checkpoint.head_hash => CheckpointVerdict::Broken(format!(
            "row {} does not carry the hash signed in its checkpoint: the ledger was rewritten",
            checkpoint.seq
        )),
        Some(_) => CheckpointVerdict::Vouched(checkpoint.clone()),
    }
}

/// Loads the ledger key from the key store, creating it on first use. Replicas racing to
/// create it all end up with the one that was stored first.
pub async fn load_or_create_signer(keys: &dyn KeyStore) -> anyhow::Result<LedgerSigner> {
    let loaded = match keys.load(LEDGER_KEY_REF).await {
        Ok(pem) => pem,
        Err(KeyStoreError::NotFound(_)) => {
            let (signer, pem) = LedgerSigner::generate()?;
            match keys.save(LEDGER_KEY_REF, &pem).await {
                Ok(()) => {
                    tracing::info!(key_id = %short_id(&signer.public().key_id()), "created the ledger checkpoint key");
                    return Ok(signer);
                }
                Err(KeyStoreError::Exists(_)) => keys.load(LEDGER_KEY_REF).await?,
                Err(e) => return Err(e).context("saving the ledger checkpoint key"),
            }
        }
        Err(e) => return Err(e).context("loading the ledger checkpoint key"),
    };
    Ok(LedgerSigner::from_key_pem(&loaded)?)
}

/// Pins `key` in `data_dir` ([`PINNED_KEY_FILE`]) if nothing is pinned yet; otherwise refuses a
/// key other than the pinned one (the key store now holds another ledger key).
pub fn pin_public_key(data_dir: &Path, key: &LedgerPublicKey) -> anyhow::Result<()> {
    let path = data_dir.join(PINNED_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let pinned = LedgerPublicKey::from_pem(&text)
                .with_context(|| format!("reading the pinned ledger key {}", path.display()))?;
            anyhow::ensure!(
                &pinned == key,
                "the ledger key in the key store ({}) is not the one pinned in {} ({}): refusing to sign checkpoints with another key (restore the key, or move the pin aside if the change is intended)",
                short_id(&key.key_id()),
                path.display(),
                short_id(&pinned.key_id())
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A name of its own: replicas sharing the data directory may pin at the same time.
            let mut nonce = [0u8; 8];
            ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut nonce)
                .map_err(|_| anyhow::anyhow!("system random source failed"))?;
            let tmp = data_dir.join(format!(".{PINNED_KEY_FILE}.{}.tmp", hex::encode(nonce)));
            std::fs::write(&tmp, key.to_pem())
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(file = %path.display(), key_id = %short_id(&key.key_id()), "pinned the ledger checkpoint key");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Signs and stores checkpoints of the ledger head.
pub struct Checkpointer {
    store: Arc<dyn CheckpointStore>,
    signer: LedgerSigner,
    /// The highest seq this process checkpointed (0: none).
    last: Mutex<i64>,
}

impl Checkpointer {
    /// Over `store`, signing with `signer`.
    pub fn new(store: Arc<dyn CheckpointStore>, signer: LedgerSigner) -> Self {
        Self {
            store,
            signer,
            last: Mutex::new(0),
        }
    }

    /// Checkpoints the current head at `now` unless it is empty or already checkpointed by
    /// this process. Returns the checkpoint stored, if any.
    pub async fn checkpoint_now(&self, now: i64) -> Result<Option<LedgerCheckpoint>, StoreError> {
        let (seq, hash) = self.store.ledger_head().await?;
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        if seq <= last {
            return Ok(None);
        }
        // Never vouch for a ledger that already fails the newest checkpoint: the rewrite would
        // otherwise be signed over and hidden.
        if let Some(previous) = self.store.latest_checkpoint().await? {
            let row = self.store.ledger_row_hash(previous.seq).await?;
            if let CheckpointVerdict::Broken(reason) =
                judge(self.signer.public(), Some(&previous), row, 0)
            {
                return Err(StoreError::Corrupt(format!(
                    "not signing a checkpoint: {reason}"
                )));
            }
        }
        let checkpoint = self
            .signer
            .sign(seq, hash, now)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let stored = self.store.insert_checkpoint(&checkpoint).await?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *last = (*last).max(seq);
        Ok(stored.then_some(checkpoint))
    }

    /// Checkpoints every `interval` until `shutdown` (the final checkpoint is the caller's, after
    /// in-flight requests are done: [`crate::serve::RunningCa::shutdown`]).
    pub async fn run(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            self.log_checkpoint("periodic").await;
        }
    }

    /// [`Self::checkpoint_now`], logging the outcome (a failure is retried next round).
    pub async fn log_checkpoint(&self, why: &str) {
        match self.checkpoint_now(unix_now()).await {
            Ok(Some(c)) => tracing::debug!(seq = c.seq, why, "ledger checkpoint signed"),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, why, "ledger checkpoint failed; retrying later"),
        }
    }
}

#[cfg(test)]
mod tests;
