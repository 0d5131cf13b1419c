//! `citadel.v1.WorkloadPolicyService/WatchWorkloadPolicies` on the agent's socket: each
//! attested caller gets the policies that apply to it ([`crate::policy::workload_policies`]),
//! in full, at once and whenever the set or its own attestation (labels) changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use citadel_identity::SpiffeId;
use citadel_proto::citadel::v1::workload_policy_service_server::WorkloadPolicyService;
use citadel_proto::citadel::v1::{WorkloadPolicies, WorkloadPoliciesRequest};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::attest::PeerInfo;
use crate::policy::workload_policies;
use crate::server::{AgentState, StreamEnd};

/// The policy service of the agent.
pub struct WorkloadPolicyApi {
    state: Arc<AgentState>,
}

impl WorkloadPolicyApi {
    /// The service over the agent's shared state.
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }
}

type PolicyStream = std::pin::Pin<Box<dyn Stream<Item = Result<WorkloadPolicies, Status>> + Send>>;

#[tonic::async_trait]
impl WorkloadPolicyService for WorkloadPolicyApi {
    type WatchWorkloadPoliciesStream = PolicyStream;

    async fn watch_workload_policies(
        &self,
        request: Request<WorkloadPoliciesRequest>,
    ) -> Result<Response<PolicyStream>, Status> {
        let (peer, workload) = self.state.attest_peer(&request).await?;
        tracing::debug!(spiffe_id = %workload.spiffe_id, "policy stream opened");
        Ok(Response::new(policy_stream(
            self.state.clone(),
            peer,
            workload.spiffe_id,
            workload.labels,
        )))
    }
}

/// The stream: the caller's policies now (once the agent has a set) and after every change
/// of the set or of the caller's labels, until the client leaves, the agent stops, or an
/// entries reload takes the caller's identity away. One message in flight at most; changes
/// meanwhile collapse into the latest state, and a message equal to the last one sent is
/// not sent again.
fn policy_stream(
    state: Arc<AgentState>,
    peer: PeerInfo,
    own: SpiffeId,
    mut labels: BTreeMap<String, String>,
) -> PolicyStream {
    let (tx, rx) = mpsc::channel(1);
    let guard = state.metrics.stream_opened("policy");
    tokio::spawn(async move {
        let _guard = guard;
        let mut policies = state.policies.clone();
        let mut changes = state.attestation_changed.clone();
        let mut shutdown = state.shutdown.clone();
        let own_id = own.to_string();
        let mut last_sent: Option<WorkloadPolicies> = None;
        let mut entries_followed = true;
        loop {
            let current = policies.borrow_and_update().clone();
            if let Some(set) = current.as_deref() {
                let msg = workload_policies(set, &own_id, &labels, &state.mesh);
                if last_sent.as_ref() != Some(&msg) {
                    tokio::select! {
                        r = tx.send(Ok(msg.clone())) => if r.is_err() { return },
                        _ = stopped(&mut shutdown) => {
                            let _ = tx.try_send(Err(StreamEnd::Shutdown.into_status()));
                            return;
                        }
                    }
                    last_sent = Some(msg);
                }
            }
            let reattest = tokio::select! {
                r = policies.changed() => if r.is_err() { return } else { false },
                _ = tx.closed() => return,
                _ = stopped(&mut shutdown) => {
                    let _ = tx.try_send(Err(StreamEnd::Shutdown.into_status()));
                    return;
                }
                r = changes.changed(), if entries_followed => {
                    // No more entries reloads once the sender is gone: nothing to re-attest.
                    entries_followed = r.is_ok();
                    entries_followed
                }
            };
            if reattest {
                match state.attest_again(&peer).await {
                    Ok(w) if w.spiffe_id == own => labels = w.labels,
                    Ok(w) => {
                        let _ = tx.try_send(Err(Status::permission_denied(format!(
                            "the caller's identity changed to {} when the entries were reloaded",
                            w.spiffe_id
                        ))));
                        return;
                    }
                    Err(status) => {
                        let _ = tx.try_send(Err(status));
                        return;
                    }
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// Resolves once the agent is stopping (or its shutdown signal is gone).
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
