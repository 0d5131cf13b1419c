//! `citadel.v1.TrustBundleService/WatchTrustBundle`: the trust bundle streamed to node agents,
//! and their acknowledgements recorded in the store.
//!
//! The caller must be a node agent authenticated with its node certificate. It gets the
//! current bundle at once and again after every change. Updates are read from a `watch`
//! channel only when the transport asks for the next message, so a slow agent gets the latest
//! bundle, never a backlog. Acknowledgements are read by a task of their own, so they are
//! recorded even while the agent is not reading. Both end when the CA shuts down.

use std::pin::Pin;
use std::sync::Arc;

use citadel_identity::Escaped;
use citadel_proto::citadel::v1::trust_bundle_service_server::TrustBundleService;
use citadel_proto::citadel::v1::{TrustBundleAck, TrustBundleUpdate};
use citadel_store::AckStore;
use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthChain, AuthMethod, Caller, Credentials};
use crate::bundle_watch::BundleSnapshot;
use crate::clock::unix_now;
use crate::issuer::IssueError;
use crate::k8s::{KubernetesAgents, kubernetes_agent_node};
use crate::node::NODE_PATH_PREFIX;
use crate::service::{bearer_token, status_of};

/// Largest acknowledgement accepted, bytes (one is a few bytes).
pub const MAX_ACK_BYTES: usize = 1024;

/// A repeated acknowledgement (an agent's heartbeat) refreshes the agent's `acked_at` in
/// the store at most this often, so that `root status` and `root activate` can tell live
/// agents from stale ones without a write per heartbeat.
pub const ACK_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// What to do with one acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckDecision {
    /// `applied_sequence` 0: the agent has applied nothing yet.
    Nothing,
    /// Already recorded for this stream; a repeat adds nothing.
    Repeat,
    /// Higher than any sequence this CA has published: ignored, with a warning.
    NeverSent,
    /// Record it.
    Record,
}

/// Judges an acknowledgement of `applied` when this CA has published up to `current` and
/// this stream last recorded `last_recorded` (pure).
pub fn judge_ack(applied: u64, current: u64, last_recorded: u64) -> AckDecision {
    if applied == 0 {
        AckDecision::Nothing
    } else if applied > current {
        AckDecision::NeverSent
    } else if applied <= last_recorded {
        AckDecision::Repeat
    } else {
        AckDecision::Record
    }
}

/// Serves `WatchTrustBundle`.
pub struct TrustBundleStreamService {
    auth: AuthChain,
    k8s: Option<KubernetesAgents>,
    store: Arc<dyn AckStore>,
    snapshots: watch::Receiver<Arc<BundleSnapshot>>,
    shutdown: watch::Receiver<bool>,
}

impl TrustBundleStreamService {
    /// Authenticates with `auth`, streams `snapshots`, records acknowledgements in `store`;
    /// every stream ends when `shutdown` turns true.
    pub fn new(
        auth: AuthChain,
        store: Arc<dyn AckStore>,
        snapshots: watch::Receiver<Arc<BundleSnapshot>>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            auth,
            k8s: None,
            store,
            snapshots,
            shutdown,
        }
    }

    /// Also admits Kubernetes node agents ([`kubernetes_agent_node`]).
    pub fn with_kubernetes_agents(mut self, agents: Option<KubernetesAgents>) -> Self {
        self.k8s = agents;
        self
    }
}

/// The stream of updates: the current snapshot at once, then the latest after each change,
/// until `shutdown` or until the publisher is gone.
fn updates(
    snapshots: watch::Receiver<Arc<BundleSnapshot>>,
    shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Result<TrustBundleUpdate, Status>> + Send + 'static {
    latest_until_shutdown(snapshots, shutdown, |s| Ok(s.to_update()))
}

/// What every full-state stream to node agents sends: `render` of the current value of
/// `snapshots` at once, then of the latest after each change (changes in between are
/// skipped: a slow agent gets the newest state, never a backlog), until `shutdown` turns
/// true or the publisher is gone.
pub fn latest_until_shutdown<S, U, F>(
    snapshots: watch::Receiver<S>,
    shutdown: watch::Receiver<bool>,
    render: F,
) -> impl Stream<Item = U> + Send + 'static
where
    S: Send + Sync + 'static,
    U: Send + 'static,
    F: FnMut(&S) -> U + Send + 'static,
{
    futures::stream::unfold(
        (snapshots, shutdown, render, true),
        |(mut snapshots, mut shutdown, mut render, first)| async move {
            if !first {
                tokio::select! {
                    changed = snapshots.changed() => changed.ok()?,
                    _ = shutdown.wait_for(|stop| *stop) => return None,
                }
            }
            if *shutdown.borrow() {
                return None;
            }
            let item = render(&snapshots.borrow_and_update());
            Some((item, (snapshots, shutdown, render, false)))
        },
    )
}

/// Records the acknowledgements of `agent` until the agent closes its side or the CA shuts
/// down. Store errors are logged; the stream goes on.
async fn record_acks(
    mut acks: Streaming<TrustBundleAck>,
    agent: String,
    store: Arc<dyn AckStore>,
    snapshots: watch::Receiver<Arc<BundleSnapshot>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_recorded = 0;
    let mut recorded_at = tokio::time::Instant::now();
    loop {
        let next = tokio::select! {
            next = acks.message() => next,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let applied = match next {
            Ok(Some(ack)) => ack.applied_sequence,
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(%agent, status = %Escaped(&status), "trust-bundle stream closed by the agent");
                return;
            }
        };
        let current = snapshots.borrow().sequence;
        let mut decision = judge_ack(applied, current, last_recorded);
        if decision == AckDecision::Repeat
            && applied == last_recorded
            && recorded_at.elapsed() >= ACK_REFRESH
        {
            // A heartbeat: the agent is alive and still holds `applied`.
            decision = AckDecision::Record;
        }
        match decision {
            AckDecision::Nothing | AckDecision::Repeat => {}
            AckDecision::NeverSent => tracing::warn!(
                %agent,
                applied,
                current,
                "agent acknowledged a bundle sequence this CA never sent; ignored"
            ),
            AckDecision::Record => match store.record_bundle_ack(&agent, applied, unix_now()).await
            {
                Ok(()) => {
                    last_recorded = applied;
                    recorded_at = tokio::time::Instant::now();
                    tracing::debug!(%agent, applied, "trust bundle acknowledged");
                }
                Err(e) => tracing::warn!(
                    %agent,
                    applied,
                    error = %e,
                    "cannot record a trust-bundle acknowledgement"
                ),
            },
        }
    }
}

/// Authenticates the caller of a node-agent stream (`what`, for logs and errors): only node
/// agents, proven by their node certificate or (on Kubernetes, `k8s`) by a trusted agent's
/// service-account token naming its node, may open one. Their acknowledgements are what
/// `root status` and `node list` report, and a workload or an unused join token must not add
/// rows. Returns the caller and the node identity its acknowledgements are recorded under.
pub async fn authenticate_node_agent<T>(
    auth: &AuthChain,
    k8s: Option<&KubernetesAgents>,
    request: &Request<T>,
    what: &str,
) -> Result<(Caller, String), Status> {
    let peer_chain = request.peer_certs();
    let bearer = bearer_token(request.metadata()).map(str::to_owned);
    let caller = auth
        .authenticate(&Credentials {
            bearer_token: bearer.as_deref(),
            peer_chain: peer_chain.as_deref().map(Vec::as_slice),
            now: unix_now(),
        })
        .await
        .map_err(|e| {
            let e = IssueError::from(e);
            tracing::warn!(error = %Escaped(&e), "{what} refused");
            status_of(&e)
        })?;
    if caller.method == AuthMethod::ClientCertificate
        && caller.identity.path().starts_with(NODE_PATH_PREFIX)
    {
        let id = caller.identity.to_string();
        return Ok((caller, id));
    }
    if let Some(node) = k8s.and_then(|k| kubernetes_agent_node(&caller, k)) {
        return Ok((caller, node.to_string()));
    }
    tracing::warn!(caller = %caller.identity, method = caller.method.as_str(), "{what} refused: not a node agent");
    Err(Status::permission_denied(format!(
        "{} may not open the {what}: only node agents authenticated with their node certificate (or, on Kubernetes, a trusted agent's token naming its node) may",
        caller.identity
    )))
}

/// The stream type of `WatchTrustBundle`.
pub type UpdateStream = Pin<Box<dyn Stream<Item = Result<TrustBundleUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl TrustBundleService for TrustBundleStreamService {
    type WatchTrustBundleStream = UpdateStream;

    async fn watch_trust_bundle(
        &self,
        request: Request<Streaming<TrustBundleAck>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let (caller, agent) = authenticate_node_agent(
            &self.auth,
            self.k8s.as_ref(),
            &request,
            "trust-bundle stream",
        )
        .await?;
        tracing::info!(
            agent = %agent,
            method = caller.method.as_str(),
            "trust-bundle stream opened"
        );
        tokio::spawn(record_acks(
            request.into_inner(),
            agent,
            self.store.clone(),
            self.snapshots.clone(),
            self.shutdown.clone(),
        ));
        let stream = updates(self.snapshots.clone(), self.shutdown.clone());
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::Authority;
    use citadel_identity::{TrustBundle, TrustDomain};
    use futures::StreamExt;

    #[test]
    fn acks_are_recorded_once_each_and_only_for_sequences_sent() {
        let cases = [
            // (applied, current, last recorded, decision)
            (0, 5, 0, AckDecision::Nothing),
            (5, 5, 0, AckDecision::Record),
            (3, 5, 0, AckDecision::Record),
            (4, 5, 3, AckDecision::Record),
            (5, 5, 5, AckDecision::Repeat),
            (2, 5, 3, AckDecision::Repeat),
            (6, 5, 0, AckDecision::NeverSent),
            (u64::MAX, 5, 5, AckDecision::NeverSent),
        ];
        for (applied, current, last, expected) in cases {
            assert_eq!(
                judge_ack(applied, current, last),
                expected,
                "applied {applied}, current {current}, last {last}"
            );
        }
    }

    fn snapshot(sequence: u64) -> Arc<BundleSnapshot> {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (root, _key) = Authority::create_root(&td, 1_000, 86_400).unwrap();
        let bundle = TrustBundle::new(td, vec![root.root().clone()]).unwrap();
        Arc::new(BundleSnapshot {
            sequence,
            bundle,
            active_authority_id: root.id().to_owned(),
        })
    }

    #[tokio::test]
    async fn stream_sends_the_current_bundle_then_the_latest_and_ends_on_shutdown() {
        let (publish, snapshots) = watch::channel(snapshot(1));
        let (stop, shutdown) = watch::channel(false);
        let mut stream = Box::pin(updates(snapshots, shutdown));
        assert_eq!(stream.next().await.unwrap().unwrap().sequence, 1);
        // Two changes while the agent was not reading: it gets the latest only.
        publish.send_replace(snapshot(2));
        publish.send_replace(snapshot(3));
        assert_eq!(stream.next().await.unwrap().unwrap().sequence, 3);
        stop.send_replace(true);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn stream_ends_when_shutdown_came_first() {
        let (_publish, snapshots) = watch::channel(snapshot(1));
        let (_stop, shutdown) = watch::channel(true);
        let mut stream = Box::pin(updates(snapshots, shutdown));
        assert!(stream.next().await.is_none());
    }
}
