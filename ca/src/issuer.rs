//! The issuing core: authenticate, authorize, check the CSR, decide the
//! lifetime, sign, record durably, answer. Transport-agnostic: the gRPC
//! service is a thin shell around [`CertificateIssuer::issue`].

use std::sync::Arc;
use std::time::Instant;

use citadel_identity::lifetime::{LifetimeError, LifetimePolicy, leaf_validity};
use citadel_identity::{SpiffeId, TrustDomain};
use citadel_store::{GroupCommitLedger, NewIssuance, StoreError};
use tokio::sync::watch;

use crate::auth::{AuthChain, AuthError, Caller, Credentials};
use crate::authority::{Authority, AuthorityError, IssuedCertificate, LeafSpec, random_serial};
use crate::csr::{CsrError, parse_and_verify};
use crate::metrics::{CaMetrics, IssuedLabels};

/// One certificate request, as the transport received it.
#[derive(Debug, Clone)]
pub struct IssueRequest<'a> {
    /// PEM CSR.
    pub csr_pem: &'a str,
    /// Requested TTL in seconds (0 = default).
    pub requested_ttl_secs: i64,
    /// An identity requested on behalf of another workload (`ImpersonatedIdentity`).
    pub impersonated_identity: Option<&'a str>,
    /// The caller's credentials.
    pub credentials: Credentials<'a>,
}

/// A signed certificate and the chain to answer with.
#[derive(Debug, Clone)]
pub struct IssuedChain {
    /// Who it was issued to.
    pub spiffe_id: SpiffeId,
    /// The leaf.
    pub leaf: IssuedCertificate,
    /// Leaf PEM, then intermediates, root last.
    pub chain_pem: Vec<String>,
    /// The ledger sequence number of the issuance.
    pub ledger_seq: i64,
}

/// Why a request was not answered with a certificate. Each variant maps to
/// one gRPC status code; messages never contain credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IssueError {
    /// No or bad credentials (`Unauthenticated`).
    #[error("{0}")]
    Unauthenticated(#[from] AuthError),
    /// Authenticated, but not allowed this identity (`PermissionDenied`).
    #[error("{0}")]
    PermissionDenied(String),
    /// The CSR or a parameter is bad (`InvalidArgument`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The CA cannot sign right now, e.g. its signer has expired (`FailedPrecondition`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The ledger cannot record the issuance; nothing was issued (`Unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure (`Internal`).
    #[error("{0}")]
    Internal(String),
}

impl IssueError {
    /// The metric label of this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            IssueError::Unauthenticated(_) => "unauthenticated",
            IssueError::PermissionDenied(_) => "permission_denied",
            IssueError::InvalidArgument(_) => "invalid_argument",
            IssueError::FailedPrecondition(_) => "failed_precondition",
            IssueError::Unavailable(_) => "ledger_unavailable",
            IssueError::Internal(_) => "internal",
        }
    }
}

impl From<CsrError> for IssueError {
    fn from(e: CsrError) -> Self {
        IssueError::InvalidArgument(e.to_string())
    }
}

impl From<LifetimeError> for IssueError {
    fn from(e: LifetimeError) -> Self {
        match e {
            LifetimeError::SignerExpired { .. } | LifetimeError::SignerNotYetValid { .. } => {
                IssueError::FailedPrecondition(e.to_string())
            }
            other => IssueError::InvalidArgument(other.to_string()),
        }
    }
}

impl From<AuthorityError> for IssueError {
    fn from(e: AuthorityError) -> Self {
        IssueError::Internal(e.to_string())
    }
}

impl From<StoreError> for IssueError {
    fn from(e: StoreError) -> Self {
        IssueError::Unavailable(format!(
            "issuance ledger unavailable, no certificate issued: {e}"
        ))
    }
}

/// Decides whether `caller` may receive `requested` (pure).
///
/// A caller gets its own identity. Requests on behalf of another workload
/// need a trusted node agent, which arrives with node attestation; until
/// then every impersonation is refused.
pub fn authorize(caller: &Caller, impersonated: Option<&str>) -> Result<SpiffeId, IssueError> {
    match impersonated {
        None => Ok(caller.identity.clone()),
        Some(other) if other == caller.identity.as_str() => Ok(caller.identity.clone()),
        Some(other) => Err(IssueError::PermissionDenied(format!(
            "{} may not request certificates for {other}: it is not a trusted node agent",
            caller.identity
        ))),
    }
}

/// Checks that the SANs a CSR asks for are exactly what the caller gets (pure).
pub fn check_requested_names(
    granted: &SpiffeId,
    requested_uris: &[String],
    requested_other: &[String],
) -> Result<(), IssueError> {
    match requested_uris {
        [] => {}
        [one] if one == granted.as_str() => {}
        [one] => {
            return Err(IssueError::PermissionDenied(format!(
                "CSR asks for identity {one} but the caller is {granted}"
            )));
        }
        many => {
            return Err(IssueError::InvalidArgument(format!(
                "CSR asks for {} URI SANs; an X509-SVID has exactly one",
                many.len()
            )));
        }
    }
    if let Some(first) = requested_other.first() {
        return Err(IssueError::PermissionDenied(format!(
            "CSR asks for {first}; {granted} is not authorized for names other than its SPIFFE ID"
        )));
    }
    Ok(())
}

/// Issues workload certificates.
pub struct CertificateIssuer {
    trust_domain: TrustDomain,
    authority: watch::Receiver<Arc<Authority>>,
    auth: AuthChain,
    ledger: GroupCommitLedger,
    lifetime: LifetimePolicy,
    metrics: Arc<CaMetrics>,
}

impl CertificateIssuer {
    /// Assembles the issuing core.
    pub fn new(
        trust_domain: TrustDomain,
        authority: watch::Receiver<Arc<Authority>>,
        auth: AuthChain,
        ledger: GroupCommitLedger,
        lifetime: LifetimePolicy,
        metrics: Arc<CaMetrics>,
    ) -> Self {
        Self {
            trust_domain,
            authority,
            auth,
            ledger,
            lifetime,
            metrics,
        }
    }

    /// The trust domain this CA issues in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Handles one request end to end; counts it in the metrics.
    pub async fn issue(&self, req: &IssueRequest<'_>) -> Result<IssuedChain, IssueError> {
        let started = Instant::now();
        let result = self.issue_inner(req).await;
        self.metrics
            .issuance_seconds
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(chain) => {
                tracing::info!(
                    spiffe_id = %chain.spiffe_id,
                    serial = %chain.leaf.serial_hex,
                    not_after = chain.leaf.not_after,
                    ledger_seq = chain.ledger_seq,
                    "certificate issued"
                );
            }
            Err(e) => {
                self.metrics.fail(e.reason());
                tracing::warn!(reason = e.reason(), error = %e, "certificate request refused");
            }
        }
        result
    }

    async fn issue_inner(&self, req: &IssueRequest<'_>) -> Result<IssuedChain, IssueError> {
        let caller = self.auth.authenticate(&req.credentials).await?;
        tracing::Span::current().record("caller", tracing::field::display(&caller.identity));
        let granted = authorize(&caller, req.impersonated_identity)?;
        let csr = parse_and_verify(req.csr_pem)?;
        check_requested_names(&granted, &csr.requested_uris, &csr.requested_other_sans)?;
        let authority = self.authority.borrow().clone();
        let now = req.credentials.now;
        let validity = leaf_validity(
            &self.lifetime,
            req.requested_ttl_secs,
            authority.window(),
            now,
        )?;
        let leaf = authority.sign(&LeafSpec {
            spiffe_id: Some(&granted),
            dns_names: &[],
            ip_addresses: &[],
            common_name: None,
            spki_der: &csr.spki_der,
            key_kind: csr.key_kind,
            validity,
            serial: random_serial()?,
        })?;
        let entry = self
            .ledger
            .record(NewIssuance {
                serial_hex: leaf.serial_hex.clone(),
                spiffe_id: granted.to_string(),
                authority_id: authority.id().to_owned(),
                not_before: leaf.not_before,
                not_after: leaf.not_after,
                requester: caller.identity.to_string(),
                node: caller.node.clone(),
                der_sha256: leaf.der_sha256,
                issued_at: now,
            })
            .await?;
        self.metrics
            .issued
            .get_or_create(&IssuedLabels {
                method: caller.method.as_str(),
            })
            .inc();
        let mut chain_pem = Vec::with_capacity(1 + authority.chain_pem().len());
        chain_pem.push(leaf.pem.clone());
        chain_pem.extend(authority.chain_pem().iter().cloned());
        Ok(IssuedChain {
            spiffe_id: granted,
            leaf,
            chain_pem,
            ledger_seq: entry.seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;

    fn caller(id: &str) -> Caller {
        Caller {
            identity: SpiffeId::parse(id).unwrap(),
            method: AuthMethod::Jwt,
            node: None,
            pod: None,
        }
    }

    #[test]
    fn caller_gets_its_own_identity() {
        let c = caller("spiffe://td/ns/a/sa/b");
        assert_eq!(authorize(&c, None).unwrap(), c.identity);
        assert_eq!(
            authorize(&c, Some("spiffe://td/ns/a/sa/b")).unwrap(),
            c.identity
        );
    }

    #[test]
    fn rejects_impersonation_by_untrusted_caller() {
        let c = caller("spiffe://td/ns/a/sa/b");
        assert!(matches!(
            authorize(&c, Some("spiffe://td/ns/a/sa/other")),
            Err(IssueError::PermissionDenied(_))
        ));
    }

    #[test]
    fn rejects_csr_naming_another_identity() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let err = check_requested_names(&id, &["spiffe://td/ns/a/sa/c".into()], &[]).unwrap_err();
        assert!(matches!(err, IssueError::PermissionDenied(_)), "{err}");
    }

    #[test]
    fn rejects_csr_with_extra_uri_san() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let err = check_requested_names(
            &id,
            &[
                "spiffe://td/ns/a/sa/b".into(),
                "spiffe://td/ns/a/sa/c".into(),
            ],
            &[],
        )
        .unwrap_err();
        assert!(matches!(err, IssueError::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn rejects_csr_with_unauthorized_dns_san() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let err = check_requested_names(&id, &[], &["DNS:evil.example".into()]).unwrap_err();
        assert!(matches!(err, IssueError::PermissionDenied(_)), "{err}");
    }

    #[test]
    fn csr_with_matching_or_no_uri_is_fine() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        check_requested_names(&id, &[], &[]).unwrap();
        check_requested_names(&id, &["spiffe://td/ns/a/sa/b".into()], &[]).unwrap();
    }
}
