//! Who is calling: authentication of CSR API callers.
//!
//! Each credential kind is one [`Authenticator`]; an [`AuthChain`] tries
//! them in order (client certificate, join token, local JWT, Kubernetes TokenReview). The first that
//! recognises a credential and accepts it decides; if every one that
//! recognised a credential failed, the first failure is reported.

pub mod client_cert;
pub mod join_token;
pub mod jwt;
pub mod jwt_cache;
pub mod review_cache;
pub mod token_review;

use std::sync::Arc;

use async_trait::async_trait;
use citadel_identity::SpiffeId;
use rustls_pki_types::CertificateDer;

/// What a request presents.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The bearer token from `authorization: Bearer …`, if any.
    pub bearer_token: Option<&'a str>,
    /// The TLS client certificate chain, if one was presented.
    pub peer_chain: Option<&'a [CertificateDer<'static>]>,
    /// Unix seconds now (decisions take time as an argument).
    pub now: i64,
}

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A client certificate issued by this CA.
    ClientCertificate,
    /// A JWT verified against the issuer's keys.
    Jwt,
    /// A one-time join token created by `citadel token create`.
    JoinToken,
    /// A Kubernetes service-account token accepted by the API server's TokenReview.
    TokenReview,
}

impl AuthMethod {
    /// Short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientCertificate => "client_certificate",
            AuthMethod::Jwt => "jwt",
            AuthMethod::JoinToken => "join_token",
            AuthMethod::TokenReview => "token_review",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's own identity.
    pub identity: SpiffeId,
    /// How it was proven.
    pub method: AuthMethod,
    /// The node the caller runs on, when the credential says so.
    pub node: Option<String>,
    /// The pod name, when the credential says so.
    pub pod: Option<String>,
    /// The pod UID, when the credential says so (a pod-bound service-account token).
    pub pod_uid: Option<String>,
    /// Serial (lowercase hex) of the client certificate the caller authenticated with.
    pub certificate_serial: Option<String>,
}

/// A credential was present but not acceptable. The reason goes to the CA
/// log and to the caller; it never contains the credential itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{method} rejected: {reason}")]
pub struct Rejection {
    /// Which authenticator rejected.
    pub method: &'static str,
    /// Why.
    pub reason: String,
}

/// The outcome of a whole [`AuthChain`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Nothing that any authenticator recognises was presented.
    #[error("no credentials: send 'authorization: Bearer <token>' or a client certificate")]
    NoCredentials,
    /// A credential was presented and rejected.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// A credential was presented and is genuine, but its holder may no longer use it (a
    /// superseded node certificate, an evicted node): `PermissionDenied`.
    #[error("{0}")]
    Denied(String),
    /// A credential was presented but cannot be checked right now (its backing store is
    /// unreachable); retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
}

/// One way of authenticating a caller.
#[async_trait]
pub trait Authenticator: Send + Sync {
    /// `Ok(None)` when this authenticator does not apply (no such credential);
    /// `Ok(Some)` when it accepts; `Err` ([`AuthError::Rejected`], [`AuthError::Denied`] or
    /// [`AuthError::Unavailable`]) when it recognises the credential and cannot accept it.
    async fn authenticate(&self, creds: &Credentials<'_>) -> Result<Option<Caller>, AuthError>;
}

/// Authenticators tried in order.
#[derive(Clone, Default)]
pub struct AuthChain {
    authenticators: Vec<Arc<dyn Authenticator>>,
}

impl AuthChain {
    /// A chain of the given authenticators, tried in this order.
    pub fn new(authenticators: Vec<Arc<dyn Authenticator>>) -> Self {
        Self { authenticators }
    }

    /// Authenticates a caller.
    pub async fn authenticate(&self, creds: &Credentials<'_>) -> Result<Caller, AuthError> {
        let mut first_failure = None;
        for a in &self.authenticators {
            match a.authenticate(creds).await {
                Ok(Some(caller)) => return Ok(caller),
                Ok(None) => {}
                Err(e) => {
                    first_failure.get_or_insert(e);
                }
            }
        }
        Err(first_failure.unwrap_or(AuthError::NoCredentials))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<Option<Caller>, AuthError>);

    #[async_trait]
    impl Authenticator for Fixed {
        async fn authenticate(&self, _: &Credentials<'_>) -> Result<Option<Caller>, AuthError> {
            self.0.clone()
        }
    }

    fn caller() -> Caller {
        Caller {
            identity: SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap(),
            method: AuthMethod::Jwt,
            node: None,
            pod: None,
            pod_uid: None,
            certificate_serial: None,
        }
    }

    fn creds() -> Credentials<'static> {
        Credentials {
            bearer_token: None,
            peer_chain: None,
            now: 0,
        }
    }

    fn reject(m: &'static str) -> Rejection {
        Rejection {
            method: m,
            reason: "no".into(),
        }
    }

    #[tokio::test]
    async fn nothing_applicable_is_no_credentials() {
        let chain = AuthChain::new(vec![Arc::new(Fixed(Ok(None)))]);
        assert_eq!(
            chain.authenticate(&creds()).await,
            Err(AuthError::NoCredentials)
        );
    }

    #[tokio::test]
    async fn a_later_authenticator_can_accept_after_an_earlier_rejection() {
        let chain = AuthChain::new(vec![
            Arc::new(Fixed(Err(reject("client_certificate").into()))),
            Arc::new(Fixed(Ok(Some(caller())))),
        ]);
        assert_eq!(chain.authenticate(&creds()).await, Ok(caller()));
    }

    #[tokio::test]
    async fn first_rejection_is_reported_when_none_accepts() {
        let chain = AuthChain::new(vec![
            Arc::new(Fixed(Ok(None))),
            Arc::new(Fixed(Err(reject("jwt").into()))),
            Arc::new(Fixed(Err(reject("other").into()))),
        ]);
        assert_eq!(
            chain.authenticate(&creds()).await,
            Err(AuthError::Rejected(reject("jwt")))
        );
    }

    #[tokio::test]
    async fn unavailable_backend_is_reported_as_unavailable_not_as_a_rejection() {
        let chain = AuthChain::new(vec![
            Arc::new(Fixed(Ok(None))),
            Arc::new(Fixed(Err(AuthError::Unavailable("store down".into())))),
        ]);
        assert_eq!(
            chain.authenticate(&creds()).await,
            Err(AuthError::Unavailable("store down".into()))
        );
    }
}
