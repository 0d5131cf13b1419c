//! Authority keys every replica can use: private keys kept in the CA's store (SQLite or
//! PostgreSQL), sealed with AES-256-GCM under a key-encryption key (KEK) that only the CA
//! processes hold (`--key-encryption-key-file`). The database alone never reveals a key.
//!
//! # The KEK file
//! One line: the standard base64 (with padding) of exactly 32 random bytes, e.g.
//! `head -c 32 /dev/urandom | base64 > kek && chmod 600 kek`. Surrounding whitespace is
//! ignored. The file must be a regular file that neither group nor others can access.
//!
//! # A sealed key
//! `citadel-sealed-key:v1:<kek-id>:<base64(nonce ‖ ciphertext ‖ tag)>`, where the nonce is 96
//! random bits drawn per seal, `kek-id` names the KEK (the first 8 bytes of a domain-separated
//! SHA-256 of it, in hex: it tells a wrong KEK apart from an altered blob without revealing the
//! KEK) and the additional authenticated data binds the format version, the KEK id and the key
//! reference, so a blob copied under another reference, or edited in any byte, fails to open.
//!
//! # Keys written before a KEK was configured
//! Read-through: a key is looked up in the store first, then in the data directory's file store
//! (when the process has one: `citadel serve`); a key found only on disk is sealed into the store
//! on that first load, so the replicas started next can load it too. The file stays where it is.
//! New keys (`citadel root prepare`, `rotate`, a first self-signed root, an imported `--ca-dir`)
//! go to the store only.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use citadel_store::{KeyBlobStore, StoreError};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::keystore::{FileKeyStore, KeyPem, KeyStore, KeyStoreError, check_ref};

/// Length of a key-encryption key, bytes (AES-256).
pub const KEK_LEN: usize = 32;
/// Prefix of every sealed key, with its format version.
const FORMAT_V1: &str = "citadel-sealed-key:v1";
/// AES-GCM tag length, bytes.
const TAG_LEN: usize = 16;

/// Why a key-encryption key file was refused. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    /// The file cannot be read.
    #[error("key-encryption key file {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        reason: String,
    },
    /// Group or others may access the file.
    #[error(
        "key-encryption key file {path} has mode {mode:o}; it must not be accessible to group or others (chmod 600)"
    )]
    LoosePermissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a regular file (a directory, a FIFO, a device…).
    #[error("key-encryption key file {0} is not a regular file")]
    NotAFile(String),
    /// The content is not base64.
    #[error(
        "key-encryption key file {0} is not base64: it must hold the base64 of 32 random bytes (e.g. `head -c 32 /dev/urandom | base64`)"
    )]
    NotBase64(String),
    /// The decoded key is not 32 bytes.
    #[error(
        "key-encryption key file {path} holds {len} byte(s) after base64 decoding; an AES-256 key-encryption key is exactly 32 (e.g. `head -c 32 /dev/urandom | base64`)"
    )]
    WrongLength {
        /// The file.
        path: String,
        /// Decoded length.
        len: usize,
    },
}

/// A key-encryption key. Its `Debug` output shows only its id.
pub struct Kek {
    key: LessSafeKey,
    id: String,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek(id={})", self.id)
    }
}

impl Kek {
    /// A KEK from its 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KekError> {
        if bytes.len() != KEK_LEN {
            return Err(KekError::WrongLength {
                path: "<memory>".into(),
                len: bytes.len(),
            });
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| KekError::WrongLength {
            path: "<memory>".into(),
            len: bytes.len(),
        })?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"citadel key-encryption key id v1\0");
        ctx.update(bytes);
        let id = hex::encode(ctx.finish().as_ref().get(..8).unwrap_or_default());
        Ok(Self {
            key: LessSafeKey::new(key),
            id,
        })
    }

    /// Reads a KEK file (see the module documentation for its format), refusing one that group
    /// or others can access, one that is not a regular file, and one of the wrong length.
    pub fn read_file(path: &Path) -> Result<Self, KekError> {
        let shown = || path.display().to_string();
        let io = |e: std::io::Error| KekError::Io {
            path: shown(),
            reason: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(KekError::NotAFile(shown()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KekError::LoosePermissions {
                path: shown(),
                mode,
            });
        }
        let text = std::fs::read(path).map_err(io)?;
        let text = std::str::from_utf8(&text).map_err(|_| KekError::NotBase64(shown()))?;
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| KekError::NotBase64(shown()))?;
        if bytes.len() != KEK_LEN {
            return Err(KekError::WrongLength {
                path: shown(),
                len: bytes.len(),
            });
        }
        Self::from_bytes(&bytes)
    }

    /// The KEK's id: 16 hex digits derived from it, safe to show and store.
    pub fn id(&self) -> &str {
        &self.id
    }
}

fn aad(kek_id: &str, key_ref: &str) -> Vec<u8> {
    format!("{FORMAT_V1}\0{kek_id}\0{key_ref}").into_bytes()
}

/// Seals `key` for `key_ref` with a fresh random nonce.
pub fn seal(
    kek: &Kek,
    rng: &dyn SecureRandom,
    key_ref: &str,
    key: &KeyPem,
) -> Result<String, KeyStoreError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)
        .map_err(|_| KeyStoreError::Store("the system random generator failed".into()))?;
    let mut buf = key.expose().as_bytes().to_vec();
    kek.key
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(&kek.id, key_ref)),
            &mut buf,
        )
        .map_err(|_| KeyStoreError::Store("AES-GCM sealing failed".into()))?;
    let mut blob = Vec::with_capacity(NONCE_LEN + buf.len());
    blob.extend_from_slice(&nonce);
    blob.extend_from_slice(&buf);
    Ok(format!("{FORMAT_V1}:{}:{}", kek.id, STANDARD.encode(blob)))
}

/// Opens what [`seal`] wrote for `key_ref`.
pub fn unseal(kek: &Kek, key_ref: &str, sealed: &str) -> Result<KeyPem, KeyStoreError> {
    let fail = |reason: String| KeyStoreError::Unseal {
        key_ref: key_ref.to_owned(),
        reason,
    };
    let rest = sealed
        .strip_prefix("citadel-sealed-key:")
        .ok_or_else(|| fail("not a sealed key".into()))?;
    let (version, rest) = rest
        .split_once(':')
        .ok_or_else(|| fail("not a sealed key".into()))?;
    if version != "v1" {
        return Err(fail(format!(
            "unsupported sealed-key format {:?} (this release reads v1)",
            version.chars().take(16).collect::<String>()
        )));
    }
    let (kek_id, body) = rest
        .split_once(':')
        .ok_or_else(|| fail("not a sealed key".into()))?;
    if kek_id != kek.id {
        return Err(fail(format!(
            "it was sealed under key-encryption key {:?}, but the configured --key-encryption-key-file holds key {:?}; every CA replica needs the same KEK",
            kek_id.chars().take(32).collect::<String>(),
            kek.id
        )));
    }
    let blob = STANDARD
        .decode(body)
        .map_err(|_| fail("the sealed key is not base64".into()))?;
    if blob.len() < NONCE_LEN + TAG_LEN {
        return Err(fail("the sealed key is truncated".into()));
    }
    let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce)
        .map_err(|_| fail("the sealed key is truncated".into()))?;
    let mut buf = ciphertext.to_vec();
    let plain = kek
        .key
        .open_in_place(nonce, Aad::from(aad(&kek.id, key_ref)), &mut buf)
        .map_err(|_| {
            fail(
                "authentication failed: the sealed key was altered or stored under another key reference"
                    .into(),
            )
        })?;
    let text = String::from_utf8(plain.to_vec())
        .map_err(|_| fail("the unsealed key is not PEM text".into()))?;
    Ok(KeyPem::new(text))
}

fn store_err(e: StoreError) -> KeyStoreError {
    KeyStoreError::Store(e.to_string())
}

/// Keys sealed in the CA's store, with an optional read-through to a file store (see the
/// module documentation).
pub struct SealedKeyStore {
    kek: Kek,
    blobs: Arc<dyn KeyBlobStore>,
    files: Option<FileKeyStore>,
    rng: SystemRandom,
}

impl fmt::Debug for SealedKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedKeyStore")
            .field("kek", &self.kek)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl SealedKeyStore {
    /// Keys sealed under `kek` in `blobs`, with no file fallback.
    pub fn new(kek: Kek, blobs: Arc<dyn KeyBlobStore>) -> Self {
        Self {
            kek,
            blobs,
            files: None,
            rng: SystemRandom::new(),
        }
    }

    /// Also loads keys that only `files` holds (sealing each into the store on first load).
    pub fn with_file_fallback(mut self, files: FileKeyStore) -> Self {
        self.files = Some(files);
        self
    }

    async fn insert(&self, key_ref: &str, key: &KeyPem) -> Result<(), KeyStoreError> {
        let sealed = seal(&self.kek, &self.rng, key_ref, key)?;
        match self
            .blobs
            .insert_key_blob(key_ref, &sealed, crate::clock::unix_now())
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict(_)) => Err(KeyStoreError::Exists(key_ref.to_owned())),
            Err(e) => Err(store_err(e)),
        }
    }
}

#[async_trait]
impl KeyStore for SealedKeyStore {
    async fn load(&self, key_ref: &str) -> Result<KeyPem, KeyStoreError> {
        check_ref(key_ref)?;
        if let Some(sealed) = self.blobs.find_key_blob(key_ref).await.map_err(store_err)? {
            return unseal(&self.kek, key_ref, &sealed);
        }
        let Some(files) = &self.files else {
            return Err(KeyStoreError::NotFound(key_ref.to_owned()));
        };
        let key = files.load(key_ref).await?;
        // A key written before the KEK was configured: seal it into the store so the other
        // replicas can load it. Failing to do so does not stop this replica.
        match self.insert(key_ref, &key).await {
            Ok(()) => tracing::info!(
                key_ref,
                "sealed a key from the data directory into the store"
            ),
            Err(KeyStoreError::Exists(_)) => {}
            Err(e) => {
                tracing::warn!(key_ref, error = %e, "could not seal a key from the data directory into the store")
            }
        }
        Ok(key)
    }

    async fn save(&self, key_ref: &str, key: &KeyPem) -> Result<(), KeyStoreError> {
        check_ref(key_ref)?;
        self.insert(key_ref, key).await
    }
}

/// The key store a CA process uses: with `kek_file`, keys sealed in the store at `store_url`
/// (reading through to `<fallback_dir>` when given); without, the file store in
/// `<data_dir>/keys` (the single-node default).
pub async fn open_key_store(
    data_dir: &Path,
    store_url: &str,
    kek_file: Option<&Path>,
    fallback_to_files: bool,
) -> anyhow::Result<Arc<dyn KeyStore>> {
    use anyhow::Context;
    let key_dir: PathBuf = data_dir.join("keys");
    let Some(kek_file) = kek_file else {
        let files =
            FileKeyStore::open(&key_dir).context("opening the key store in the data directory")?;
        return Ok(Arc::new(files));
    };
    let kek = Kek::read_file(kek_file).context("--key-encryption-key-file")?;
    let blobs = citadel_store::connect_key_blobs(store_url)
        .await
        .context("opening the sealed key store")?;
    let mut sealed = SealedKeyStore::new(kek, blobs);
    if fallback_to_files && key_dir.is_dir() {
        sealed = sealed.with_file_fallback(
            FileKeyStore::open(&key_dir).context("opening the key store in the data directory")?,
        );
    }
    tracing::info!(
        kek = sealed.kek.id(),
        "authority keys are sealed in the store"
    );
    Ok(Arc::new(sealed))
}

#[cfg(test)]
mod tests;
