//! The gRPC shell of Istio's CSR API (`istio.v1.auth.IstioCertificateService`).

use crate::clock::unix_now;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use citadel_identity::Escaped;
use citadel_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use citadel_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::auth::Credentials;
use crate::issuer::{CertificateIssuer, IssueError, IssueRequest};

/// Largest request accepted, bytes (larger ones get `OutOfRange` from the codec).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Metadata key with which a node agent asks for a workload's identity.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Cluster assumed when the `clusterid` header is absent.
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// Serves `CreateCertificate`.
pub struct IstioCaService {
    issuer: Arc<CertificateIssuer>,
    next_request_id: AtomicU64,
    join_lookups: Option<Arc<crate::limits::JoinLookupGate>>,
}

impl IstioCaService {
    /// Wraps the issuing core.
    pub fn new(issuer: Arc<CertificateIssuer>) -> Self {
        Self {
            issuer,
            next_request_id: AtomicU64::new(1),
            join_lookups: None,
        }
    }

    /// Checks join tokens with `gate` (shape, rate per peer address) before the issuer
    /// looks them up in the store.
    pub fn with_join_lookup_gate(mut self, gate: Arc<crate::limits::JoinLookupGate>) -> Self {
        self.join_lookups = Some(gate);
        self
    }
}

/// The token of an `authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn impersonated_identity(req: &IstioCertificateRequest) -> Result<Option<&str>, IssueError> {
    let Some(field) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &field.kind {
        Some(citadel_proto::prost_types::value::Kind::StringValue(s)) => Ok(Some(s.as_str())),
        _ => Err(IssueError::InvalidArgument(format!(
            "metadata {IMPERSONATED_IDENTITY} must be a string"
        ))),
    }
}

/// The gRPC status for an issuance failure.
pub fn status_of(e: &IssueError) -> Status {
    let msg = e.to_string();
    match e {
        IssueError::Unauthenticated(_) => Status::unauthenticated(msg),
        IssueError::PermissionDenied(_) => Status::permission_denied(msg),
        IssueError::InvalidArgument(_) => Status::invalid_argument(msg),
        IssueError::FailedPrecondition(_) => Status::failed_precondition(msg),
        IssueError::Unavailable(_) => Status::unavailable(msg),
        IssueError::Internal(_) => Status::internal(msg),
        IssueError::ResourceExhausted(_) => Status::resource_exhausted(msg),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for IstioCaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let cluster = request
            .metadata()
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(DEFAULT_CLUSTER)
            .to_owned();
        let span = tracing::info_span!(
            "create_certificate",
            request_id,
            cluster = %Escaped(&cluster),
            caller = tracing::field::Empty,
        );
        async move {
            let peer_chain = request.peer_certs();
            let bearer = bearer_token(request.metadata()).map(str::to_owned);
            if let (Some(gate), Some(token)) = (&self.join_lookups, bearer.as_deref())
                && crate::join_token::is_join_token(token)
            {
                let peer = request.remote_addr().map(|a| a.ip());
                gate.check(token, peer).map_err(|e| {
                    tracing::debug!(reason = e.reason(), error = %e, "join token refused before lookup");
                    status_of(&e)
                })?;
            }
            let body = request.get_ref();
            let impersonated = impersonated_identity(body).map_err(|e| status_of(&e))?;
            let issued = self
                .issuer
                .issue(&IssueRequest {
                    csr_pem: &body.csr,
                    requested_ttl_secs: body.validity_duration,
                    impersonated_identity: impersonated,
                    credentials: Credentials {
                        bearer_token: bearer.as_deref(),
                        peer_chain: peer_chain.as_deref().map(Vec::as_slice),
                        now: unix_now(),
                    },
                })
                .await
                .map_err(|e| status_of(&e))?;
            Ok(Response::new(IstioCertificateResponse {
                cert_chain: issued.chain_pem,
            }))
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_requires_bearer_scheme() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&md), Some("abc"));
        md.insert("authorization", "bearer  abc ".parse().unwrap());
        assert_eq!(bearer_token(&md), Some("abc"));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&md), None);
        md.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&md), None);
    }
}
