//! `citadel.v1.PolicyService/WatchPolicies`: the policy set streamed to node agents, and their
//! acknowledgements recorded in the store.
//!
//! Same rules as the trust-bundle stream: only node agents authenticated with their node
//! certificate; the full set at once and again after every change, read from a `watch`
//! channel only when the transport asks for the next message (a slow agent gets the latest
//! set, never a backlog); acknowledgements read by a task of their own; both end when the CA
//! shuts down.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use citadel_identity::Escaped;
use citadel_proto::citadel::v1::policy_service_server::PolicyService;
use citadel_proto::citadel::v1::{PolicyAck, PolicySet};
use citadel_store::AckStore;
use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::bundle_service::{AckDecision, authenticate_node_agent, latest_until_shutdown};
use crate::clock::unix_now;
use crate::policy_set::PolicySnapshot;

/// Largest acknowledgement accepted, bytes (one carries a 64-character version).
pub const MAX_POLICY_ACK_BYTES: usize = 1024;

/// How many versions sent on one stream are remembered for judging acknowledgements.
const SENT_VERSIONS_KEPT: usize = 16;

/// Judges an acknowledgement of `applied` given whether this stream sent that version and
/// the version this stream last recorded (pure).
pub fn judge_policy_ack(applied: &str, was_sent: bool, last_recorded: Option<&str>) -> AckDecision {
    if applied.is_empty() {
        AckDecision::Nothing
    } else if !was_sent {
        AckDecision::NeverSent
    } else if last_recorded == Some(applied) {
        AckDecision::Repeat
    } else {
        AckDecision::Record
    }
}

/// The versions one stream has sent, newest last, at most [`SENT_VERSIONS_KEPT`].
#[derive(Debug, Default)]
struct Sent(Mutex<VecDeque<String>>);

impl Sent {
    fn push(&self, version: &str) {
        let Ok(mut sent) = self.0.lock() else { return };
        if sent.back().map(String::as_str) != Some(version) {
            sent.push_back(version.to_owned());
        }
        while sent.len() > SENT_VERSIONS_KEPT {
            sent.pop_front();
        }
    }

    fn contains(&self, version: &str) -> bool {
        self.0
            .lock()
            .map(|sent| sent.iter().any(|v| v == version))
            .unwrap_or(false)
    }
}

/// Serves `WatchPolicies`.
pub struct PolicyStreamService {
    auth: crate::auth::AuthChain,
    k8s: Option<crate::k8s::KubernetesAgents>,
    store: Arc<dyn AckStore>,
    snapshots: watch::Receiver<Arc<PolicySnapshot>>,
    shutdown: watch::Receiver<bool>,
}

impl PolicyStreamService {
    /// Authenticates with `auth`, streams `snapshots`, records acknowledgements in `store`;
    /// every stream ends when `shutdown` turns true.
    pub fn new(
        auth: crate::auth::AuthChain,
        store: Arc<dyn AckStore>,
        snapshots: watch::Receiver<Arc<PolicySnapshot>>,
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

    /// Also admits Kubernetes node agents ([`crate::k8s::kubernetes_agent_node`]).
    pub fn with_kubernetes_agents(mut self, agents: Option<crate::k8s::KubernetesAgents>) -> Self {
        self.k8s = agents;
        self
    }
}

/// The stream of sets: the current one at once, then the latest after each change, until
/// `shutdown` or until the publisher is gone. Every version sent is noted in `sent`.
fn updates(
    snapshots: watch::Receiver<Arc<PolicySnapshot>>,
    shutdown: watch::Receiver<bool>,
    sent: Arc<Sent>,
) -> impl Stream<Item = Result<PolicySet, Status>> + Send + 'static {
    latest_until_shutdown(snapshots, shutdown, move |s| {
        let update = s.to_update();
        sent.push(&update.version);
        Ok(update)
    })
}

/// Records the acknowledgements of `agent` until the agent closes its side or the CA shuts
/// down. Store errors are logged; the stream goes on.
async fn record_acks(
    mut acks: Streaming<PolicyAck>,
    agent: String,
    store: Arc<dyn AckStore>,
    sent: Arc<Sent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_recorded: Option<String> = None;
    loop {
        let next = tokio::select! {
            next = acks.message() => next,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let applied = match next {
            Ok(Some(ack)) => ack.applied_version,
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(%agent, status = %Escaped(&status), "policy stream closed by the agent");
                return;
            }
        };
        match judge_policy_ack(&applied, sent.contains(&applied), last_recorded.as_deref()) {
            AckDecision::Nothing | AckDecision::Repeat => {}
            AckDecision::NeverSent => tracing::warn!(
                %agent,
                "agent acknowledged a policy version this stream never sent; ignored"
            ),
            AckDecision::Record => {
                match store.record_policy_ack(&agent, &applied, unix_now()).await {
                    Ok(()) => {
                        tracing::debug!(%agent, version = %Escaped(&applied), "policy set acknowledged");
                        last_recorded = Some(applied);
                    }
                    Err(e) => tracing::warn!(
                        %agent,
                        version = %Escaped(&applied),
                        error = %e,
                        "cannot record a policy acknowledgement"
                    ),
                }
            }
        }
    }
}

/// The stream type of `WatchPolicies`.
pub type PolicyUpdateStream = Pin<Box<dyn Stream<Item = Result<PolicySet, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyService for PolicyStreamService {
    type WatchPoliciesStream = PolicyUpdateStream;

    async fn watch_policies(
        &self,
        request: Request<Streaming<PolicyAck>>,
    ) -> Result<Response<PolicyUpdateStream>, Status> {
        let (caller, agent) =
            authenticate_node_agent(&self.auth, self.k8s.as_ref(), &request, "policy stream")
                .await?;
        tracing::info!(
            agent = %agent,
            method = caller.method.as_str(),
            "policy stream opened"
        );
        let sent = Arc::new(Sent::default());
        tokio::spawn(record_acks(
            request.into_inner(),
            agent,
            self.store.clone(),
            sent.clone(),
            self.shutdown.clone(),
        ));
        let stream = updates(self.snapshots.clone(), self.shutdown.clone(), sent);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_proto::citadel::v1::PolicyObject;
    use futures::StreamExt;

    #[test]
    fn policy_acks_are_recorded_once_each_and_only_for_versions_sent() {
        let cases = [
            // (applied, sent on this stream, last recorded, decision)
            ("", false, None, AckDecision::Nothing),
            ("", true, Some("a"), AckDecision::Nothing),
            ("a", true, None, AckDecision::Record),
            ("b", true, Some("a"), AckDecision::Record),
            ("a", true, Some("b"), AckDecision::Record),
            ("a", true, Some("a"), AckDecision::Repeat),
            ("z", false, None, AckDecision::NeverSent),
            ("z", false, Some("a"), AckDecision::NeverSent),
        ];
        for (applied, sent, last, expected) in cases {
            assert_eq!(
                judge_policy_ack(applied, sent, last),
                expected,
                "applied {applied:?}, sent {sent}, last {last:?}"
            );
        }
    }

    fn snapshot(name: &str) -> Arc<PolicySnapshot> {
        Arc::new(PolicySnapshot::new(vec![PolicyObject {
            kind: "AuthorizationPolicy".into(),
            api_version: "security.istio.io/v1".into(),
            namespace: "shop".into(),
            name: name.into(),
            json: "{}".into(),
            resolved_jwks: Vec::new(),
        }]))
    }

    #[tokio::test]
    async fn policy_stream_sends_the_current_set_then_the_latest_and_ends_on_shutdown() {
        let (publish, snapshots) = watch::channel(snapshot("a"));
        let (stop, shutdown) = watch::channel(false);
        let sent = Arc::new(Sent::default());
        let mut stream = Box::pin(updates(snapshots, shutdown, sent.clone()));
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.objects[0].name, "a");
        assert!(sent.contains(&first.version));
        // Two changes while the agent was not reading: it gets the latest only.
        publish.send_replace(snapshot("b"));
        publish.send_replace(snapshot("c"));
        let latest = stream.next().await.unwrap().unwrap();
        assert_eq!(latest.objects[0].name, "c");
        assert!(!sent.contains(&snapshot("b").version));
        stop.send_replace(true);
        assert!(stream.next().await.is_none());
    }

    #[test]
    fn sent_versions_are_bounded() {
        let sent = Sent::default();
        for i in 0..(SENT_VERSIONS_KEPT + 4) {
            sent.push(&format!("v{i}"));
        }
        assert!(!sent.contains("v0"));
        assert!(sent.contains(&format!("v{}", SENT_VERSIONS_KEPT + 3)));
    }
}
