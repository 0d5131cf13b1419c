//! Authority keys in a Kubernetes Secret (`citadel-ca-keys` in `--ca-namespace`, one data
//! entry per key reference), so every replica of the CA can sign with the authorities in
//! the shared store. Used with `--kubernetes` when no key-encryption key is configured.
//!
//! Keys are never overwritten. Every write carries the `resourceVersion` it read (the first
//! one creates the Secret), so two replicas saving keys at once never lose one: the loser of
//! a 409 reads again and retries.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::keystore::{KeyPem, KeyStore, KeyStoreError, check_ref};

/// Name of the Secret.
pub const SECRET_NAME: &str = "citadel-ca-keys";
/// Attempts of one save against concurrent writers.
const SAVE_ATTEMPTS: u32 = 20;

/// Wait before retry `attempt` after a conflict: growing, with jitter so that contenders
/// spread out instead of colliding again.
fn conflict_backoff(attempt: u32) -> std::time::Duration {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() % 20);
    std::time::Duration::from_millis(u64::from(attempt.min(10) * 10 + jitter))
}

/// The Secret key store.
pub struct SecretKeyStore {
    api: Api<Secret>,
    namespace: String,
}

fn api_err(what: &str, e: kube::Error) -> KeyStoreError {
    KeyStoreError::Secret(format!("{what} Secret {SECRET_NAME}: {e}"))
}

impl SecretKeyStore {
    /// Keys in Secret [`SECRET_NAME`] of `namespace`.
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    /// The namespace of the Secret.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

#[async_trait]
impl KeyStore for SecretKeyStore {
    async fn load(&self, key_ref: &str) -> Result<KeyPem, KeyStoreError> {
        check_ref(key_ref)?;
        let secret = self
            .api
            .get_opt(SECRET_NAME)
            .await
            .map_err(|e| api_err("reading", e))?;
        let bytes = secret
            .and_then(|s| s.data)
            .and_then(|mut d| d.remove(key_ref))
            .ok_or_else(|| KeyStoreError::NotFound(key_ref.to_owned()))?;
        String::from_utf8(bytes.0).map(KeyPem::new).map_err(|_| {
            KeyStoreError::Secret(format!("the key under {key_ref:?} is not UTF-8 PEM"))
        })
    }

    async fn save(&self, key_ref: &str, key: &KeyPem) -> Result<(), KeyStoreError> {
        check_ref(key_ref)?;
        let pp = PostParams::default();
        for attempt in 0..SAVE_ATTEMPTS {
            let current = self
                .api
                .get_opt(SECRET_NAME)
                .await
                .map_err(|e| api_err("reading", e))?;
            let entry = (
                key_ref.to_owned(),
                ByteString(key.expose().as_bytes().to_vec()),
            );
            let written = match current {
                None => {
                    let secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(SECRET_NAME.into()),
                            ..Default::default()
                        },
                        type_: Some("Opaque".into()),
                        data: Some(BTreeMap::from([entry])),
                        ..Default::default()
                    };
                    self.api.create(&pp, &secret).await.map(drop)
                }
                Some(mut secret) => {
                    let data = secret.data.get_or_insert_with(Default::default);
                    if data.contains_key(key_ref) {
                        return Err(KeyStoreError::Exists(key_ref.to_owned()));
                    }
                    data.insert(entry.0, entry.1);
                    // `stringData` is write-only; never send one back.
                    secret.string_data = None;
                    self.api.replace(SECRET_NAME, &pp, &secret).await.map(drop)
                }
            };
            match written {
                Ok(()) => return Ok(()),
                // Another replica wrote between our read and our write: read again.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    tokio::time::sleep(conflict_backoff(attempt)).await;
                }
                Err(e) => return Err(api_err("writing", e)),
            }
        }
        Err(KeyStoreError::Secret(format!(
            "Secret {SECRET_NAME} kept changing; {key_ref:?} not saved after {SAVE_ATTEMPTS} attempts"
        )))
    }
}
