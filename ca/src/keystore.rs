//! Where authority private keys live.
//!
//! Keys never enter the SQL store in plaintext and never reach a log. The file store keeps
//! one PEM file per key in a 0700 directory, each file 0600, written
//! atomically (the single-node default). [`crate::sealed_keystore`] keeps keys in the SQL
//! store sealed under a key-encryption key, for replicas. [`crate::k8s::secret_keystore`] keeps
//! them in a Kubernetes Secret, for replicas on Kubernetes.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;

/// PKCS#8 PEM of a private key. Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct KeyPem(String);

impl KeyPem {
    /// Wraps PEM text.
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    /// The PEM text, for handing to a parser.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyPem(<redacted>)")
    }
}

/// Why a key could not be loaded or saved.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyStoreError {
    /// No key under that reference.
    #[error("no key stored under {0:?}")]
    NotFound(String),
    /// A key already exists under that reference; keys are never overwritten.
    #[error("a key is already stored under {0:?}; refusing to overwrite it")]
    Exists(String),
    /// The reference is not a plain name.
    #[error("invalid key reference {0:?}: use letters, digits, '.', '-' and '_' only")]
    InvalidRef(String),
    /// The key file is readable by others than its owner.
    #[error(
        "key file {path} has mode {mode:o}; it must not be accessible to group or others (chmod 600)"
    )]
    LoosePermissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The CA's store (where sealed keys live) failed.
    #[error("sealed key store: {0}")]
    Store(String),
    /// The Kubernetes API server (where the key Secret lives) failed.
    #[error("Kubernetes Secret key store: {0}")]
    Secret(String),
    /// A sealed key could not be opened (wrong key-encryption key, altered or moved blob).
    #[error("cannot unseal the key stored under {key_ref:?}: {reason}")]
    Unseal {
        /// The key reference.
        key_ref: String,
        /// Why, without any key material.
        reason: String,
    },
    /// The operating system refused.
    #[error("key store I/O error on {path}: {reason}")]
    Io {
        /// The file or directory.
        path: String,
        /// What the OS said.
        reason: String,
    },
}

/// Loads and saves authority private keys by reference.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Loads the key stored under `key_ref`.
    async fn load(&self, key_ref: &str) -> Result<KeyPem, KeyStoreError>;
    /// Saves a new key under `key_ref`; fails if one exists.
    async fn save(&self, key_ref: &str, key: &KeyPem) -> Result<(), KeyStoreError>;
}

pub(crate) fn check_ref(key_ref: &str) -> Result<(), KeyStoreError> {
    let ok = !key_ref.is_empty()
        && !key_ref.starts_with('.')
        && key_ref
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(KeyStoreError::InvalidRef(key_ref.to_owned()))
    }
}

fn io_err(path: &Path, e: std::io::Error) -> KeyStoreError {
    KeyStoreError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Keys as 0600 files in a 0700 directory.
#[derive(Debug, Clone)]
pub struct FileKeyStore {
    dir: PathBuf,
}

impl FileKeyStore {
    /// Opens (creating if needed) the key directory and tightens its mode to 0700.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, KeyStoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err(&dir, e))?;
        Ok(Self { dir })
    }

    fn path(&self, key_ref: &str) -> Result<PathBuf, KeyStoreError> {
        check_ref(key_ref)?;
        Ok(self.dir.join(key_ref))
    }
}

/// Reads a private-key file, refusing one that group or others can access.
pub fn read_private_key_file(path: &Path) -> Result<KeyPem, KeyStoreError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            KeyStoreError::NotFound(path.display().to_string())
        } else {
            io_err(path, e)
        }
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyStoreError::LoosePermissions {
            path: path.display().to_string(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    Ok(KeyPem(text))
}

#[async_trait]
impl KeyStore for FileKeyStore {
    async fn load(&self, key_ref: &str) -> Result<KeyPem, KeyStoreError> {
        let path = self.path(key_ref)?;
        read_private_key_file(&path)
    }

    async fn save(&self, key_ref: &str, key: &KeyPem) -> Result<(), KeyStoreError> {
        let path = self.path(key_ref)?;
        if path.exists() {
            return Err(KeyStoreError::Exists(key_ref.to_owned()));
        }
        // Write to a private temporary file, fsync, then rename: a crash never
        // leaves a half-written key under the real name.
        let tmp = self.dir.join(format!(".{key_ref}.tmp"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        file.write_all(key.0.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// An in-memory key store for tests.
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    keys: Mutex<std::collections::HashMap<String, KeyPem>>,
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    async fn load(&self, key_ref: &str) -> Result<KeyPem, KeyStoreError> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.get(key_ref)
            .cloned()
            .ok_or_else(|| KeyStoreError::NotFound(key_ref.to_owned()))
    }

    async fn save(&self, key_ref: &str, key: &KeyPem) -> Result<(), KeyStoreError> {
        check_ref(key_ref)?;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.contains_key(key_ref) {
            return Err(KeyStoreError::Exists(key_ref.to_owned()));
        }
        keys.insert(key_ref.to_owned(), key.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn key_files_are_written_0600_in_a_0700_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let store = FileKeyStore::open(&dir).unwrap();
        store
            .save("a.key.pem", &KeyPem::new("secret".into()))
            .await
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("a.key.pem")), 0o600);
        assert_eq!(store.load("a.key.pem").await.unwrap().expose(), "secret");
    }

    #[tokio::test]
    async fn refuses_to_overwrite_a_key() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileKeyStore::open(tmp.path()).unwrap();
        let key = KeyPem::new("k".into());
        store.save("k", &key).await.unwrap();
        assert!(matches!(
            store.save("k", &key).await,
            Err(KeyStoreError::Exists(_))
        ));
    }

    #[tokio::test]
    async fn rejects_key_reference_with_path_separator() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileKeyStore::open(tmp.path()).unwrap();
        for bad in ["../x", "a/b", "", ".hidden"] {
            assert!(matches!(
                store.load(bad).await,
                Err(KeyStoreError::InvalidRef(_))
            ));
        }
    }

    #[tokio::test]
    async fn refuses_key_file_readable_by_others() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileKeyStore::open(tmp.path()).unwrap();
        store.save("k", &KeyPem::new("k".into())).await.unwrap();
        std::fs::set_permissions(tmp.path().join("k"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        assert!(matches!(
            store.load("k").await,
            Err(KeyStoreError::LoosePermissions { .. })
        ));
    }

    #[test]
    fn key_pem_debug_is_redacted() {
        let k = KeyPem::new("-----BEGIN PRIVATE KEY-----".into());
        assert!(!format!("{k:?}").contains("PRIVATE"));
    }
}
