//! Renewal by client certificate: a caller presenting a valid SVID of ours
//! may renew that same identity.
//!
//! A node certificate (`spiffe://<td>/citadel/node/<NAME>`) is accepted only
//! while the store records its serial as the node's current or pending one
//! and the node is not evicted ([`citadel_store::NodeStore::use_node_certificate`]);
//! every accepted use is recorded there (last seen, promotion of a pending
//! certificate). This is the one place node certificates are judged, so it
//! covers renewal, impersonation and the trust-bundle stream alike.

use std::sync::Arc;

use async_trait::async_trait;
use citadel_identity::{TrustBundle, TrustDomain};
use citadel_store::{NodeCertificateRole, NodeCertificateUse, NodeRefusal, NodeStore};
use tokio::sync::watch;

use super::{AuthError, AuthMethod, Authenticator, Caller, Credentials, Rejection};
use crate::node::node_name_of;

/// Accepts TLS client certificates that chain to the current trust bundle.
///
/// The TLS layer only proves possession of the certificate's key; the chain
/// is judged here against the bundle of the moment, so a root rotation takes
/// effect without rebuilding the TLS configuration.
pub struct ClientCertAuthenticator {
    bundle: watch::Receiver<TrustBundle>,
    store: Arc<dyn NodeStore>,
    trust_domain: TrustDomain,
}

impl ClientCertAuthenticator {
    /// Judges chains against whatever `bundle` holds at the time of the call, and node
    /// certificates of `trust_domain` against the serials `store` records.
    pub fn new(
        bundle: watch::Receiver<TrustBundle>,
        store: Arc<dyn NodeStore>,
        trust_domain: TrustDomain,
    ) -> Self {
        Self {
            bundle,
            store,
            trust_domain,
        }
    }
}

/// What the caller of a refused node certificate is told (pure).
pub fn node_refusal_message(node: &str, refusal: NodeRefusal) -> String {
    match refusal {
        NodeRefusal::Superseded => format!(
            "node certificate for node {node} has been superseded by a newer one; \
             use the newest node certificate or re-join with a new token"
        ),
        NodeRefusal::Evicted => {
            format!("node {node} has been evicted; re-join with a new token")
        }
        NodeRefusal::Unknown => {
            format!(
                "node {node} is not a joined node; join with a token from `citadel token create`"
            )
        }
    }
}

#[async_trait]
impl Authenticator for ClientCertAuthenticator {
    async fn authenticate(&self, creds: &Credentials<'_>) -> Result<Option<Caller>, AuthError> {
        let Some(chain) = creds.peer_chain.filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let bundle = self.bundle.borrow().clone();
        let now = u64::try_from(creds.now).unwrap_or(0);
        let leaf =
            citadel_identity::svid::verify_chain(chain, &bundle, now).map_err(|e| Rejection {
                method: AuthMethod::ClientCertificate.as_str(),
                reason: e.to_string(),
            })?;
        if let Some(node) = node_name_of(&leaf.spiffe_id, &self.trust_domain) {
            let used = self
                .store
                .use_node_certificate(node, &leaf.serial_hex, creds.now)
                .await
                .map_err(|e| {
                    AuthError::Unavailable(format!("node certificates cannot be checked: {e}"))
                })?;
            match used {
                NodeCertificateUse::Accepted(NodeCertificateRole::Current) => {}
                NodeCertificateUse::Accepted(NodeCertificateRole::Pending) => tracing::info!(
                    node,
                    serial = %leaf.serial_hex,
                    "node agent uses its renewed node certificate; the previous one is now refused"
                ),
                NodeCertificateUse::Refused(refusal) => {
                    tracing::warn!(
                        node,
                        serial = %leaf.serial_hex,
                        reason = %refusal,
                        "node certificate refused"
                    );
                    return Err(AuthError::Denied(node_refusal_message(node, refusal)));
                }
            }
        }
        Ok(Some(Caller {
            identity: leaf.spiffe_id,
            method: AuthMethod::ClientCertificate,
            node: None,
            pod: None,
            pod_uid: None,
            certificate_serial: Some(leaf.serial_hex),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_tell_the_node_what_to_do() {
        let superseded = node_refusal_message("node-a", NodeRefusal::Superseded);
        assert!(superseded.contains("node-a"), "{superseded}");
        assert!(
            superseded.contains("superseded by a newer one"),
            "{superseded}"
        );
        let evicted = node_refusal_message("node-a", NodeRefusal::Evicted);
        assert!(evicted.contains("evicted"), "{evicted}");
        assert!(evicted.contains("re-join with a new token"), "{evicted}");
        let unknown = node_refusal_message("node-a", NodeRefusal::Unknown);
        assert!(unknown.contains("not a joined node"), "{unknown}");
    }
}
