//! Renewal by client certificate: a caller presenting a valid SVID of ours
//! may renew that same identity.

use async_trait::async_trait;
use citadel_identity::TrustBundle;
use tokio::sync::watch;

use super::{AuthError, AuthMethod, Authenticator, Caller, Credentials, Rejection};

/// Accepts TLS client certificates that chain to the current trust bundle.
///
/// The TLS layer only proves possession of the certificate's key; the chain
/// is judged here against the bundle of the moment, so a root rotation takes
/// effect without rebuilding the TLS configuration.
pub struct ClientCertAuthenticator {
    bundle: watch::Receiver<TrustBundle>,
}

impl ClientCertAuthenticator {
    /// Judges chains against whatever `bundle` holds at the time of the call.
    pub fn new(bundle: watch::Receiver<TrustBundle>) -> Self {
        Self { bundle }
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
        Ok(Some(Caller {
            identity: leaf.spiffe_id,
            method: AuthMethod::ClientCertificate,
            node: None,
            pod: None,
        }))
    }
}
