//! The agent's gRPC server on its Unix socket: SDS, the Workload API and the
//! workload policy stream on one server, every request attested from the
//! connection's peer.

use std::sync::Arc;
use std::time::Duration;

use citadel_identity::Escaped;
use citadel_proto::citadel::v1::workload_policy_service_server::WorkloadPolicyServiceServer;
use citadel_proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use citadel_proto::spiffe_workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::{Request, Status};

use crate::attest::{PeerInfo, Workload, WorkloadAttestor};
use crate::bundle::BundleWatch;
use crate::manager::CertManager;
use crate::metrics::AgentMetrics;
use crate::policy::PolicyWatch;
use crate::sds::SdsService;
use crate::workload_api::WorkloadApiService;
use crate::workload_policy::WorkloadPolicyApi;

/// Largest message accepted from a workload. Requests are small (a few
/// resource names); anything bigger is garbage or abuse.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What every service of the agent shares.
pub struct AgentState {
    /// Who callers are.
    pub attestor: Arc<dyn WorkloadAttestor>,
    /// Their certificates.
    pub manager: CertManager,
    /// The trust bundle.
    pub bundle: BundleWatch,
    /// Which bundle sequence every open SDS `ROOTCA` and Workload API stream holds.
    pub propagation: crate::propagation::Propagation,
    /// The policy set from the CA.
    pub policies: PolicyWatch,
    /// Mesh settings (the root namespace) for choosing each caller's policies.
    pub mesh: citadel_policy::MeshConfig,
    /// Metrics.
    pub metrics: AgentMetrics,
    /// How long a unary fetch waits for a certificate.
    pub fetch_timeout: Duration,
    /// Changes whenever attestation answers may have changed (the entries
    /// were reloaded): open streams re-attest their caller then.
    pub attestation_changed: watch::Receiver<u64>,
    /// Becomes `true` when the agent stops: open streams end, so the
    /// server's graceful shutdown does not wait on clients that never close.
    pub shutdown: watch::Receiver<bool>,
}

impl AgentState {
    /// Attests the caller of `request`; `PermissionDenied` (logged) when it
    /// has no identity.
    pub async fn attest<T>(&self, request: &Request<T>) -> Result<Workload, Status> {
        Ok(self.attest_peer(request).await?.1)
    }

    /// As [`Self::attest`], also returning the peer (to re-attest later).
    pub async fn attest_peer<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(PeerInfo, Workload), Status> {
        let Some(peer) = request.extensions().get::<PeerInfo>().copied() else {
            return Err(Status::permission_denied("caller credentials unknown"));
        };
        Ok((peer, self.attest_again(&peer).await?))
    }

    /// Attests `peer` again: after an entries reload, an open stream keeps
    /// its identity only if the caller still has it.
    pub async fn attest_again(&self, peer: &PeerInfo) -> Result<Workload, Status> {
        match self.attestor.attest(peer).await {
            Ok(w) => {
                tracing::debug!(spiffe_id = %w.spiffe_id, pid = ?peer.pid, uid = peer.uid, "attested caller");
                Ok(w)
            }
            Err(e) => {
                tracing::warn!(pid = ?peer.pid, uid = peer.uid, gid = peer.gid, error = %Escaped(&e), "caller refused");
                Err(Status::permission_denied(e.to_string()))
            }
        }
    }
}

/// Serves SDS, the Workload API and the policy stream on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    state: Arc<AgentState>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let sds = SecretDiscoveryServiceServer::new(SdsService::new(state.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let workload = SpiffeWorkloadApiServer::new(WorkloadApiService::new(state.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let policies = WorkloadPolicyServiceServer::new(WorkloadPolicyApi::new(state))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .max_concurrent_streams(Some(256))
        .add_service(sds)
        .add_service(workload)
        .add_service(policies)
        .serve_with_incoming_shutdown(crate::socket::incoming(listener), shutdown)
        .await
}

/// Why an open stream ends early.
pub enum StreamEnd {
    /// The agent is stopping.
    Shutdown,
    /// The caller no longer has the identity the stream serves.
    Revoked(Status),
}

impl StreamEnd {
    /// The status sent to the client.
    pub fn into_status(self) -> Status {
        match self {
            StreamEnd::Shutdown => Status::unavailable("the agent is shutting down; reconnect"),
            StreamEnd::Revoked(status) => status,
        }
    }
}

impl AgentState {
    /// Resolves when a stream serving `own` to `peer` must end: at shutdown,
    /// or when an entries reload takes the identity away.
    pub async fn stream_end(
        &self,
        peer: &PeerInfo,
        own: &citadel_identity::SpiffeId,
        changes: &mut watch::Receiver<u64>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> StreamEnd {
        loop {
            if *shutdown.borrow_and_update() {
                return StreamEnd::Shutdown;
            }
            tokio::select! {
                r = shutdown.changed() => if r.is_err() { return StreamEnd::Shutdown },
                r = changes.changed() => {
                    if r.is_err() {
                        futures::future::pending::<()>().await;
                    }
                    match self.attest_again(peer).await {
                        Ok(w) if &w.spiffe_id == own => {}
                        Ok(w) => {
                            return StreamEnd::Revoked(Status::permission_denied(format!(
                                "the caller's identity changed to {} when the entries were reloaded",
                                w.spiffe_id
                            )))
                        }
                        Err(status) => return StreamEnd::Revoked(status),
                    }
                }
            }
        }
    }
}
