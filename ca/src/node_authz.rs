//! May this node agent have that workload's identity? One narrow seam,
//! [`NodeAuthorizer`], with two implementations: the allow lists of nodes
//! that joined with a join token ([`AllowListAuthorizer`], off Kubernetes) and
//! the pod index of a Kubernetes cluster ([`crate::k8s::PodIndexAuthorizer`]).
//!
//! The issuer has already decided that the caller asks for another identity
//! than its own, and that the identity is a workload identity of its trust
//! domain ([`crate::issuer::authorize`]); each authorizer decides whether the
//! caller is one of *its* node agents and, if so, whether that agent's node
//! runs the workload.

use std::sync::Arc;

use async_trait::async_trait;
use citadel_identity::{SpiffeId, TrustDomain};
use citadel_store::Store;

use crate::auth::{AuthMethod, Caller};
use crate::issuer::IssueError;
use crate::node::node_name_of;

/// Decides impersonation for one kind of node agent.
#[async_trait]
pub trait NodeAuthorizer: Send + Sync {
    /// `Ok(None)`: `caller` is not a node agent of this kind; `Ok(Some(node))`: it may receive
    /// `target` for a workload on `node`; `Err`: it is one and may not (`PermissionDenied`), or
    /// the facts cannot be read now (`Unavailable`).
    async fn authorize(
        &self,
        caller: &Caller,
        target: &SpiffeId,
    ) -> Result<Option<String>, IssueError>;
}

/// The refusal message every authorizer uses (pure).
pub fn denied(caller: &Caller, target: &str, why: &str) -> IssueError {
    IssueError::PermissionDenied(format!(
        "{} may not request certificates for {target}: {why}",
        caller.identity
    ))
}

/// Authorizers tried in order; the first that knows the caller decides. A caller none knows
/// is not a trusted node agent.
#[derive(Clone, Default)]
pub struct NodeAuthorizers(Vec<Arc<dyn NodeAuthorizer>>);

impl NodeAuthorizers {
    /// These authorizers, in this order.
    pub fn new(authorizers: Vec<Arc<dyn NodeAuthorizer>>) -> Self {
        Self(authorizers)
    }

    /// The node `caller` asks for `target` through.
    pub async fn authorize(
        &self,
        caller: &Caller,
        target: &SpiffeId,
    ) -> Result<String, IssueError> {
        for a in &self.0 {
            if let Some(node) = a.authorize(caller, target).await? {
                return Ok(node);
            }
        }
        Err(denied(
            caller,
            target.as_str(),
            "it is not a trusted node agent",
        ))
    }
}

/// Off Kubernetes: a node agent is a caller that authenticated with its node certificate
/// (`spiffe://<td>/citadel/node/<NAME>`); it may have the identities on its node's allow
/// list, registered with its join token.
pub struct AllowListAuthorizer {
    store: Arc<dyn Store>,
    trust_domain: TrustDomain,
}

impl AllowListAuthorizer {
    /// Reads allow lists from `store`.
    pub fn new(store: Arc<dyn Store>, trust_domain: TrustDomain) -> Self {
        Self {
            store,
            trust_domain,
        }
    }
}

/// Which node's agent `caller` is under join-token rules (pure): `Ok(Some(node))` for a
/// node certificate, `Err` for a join-token caller (it has not joined yet), `Ok(None)` for
/// anyone else. Only a certificate this CA issued proves a node identity.
pub fn allow_list_node<'a>(
    caller: &'a Caller,
    target: &SpiffeId,
    td: &TrustDomain,
) -> Result<Option<&'a str>, IssueError> {
    match (caller.method, node_name_of(&caller.identity, td)) {
        (AuthMethod::ClientCertificate, Some(node)) => Ok(Some(node)),
        (AuthMethod::JoinToken, _) => Err(denied(
            caller,
            target.as_str(),
            "a join token only admits the node itself; impersonate with the node certificate",
        )),
        _ => Ok(None),
    }
}

/// Checks `target` against node `node`'s allow list (`None`: the node never joined) (pure).
pub fn check_node_allow_list(
    caller: &Caller,
    node: &str,
    target: &SpiffeId,
    allowed: Option<&[String]>,
) -> Result<(), IssueError> {
    let why = match allowed {
        Some(list) if list.iter().any(|id| id == target.as_str()) => return Ok(()),
        Some(_) => format!("it is not on node {node}'s allow list"),
        None => format!("node {node} has not joined with a join token"),
    };
    Err(denied(caller, target.as_str(), &why))
}

#[async_trait]
impl NodeAuthorizer for AllowListAuthorizer {
    async fn authorize(
        &self,
        caller: &Caller,
        target: &SpiffeId,
    ) -> Result<Option<String>, IssueError> {
        let Some(node) = allow_list_node(caller, target, &self.trust_domain)? else {
            return Ok(None);
        };
        let allowed = self.store.node_allowed_ids(node).await.map_err(|e| {
            IssueError::Unavailable(format!(
                "node allow list unavailable, no certificate issued: {e}"
            ))
        })?;
        check_node_allow_list(caller, node, target, allowed.as_deref())?;
        Ok(Some(node.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("td").unwrap()
    }

    fn node_caller(method: AuthMethod) -> Caller {
        Caller {
            identity: SpiffeId::parse("spiffe://td/citadel/node/node-a").unwrap(),
            method,
            node: Some("node-a".into()),
            pod: None,
            pod_uid: None,
            certificate_serial: None,
        }
    }

    fn web() -> SpiffeId {
        SpiffeId::parse("spiffe://td/ns/a/sa/web").unwrap()
    }

    #[test]
    fn node_certificate_is_a_node_agent_subject_to_its_allow_list() {
        let c = node_caller(AuthMethod::ClientCertificate);
        assert_eq!(allow_list_node(&c, &web(), &td()).unwrap(), Some("node-a"));
    }

    #[test]
    fn join_token_caller_may_not_impersonate() {
        let c = node_caller(AuthMethod::JoinToken);
        let err = allow_list_node(&c, &web(), &td()).unwrap_err();
        assert!(err.to_string().contains("join token"), "{err}");
    }

    #[test]
    fn node_identity_by_jwt_is_not_a_node_agent() {
        // Only a certificate this CA issued proves a node identity.
        for m in [AuthMethod::Jwt, AuthMethod::TokenReview] {
            assert_eq!(
                allow_list_node(&node_caller(m), &web(), &td()).unwrap(),
                None
            );
        }
    }

    #[test]
    fn allow_list_must_name_the_target_exactly() {
        let node = node_caller(AuthMethod::ClientCertificate);
        let list = ["spiffe://td/ns/a/sa/web".to_string()];
        check_node_allow_list(&node, "node-a", &web(), Some(&list)).unwrap();
        let prefix_only = ["spiffe://td/ns/a/sa/we".to_string()];
        for allowed in [Some(&prefix_only[..]), Some(&[][..]), None] {
            let err = check_node_allow_list(&node, "node-a", &web(), allowed).unwrap_err();
            assert!(matches!(err, IssueError::PermissionDenied(_)), "{err}");
        }
    }

    struct Fixed(Result<Option<String>, IssueError>);

    #[async_trait]
    impl NodeAuthorizer for Fixed {
        async fn authorize(&self, _: &Caller, _: &SpiffeId) -> Result<Option<String>, IssueError> {
            self.0.clone()
        }
    }

    #[tokio::test]
    async fn a_caller_no_authorizer_knows_is_not_a_trusted_node_agent() {
        let chain = NodeAuthorizers::new(vec![Arc::new(Fixed(Ok(None)))]);
        let c = node_caller(AuthMethod::Jwt);
        let err = chain.authorize(&c, &web()).await.unwrap_err();
        assert!(
            err.to_string().contains("not a trusted node agent"),
            "{err}"
        );
        let chain = NodeAuthorizers::new(vec![
            Arc::new(Fixed(Ok(None))),
            Arc::new(Fixed(Ok(Some("n".into())))),
        ]);
        assert_eq!(chain.authorize(&c, &web()).await.unwrap(), "n");
    }
}
