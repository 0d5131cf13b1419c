//! The issuing core: authenticate, authorize, check the CSR, decide the
//! lifetime, sign, record durably, answer. Transport-agnostic: the gRPC
//! service is a thin shell around [`CertificateIssuer::issue`].

use std::sync::Arc;
use std::time::Instant;

use citadel_identity::lifetime::{LifetimeError, LifetimePolicy, leaf_validity};
use citadel_identity::{Escaped, SpiffeId, TrustDomain};
use citadel_store::{
    GroupCommitLedger, LedgerEntry, NewIssuance, NodeGrant, NodeIssuanceOutcome, NodeStore,
    StoreError,
};
use tokio::sync::watch;

use crate::auth::client_cert::node_refusal_message;
use crate::auth::{AuthChain, AuthError, AuthMethod, Caller, Credentials};
use crate::authority::{Authority, AuthorityError, IssuedCertificate, LeafSpec, random_serial};
use crate::csr::{CsrError, parse_and_verify};
use crate::join_token::token_hash;
use crate::metrics::{CaMetrics, IssuedLabels};
use crate::node::{is_reserved, node_name_of};
use crate::node_authz::{NodeAuthorizers, denied};

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
    Unauthenticated(AuthError),
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
    /// Over a rate limit or the CA's capacity; nothing was issued (`ResourceExhausted`).
    #[error("{0}")]
    ResourceExhausted(String),
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
            IssueError::ResourceExhausted(_) => "resource_exhausted",
        }
    }
}

impl From<AuthError> for IssueError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unavailable(reason) => {
                IssueError::Unavailable(format!("{reason}; no certificate issued, retry later"))
            }
            AuthError::Denied(reason) => IssueError::PermissionDenied(reason),
            other => IssueError::Unauthenticated(other),
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

/// What [`authorize`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// The caller gets its own identity.
    Own(SpiffeId),
    /// The caller asks for `target` on behalf of a workload: allowed only when a
    /// [`NodeAuthorizer`](crate::node_authz::NodeAuthorizer) says the caller is a node agent
    /// whose node runs that workload.
    Impersonate(SpiffeId),
}

/// Decides whether `caller` asks for its own identity or may ask for `impersonated` at all
/// (pure).
///
/// A caller gets its own identity. Another identity (`ImpersonatedIdentity`) must be a
/// SPIFFE ID of `td` outside `/citadel/`; whether this caller may have it is the node
/// authorizers' decision, made next.
pub fn authorize(
    caller: &Caller,
    impersonated: Option<&str>,
    td: &TrustDomain,
) -> Result<Authorization, IssueError> {
    let other = match impersonated {
        None => return Ok(Authorization::Own(caller.identity.clone())),
        Some(other) if other == caller.identity.as_str() => {
            return Ok(Authorization::Own(caller.identity.clone()));
        }
        Some(other) => other,
    };
    let deny = |why: &str| denied(caller, other, why);
    let target = SpiffeId::parse(other)
        .map_err(|e| deny(&format!("the requested identity is not a SPIFFE ID ({e})")))?;
    if !target.is_member_of(td) {
        return Err(deny(&format!(
            "the requested identity is not in trust domain {td}"
        )));
    }
    if is_reserved(&target) {
        return Err(deny(
            "identities under /citadel/ are never issued to workloads",
        ));
    }
    Ok(Authorization::Impersonate(target))
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
    store: Arc<dyn NodeStore>,
    nodes: NodeAuthorizers,
    ledger: GroupCommitLedger,
    lifetime: LifetimePolicy,
    metrics: Arc<CaMetrics>,
    /// Rate limit and concurrency bound, applied once the caller is known.
    gate: Option<Arc<crate::limits::RequestGate>>,
}

impl CertificateIssuer {
    /// Assembles the issuing core. `nodes` decides which workload identities a node agent
    /// may ask for; `store` records node certificates (join-token exchanges and renewals)
    /// with their ledger rows; `ledger` records every other issuance.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trust_domain: TrustDomain,
        authority: watch::Receiver<Arc<Authority>>,
        auth: AuthChain,
        nodes: NodeAuthorizers,
        store: Arc<dyn NodeStore>,
        ledger: GroupCommitLedger,
        lifetime: LifetimePolicy,
        metrics: Arc<CaMetrics>,
    ) -> Self {
        Self {
            trust_domain,
            authority,
            auth,
            nodes,
            store,
            ledger,
            lifetime,
            metrics,
            gate: None,
        }
    }

    /// Applies `gate` (per-caller rate limit, concurrency bound) to every request once its
    /// caller is authenticated.
    pub fn with_gate(mut self, gate: Arc<crate::limits::RequestGate>) -> Self {
        self.gate = Some(gate);
        self
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
                tracing::warn!(reason = e.reason(), error = %Escaped(e), "certificate request refused");
            }
        }
        result
    }

    async fn issue_inner(&self, req: &IssueRequest<'_>) -> Result<IssuedChain, IssueError> {
        let caller = self.auth.authenticate(&req.credentials).await?;
        tracing::Span::current().record("caller", tracing::field::display(&caller.identity));
        // Held until the answer is recorded: the bound covers signing and the ledger.
        let _permit = match &self.gate {
            Some(gate) => Some(
                gate.admit(&caller, req.impersonated_identity.is_some())
                    .await?,
            ),
            None => None,
        };
        let (granted, node) = self.granted_identity(&caller, req).await?;
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
        // Decided before signing, so that a malformed request cannot get this far.
        let node_grant = node_grant(&caller, &granted, req, &self.trust_domain)?;
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
        let issuance = NewIssuance {
            serial_hex: leaf.serial_hex.clone(),
            spiffe_id: granted.to_string(),
            authority_id: authority.id().to_owned(),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            requester: caller.identity.to_string(),
            node,
            der_sha256: leaf.der_sha256,
            issued_at: now,
        };
        let entry = match node_grant {
            // A node certificate: the join token is spent, or the renewal recorded as the
            // node's pending certificate, in the transaction that writes the ledger row.
            Some((node, grant)) => {
                self.record_node_issuance(&node, &grant, &issuance, now)
                    .await?
            }
            None => self.ledger.record(issuance).await?,
        };
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

impl CertificateIssuer {
    /// The identity to issue and the node the request came through: [`authorize`], then the
    /// node authorizers when a node agent asks for a workload.
    async fn granted_identity(
        &self,
        caller: &Caller,
        req: &IssueRequest<'_>,
    ) -> Result<(SpiffeId, Option<String>), IssueError> {
        let impersonated = req.impersonated_identity;
        let refused = |e: IssueError| {
            tracing::warn!(
                caller = %caller.identity,
                requested = %Escaped(impersonated.unwrap_or_default()),
                error = %Escaped(&e),
                "impersonation refused"
            );
            e
        };
        match authorize(caller, impersonated, &self.trust_domain).map_err(refused)? {
            Authorization::Own(id) => {
                // A node agent renewing its own certificate came through its own node.
                let node = caller.node.clone().or_else(|| {
                    node_name_of(&caller.identity, &self.trust_domain).map(str::to_owned)
                });
                Ok((id, node))
            }
            Authorization::Impersonate(target) => {
                let node = self
                    .nodes
                    .authorize(caller, &target)
                    .await
                    .map_err(refused)?;
                Ok((target, Some(node)))
            }
        }
    }

    /// Records a node certificate with what it changes about its node, all in one store
    /// transaction; of concurrent requests with one join token only one is recorded.
    async fn record_node_issuance(
        &self,
        node: &str,
        grant: &NodeGrant,
        issuance: &NewIssuance,
        now: i64,
    ) -> Result<LedgerEntry, IssueError> {
        match self
            .store
            .append_node_issuance(node, grant, issuance, now)
            .await
        {
            Ok(NodeIssuanceOutcome::Recorded(entry)) => Ok(*entry),
            Ok(NodeIssuanceOutcome::TokenRefused(refusal)) => Err(IssueError::PermissionDenied(
                format!("the join token of node {node} was not consumed: {refusal}"),
            )),
            Ok(NodeIssuanceOutcome::NodeRefused(refusal)) => {
                tracing::warn!(node, reason = %refusal, "node certificate renewal refused");
                Err(IssueError::PermissionDenied(node_refusal_message(
                    node, refusal,
                )))
            }
            Err(e) => Err(IssueError::from(e)),
        }
    }
}

/// Whether the certificate to issue is a node certificate, and what entitles it (pure): a
/// join-token caller gets its node certificate by spending its token; a node agent that
/// authenticated with its node certificate and asks for its own identity renews it. `None`
/// for every other issuance (workloads, impersonation).
pub fn node_grant(
    caller: &Caller,
    granted: &SpiffeId,
    req: &IssueRequest<'_>,
    td: &TrustDomain,
) -> Result<Option<(String, NodeGrant)>, IssueError> {
    if *granted != caller.identity {
        return Ok(None);
    }
    match caller.method {
        AuthMethod::JoinToken => {
            let node = caller
                .node
                .clone()
                .ok_or_else(|| IssueError::Internal("a join-token caller without a node".into()))?;
            let token = req.credentials.bearer_token.ok_or_else(|| {
                IssueError::Internal("a join-token caller without a bearer token".into())
            })?;
            Ok(Some((
                node,
                NodeGrant::Join {
                    token_sha256: token_hash(token),
                },
            )))
        }
        AuthMethod::ClientCertificate => {
            let Some(node) = node_name_of(&caller.identity, td) else {
                return Ok(None);
            };
            let presented_serial = caller.certificate_serial.clone().ok_or_else(|| {
                IssueError::Internal("a client-certificate caller without a serial".into())
            })?;
            Ok(Some((
                node.to_owned(),
                NodeGrant::Renewal { presented_serial },
            )))
        }
        AuthMethod::Jwt | AuthMethod::TokenReview => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(id: &str) -> Caller {
        Caller {
            identity: SpiffeId::parse(id).unwrap(),
            method: AuthMethod::Jwt,
            node: None,
            pod: None,
            pod_uid: None,
            certificate_serial: None,
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("td").unwrap()
    }

    fn node_caller(method: AuthMethod) -> Caller {
        Caller {
            method,
            node: Some("node-a".into()),
            ..caller("spiffe://td/citadel/node/node-a")
        }
    }

    fn denied(out: Result<Authorization, IssueError>) -> String {
        match out {
            Err(IssueError::PermissionDenied(msg)) => msg,
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    }

    #[test]
    fn caller_gets_its_own_identity() {
        let c = caller("spiffe://td/ns/a/sa/b");
        let own = Authorization::Own(c.identity.clone());
        assert_eq!(authorize(&c, None, &td()).unwrap(), own);
        assert_eq!(
            authorize(&c, Some("spiffe://td/ns/a/sa/b"), &td()).unwrap(),
            own
        );
    }

    #[test]
    fn another_workload_identity_goes_to_the_node_authorizers() {
        let out = authorize(
            &caller("spiffe://td/ns/a/sa/b"),
            Some("spiffe://td/ns/a/sa/web"),
            &td(),
        );
        assert_eq!(
            out.unwrap(),
            Authorization::Impersonate(SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap())
        );
    }

    #[test]
    fn nobody_may_ask_for_foreign_reserved_or_malformed_identities() {
        let node = node_caller(AuthMethod::ClientCertificate);
        for target in [
            "spiffe://other/ns/a/sa/web",
            "spiffe://td/citadel/node/node-b",
            "not a spiffe id",
        ] {
            let msg = denied(authorize(&node, Some(target), &td()));
            assert!(msg.contains("spiffe://td/citadel/node/node-a"), "{msg}");
        }
    }

    fn issue_request<'a>(token: Option<&'a str>) -> IssueRequest<'a> {
        IssueRequest {
            csr_pem: "",
            requested_ttl_secs: 0,
            impersonated_identity: None,
            credentials: Credentials {
                bearer_token: token,
                peer_chain: None,
                now: 0,
            },
        }
    }

    #[test]
    fn node_certificates_are_granted_by_a_join_token_or_a_renewal() {
        let joining = node_caller(AuthMethod::JoinToken);
        let req = issue_request(Some("citadel-join.x"));
        let (node, grant) = node_grant(&joining, &joining.identity, &req, &td())
            .unwrap()
            .unwrap();
        assert_eq!(node, "node-a");
        assert_eq!(
            grant,
            NodeGrant::Join {
                token_sha256: token_hash("citadel-join.x")
            }
        );
        let renewing = Caller {
            certificate_serial: Some("4a".into()),
            ..node_caller(AuthMethod::ClientCertificate)
        };
        let (node, grant) = node_grant(&renewing, &renewing.identity, &issue_request(None), &td())
            .unwrap()
            .unwrap();
        assert_eq!(node, "node-a");
        assert_eq!(
            grant,
            NodeGrant::Renewal {
                presented_serial: "4a".into()
            }
        );
    }

    #[test]
    fn workload_and_impersonated_certificates_are_not_node_grants() {
        let renewing = Caller {
            certificate_serial: Some("4a".into()),
            ..node_caller(AuthMethod::ClientCertificate)
        };
        let web = SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap();
        let req = issue_request(None);
        assert_eq!(node_grant(&renewing, &web, &req, &td()).unwrap(), None);
        let workload = Caller {
            method: AuthMethod::ClientCertificate,
            certificate_serial: Some("4b".into()),
            ..caller("spiffe://td/ns/a/sa/web")
        };
        assert_eq!(
            node_grant(&workload, &workload.identity, &req, &td()).unwrap(),
            None
        );
        let jwt = caller("spiffe://td/ns/a/sa/web");
        assert_eq!(node_grant(&jwt, &jwt.identity, &req, &td()).unwrap(), None);
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
