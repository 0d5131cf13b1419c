//! The policy set the agent relays: received from the CA's `citadel.v1.PolicyService`
//! stream, parsed with the policy crate, applied, then acknowledged; and the pure choice of
//! which of its objects apply to one workload.

use std::collections::BTreeMap;
use std::sync::Arc;

use citadel_identity::{Backoff, Escaped};
use citadel_policy::{Loader, MeshConfig, Workload, applies_to, namespace_of_spiffe_id};
use citadel_proto::citadel::v1::policy_service_client::PolicyServiceClient;
use citadel_proto::citadel::v1::{PolicyAck, PolicyObject, PolicySet, WorkloadPolicies};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::ca_client::GrpcCa;
use crate::metrics::AgentMetrics;
use crate::random_unit;

/// A policy set as applied: each object as received (what workloads are sent) beside its
/// parsed form (what applicability is judged on), parsed once per set.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyState {
    /// The CA's version of the set.
    pub version: String,
    objects: Vec<(PolicyObject, citadel_policy::PolicyObject)>,
}

impl PolicyState {
    /// Number of objects in the set.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// True when the set has no object.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

/// The set of the moment; `None` until the CA has sent one.
pub type PolicyWatch = watch::Receiver<Option<Arc<PolicyState>>>;

/// Why a set from the CA was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyUpdateError {
    /// The set carries no version.
    #[error("policy set without a version")]
    NoVersion,
    /// An object does not parse or validate as the one object its header names.
    #[error("policy object {kind} {namespace}/{name} is unusable: {reason}")]
    Object {
        /// Kind, as the header says.
        kind: String,
        /// Namespace, as the header says.
        namespace: String,
        /// Name, as the header says.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Parses every object of `set` with the policy crate (pure). All or nothing: one unusable
/// object refuses the set, so the agent keeps the set it has and does not acknowledge.
pub fn parse_set(set: &PolicySet, mesh: &MeshConfig) -> Result<PolicyState, PolicyUpdateError> {
    if set.version.is_empty() {
        return Err(PolicyUpdateError::NoVersion);
    }
    let mut objects = Vec::with_capacity(set.objects.len());
    for o in &set.objects {
        let unusable = |reason: String| PolicyUpdateError::Object {
            kind: o.kind.clone(),
            namespace: o.namespace.clone(),
            name: o.name.clone(),
            reason,
        };
        let mut loader = Loader::new(mesh.clone());
        loader.add_source(&format!("{} {}/{}", o.kind, o.namespace, o.name), &o.json);
        if let Some(error) = loader.diagnostics().iter().find(|d| d.is_error()) {
            return Err(unusable(error.to_string()));
        }
        let [loaded] = loader.objects() else {
            return Err(unusable(format!(
                "holds {} policy objects, not one",
                loader.objects().len()
            )));
        };
        let parsed = &loaded.object;
        if parsed.kind() != o.kind
            || parsed.metadata().namespace() != o.namespace
            || parsed.metadata().name() != o.name
        {
            return Err(unusable(format!(
                "its JSON is {} {}/{}",
                parsed.kind(),
                parsed.metadata().namespace(),
                parsed.metadata().name()
            )));
        }
        objects.push((o.clone(), parsed.clone()));
    }
    Ok(PolicyState {
        version: set.version.clone(),
        objects,
    })
}

/// The message for the workload `spiffe_id` with `labels` (pure): the objects of `state` that
/// apply to it, in the set's order. Its namespace comes from its SPIFFE ID; an ID not of the
/// form `spiffe://<td>/ns/<ns>/sa/<sa>` has none and gets only root-namespace policies.
pub fn workload_policies(
    state: &PolicyState,
    spiffe_id: &str,
    labels: &BTreeMap<String, String>,
    mesh: &MeshConfig,
) -> WorkloadPolicies {
    let namespace = namespace_of_spiffe_id(spiffe_id).unwrap_or_default();
    let pairs: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let workload = Workload {
        namespace,
        labels: &pairs,
    };
    WorkloadPolicies {
        version: state.version.clone(),
        spiffe_id: spiffe_id.to_owned(),
        namespace: namespace.to_owned(),
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        objects: state
            .objects
            .iter()
            .filter(|(_, parsed)| applies_to(parsed, &workload, mesh))
            .map(|(wire, _)| wire.clone())
            .collect(),
    }
}

/// Keeps `tx` up to date from the CA's policy stream, reconnecting with backoff, and
/// acknowledges each set once it is applied (published to the workloads' streams).
pub async fn follow_ca_policies(
    ca: Arc<GrpcCa>,
    tx: watch::Sender<Option<Arc<PolicyState>>>,
    metrics: AgentMetrics,
    mesh: MeshConfig,
) {
    let backoff = Backoff::default();
    let mut failures = 0u32;
    loop {
        match follow_once(&ca, &tx, &metrics, &mesh, &mut failures).await {
            Ok(()) => tracing::info!("policy stream ended; reconnecting"),
            Err(status) => {
                metrics.ca_error(&format!("{:?}", status.code()));
                tracing::warn!(code = ?status.code(), message = %Escaped(status.message()), "policy stream failed");
            }
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(backoff.delay(failures, random_unit())).await;
    }
}

async fn follow_once(
    ca: &GrpcCa,
    tx: &watch::Sender<Option<Arc<PolicyState>>>,
    metrics: &AgentMetrics,
    mesh: &MeshConfig,
    failures: &mut u32,
) -> Result<(), tonic::Status> {
    let (ack_tx, ack_rx) = mpsc::channel::<PolicyAck>(4);
    let applied = tx
        .borrow()
        .as_ref()
        .map_or_else(String::new, |s| s.version.clone());
    // The first message says what we hold, so the HTTP/2 stream opens at once.
    let _ = ack_tx.try_send(PolicyAck {
        applied_version: applied,
    });
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(ack_rx));
    ca.authorize(&mut request)?;
    let mut client = PolicyServiceClient::new(ca.channel());
    let mut sets = client.watch_policies(request).await?.into_inner();
    while let Some(set) = sets.next().await {
        let set = set?;
        *failures = 0;
        match parse_set(&set, mesh) {
            Ok(state) => {
                let changed =
                    tx.borrow().as_ref().map(|s| s.version.as_str()) != Some(&state.version);
                if changed {
                    tracing::info!(
                        version = %state.version,
                        objects = state.len(),
                        "applied policy set"
                    );
                    metrics.policy_version(&state.version, state.len());
                    tx.send_replace(Some(Arc::new(state)));
                }
                if ack_tx
                    .send(PolicyAck {
                        applied_version: set.version,
                    })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            Err(e) => {
                metrics.policy_update_error();
                tracing::error!(version = %set.version, error = %e, "refusing policy set; the current one stays");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: &str, namespace: &str, name: &str, spec: &str) -> PolicyObject {
        PolicyObject {
            kind: kind.into(),
            api_version: "security.istio.io/v1".into(),
            namespace: namespace.into(),
            name: name.into(),
            json: format!(
                r#"{{"apiVersion":"security.istio.io/v1","kind":"{kind}","metadata":{{"name":"{name}","namespace":"{namespace}"}},"spec":{spec}}}"#
            ),
            resolved_jwks: Vec::new(),
        }
    }

    fn set() -> PolicySet {
        PolicySet {
            version: "v1".into(),
            objects: vec![
                object("AuthorizationPolicy", "bank", "bank-all", "{}"),
                object(
                    "AuthorizationPolicy",
                    "istio-system",
                    "mesh",
                    r#"{"action":"DENY"}"#,
                ),
                object(
                    "AuthorizationPolicy",
                    "shop",
                    "cart",
                    r#"{"selector":{"matchLabels":{"app":"cart"}}}"#,
                ),
                object("AuthorizationPolicy", "shop", "shop-all", "{}"),
                object(
                    "PeerAuthentication",
                    "istio-system",
                    "default",
                    r#"{"mtls":{"mode":"STRICT"}}"#,
                ),
            ],
        }
    }

    fn names(spiffe_id: &str, labels: &[(&str, &str)]) -> Vec<String> {
        let mesh = MeshConfig::default();
        let state = parse_set(&set(), &mesh).unwrap();
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let msg = workload_policies(&state, spiffe_id, &labels, &mesh);
        assert_eq!(msg.version, "v1");
        assert_eq!(msg.spiffe_id, spiffe_id);
        msg.objects.into_iter().map(|o| o.name).collect()
    }

    #[test]
    fn workload_gets_its_namespace_and_root_namespace_policies() {
        assert_eq!(
            names("spiffe://cluster.local/ns/shop/sa/web", &[("app", "web")]),
            ["mesh", "shop-all", "default"]
        );
    }

    #[test]
    fn selector_policy_goes_only_to_workloads_whose_labels_match() {
        assert_eq!(
            names("spiffe://cluster.local/ns/shop/sa/cart", &[("app", "cart")]),
            ["mesh", "cart", "shop-all", "default"]
        );
    }

    #[test]
    fn other_namespaces_policies_are_not_sent() {
        let got = names(
            "spiffe://cluster.local/ns/bank/sa/vault",
            &[("app", "cart")],
        );
        assert_eq!(got, ["bank-all", "mesh", "default"]);
    }

    #[test]
    fn identity_without_a_namespace_gets_root_namespace_policies_only() {
        assert_eq!(
            names("spiffe://cluster.local/vm/builder", &[("app", "cart")]),
            ["mesh", "default"]
        );
    }

    #[test]
    fn root_namespace_is_configurable() {
        let mesh = MeshConfig {
            root_namespace: "bank".into(),
        };
        let state = parse_set(&set(), &mesh).unwrap();
        let msg = workload_policies(
            &state,
            "spiffe://cluster.local/ns/shop/sa/web",
            &BTreeMap::new(),
            &mesh,
        );
        let got: Vec<_> = msg.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(got, ["bank-all", "shop-all"]);
    }

    #[test]
    fn a_set_with_an_unusable_object_is_refused_whole() {
        let mesh = MeshConfig::default();
        let mut bad = set();
        bad.objects[1].json = r#"{"kind":"AuthorizationPolicy"}"#.into();
        assert!(matches!(
            parse_set(&bad, &mesh),
            Err(PolicyUpdateError::Object { .. })
        ));
        let mut renamed = set();
        renamed.objects[0].name = "other".into();
        assert!(parse_set(&renamed, &mesh).is_err());
        let mut two = set();
        two.objects[0].json = format!("{}\n---\n{}", two.objects[0].json, two.objects[3].json);
        assert!(parse_set(&two, &mesh).is_err());
        let mut unversioned = set();
        unversioned.version.clear();
        assert_eq!(
            parse_set(&unversioned, &mesh),
            Err(PolicyUpdateError::NoVersion)
        );
    }
}
