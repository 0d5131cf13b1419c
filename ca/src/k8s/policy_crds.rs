//! Policies from the `security.istio.io/v1` custom resources (AuthorizationPolicy,
//! PeerAuthentication, RequestAuthentication) in all namespaces: the second
//! [`PolicySource`] beside `--policies DIR`.
//!
//! One `kube` watcher per kind keeps the objects; each call of [`PolicySource::changed`]
//! after a change hands the poller every *valid* object. Each object is validated on its own
//! first: an invalid one is logged by kind, namespace and name, counted
//! (`citadel_policy_reload_errors`) and left out, so the others stay in force — a cluster
//! where anyone may create a policy cannot have one bad object freeze every later change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel_policy::MeshConfig;
use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{Notify, watch};

use crate::metrics::CaMetrics;
use crate::policy_set::{Loaded, SourceText, load_sources};
use crate::policy_source::{PolicySource, PolicySourceError};

/// The watched kinds: (kind, plural).
pub const KINDS: [(&str, &str); 3] = [
    ("AuthorizationPolicy", "authorizationpolicies"),
    ("PeerAuthentication", "peerauthentications"),
    ("RequestAuthentication", "requestauthentications"),
];
/// How long the first read waits for every watcher's first list.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

type Key = (String, String, String);

#[derive(Default)]
struct Objects {
    generation: u64,
    synced: [bool; 3],
    by_key: BTreeMap<Key, serde_json::Value>,
}

/// The CRD policy source.
pub struct CrdSource {
    objects: Arc<Mutex<Objects>>,
    synced: Arc<Notify>,
    mesh: MeshConfig,
    metrics: Arc<CaMetrics>,
    last_generation: Option<u64>,
}

fn lock(m: &Mutex<Objects>) -> std::sync::MutexGuard<'_, Objects> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The policy-crate text of one object: its kind, apiVersion, metadata and spec (pure).
fn object_text(kind: &str, obj: &DynamicObject) -> String {
    let mut meta = serde_json::Map::new();
    let m = &obj.metadata;
    let put =
        |meta: &mut serde_json::Map<String, serde_json::Value>, k: &str, v: serde_json::Value| {
            meta.insert(k.to_owned(), v);
        };
    put(&mut meta, "name", m.name.clone().into());
    put(&mut meta, "namespace", m.namespace.clone().into());
    if let Some(ts) = &m.creation_timestamp {
        put(&mut meta, "creationTimestamp", ts.0.to_string().into());
    }
    if let Some(a) = &m.annotations {
        put(&mut meta, "annotations", serde_json::json!(a));
    }
    if let Some(l) = &m.labels {
        put(&mut meta, "labels", serde_json::json!(l));
    }
    let mut doc = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": meta,
    });
    if let Some(spec) = obj.data.get("spec") {
        doc["spec"] = spec.clone();
    }
    doc.to_string()
}

impl CrdSource {
    /// Starts one watcher per kind on `client`; they stop with `shutdown`.
    pub fn start(
        client: kube::Client,
        mesh: MeshConfig,
        metrics: Arc<CaMetrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let objects = Arc::new(Mutex::new(Objects::default()));
        let synced = Arc::new(Notify::new());
        for (i, (kind, plural)) in KINDS.iter().enumerate() {
            let gvk = GroupVersionKind::gvk("security.istio.io", "v1", kind);
            let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            tokio::spawn(follow(
                i,
                kind,
                api,
                objects.clone(),
                synced.clone(),
                shutdown.clone(),
            ));
        }
        Self {
            objects,
            synced,
            mesh,
            metrics,
            last_generation: None,
        }
    }
}

async fn follow(
    i: usize,
    kind: &'static str,
    api: Api<DynamicObject>,
    objects: Arc<Mutex<Objects>>,
    synced: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut relist: Option<BTreeMap<Key, serde_json::Value>> = None;
    let key = |o: &DynamicObject| {
        (
            kind.to_owned(),
            o.metadata.namespace.clone().unwrap_or_default(),
            o.metadata.name.clone().unwrap_or_default(),
        )
    };
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match event {
            None => return,
            Some(Ok(Event::Init)) => relist = Some(BTreeMap::new()),
            Some(Ok(Event::InitApply(o))) => {
                let text = object_text(kind, &o);
                relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&o), text.into());
            }
            Some(Ok(Event::InitDone)) => {
                let fresh = relist.take().unwrap_or_default();
                let mut all = lock(&objects);
                all.by_key.retain(|(k, _, _), _| k != kind);
                all.by_key.extend(fresh);
                all.generation += 1;
                if let Some(s) = all.synced.get_mut(i) {
                    *s = true;
                }
                synced.notify_waiters();
            }
            Some(Ok(Event::Apply(o))) => {
                let mut all = lock(&objects);
                all.by_key.insert(key(&o), object_text(kind, &o).into());
                all.generation += 1;
            }
            Some(Ok(Event::Delete(o))) => {
                let mut all = lock(&objects);
                all.by_key.remove(&key(&o));
                all.generation += 1;
            }
            Some(Err(e)) => tracing::warn!(kind, error = %e, "policy watch failed; retrying"),
        }
    }
}

#[async_trait::async_trait]
impl PolicySource for CrdSource {
    fn describe(&self) -> String {
        "security.istio.io custom resources".into()
    }

    async fn changed(&mut self) -> Result<Option<Vec<SourceText>>, PolicySourceError> {
        let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
        loop {
            let notified = self.synced.notified();
            if lock(&self.objects).synced.iter().all(|s| *s) {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(PolicySourceError::Read {
                    path: self.describe(),
                    reason: "the policy watches did not list within 30 s".into(),
                });
            }
        }
        let (generation, objects) = {
            let all = lock(&self.objects);
            (all.generation, all.by_key.clone())
        };
        if self.last_generation == Some(generation) {
            return Ok(None);
        }
        self.last_generation = Some(generation);
        let mut valid = Vec::new();
        for ((kind, ns, name), text) in objects {
            let source = SourceText {
                name: format!("{kind} {ns}/{name}"),
                text: text.as_str().unwrap_or_default().to_owned(),
            };
            match load_sources(std::slice::from_ref(&source), &self.mesh) {
                Loaded::Valid { .. } => valid.push(source),
                Loaded::Invalid(diagnostics) => {
                    self.metrics.policy_reload_errors.inc();
                    let errors: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
                    tracing::warn!(kind, namespace = %ns, name = %name, errors = %errors.join("; "), "invalid policy object left out; the others stay in force");
                }
            }
        }
        Ok(Some(valid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_objects_text_keeps_what_the_policy_crate_reads_and_drops_server_fields() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "d", "namespace": "istio-system", "uid": "u", "resourceVersion": "9",
                         "creationTimestamp": "2026-01-02T03:04:05Z", "managedFields": [{}]},
            "spec": {"mtls": {"mode": "STRICT"}},
            "status": {"validationMessages": []},
        }))
        .unwrap();
        let text: serde_json::Value =
            serde_json::from_str(&object_text("PeerAuthentication", &obj)).unwrap();
        assert_eq!(
            text,
            serde_json::json!({
                "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"name": "d", "namespace": "istio-system",
                             "creationTimestamp": "2026-01-02T03:04:05Z"},
                "spec": {"mtls": {"mode": "STRICT"}},
            })
        );
    }
}
