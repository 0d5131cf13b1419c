//! The trust bundle in every namespace: ConfigMap `istio-ca-root-cert`, key
//! `root-cert.pem`, label `istio.io/config: "true"`, as istiod's namespace
//! controller publishes it (workloads and sidecars mount it).
//!
//! A `kube` watcher over namespaces drives it: a namespace created later gets the
//! ConfigMap when it appears; a bundle change rewrites all of them; a periodic resync puts
//! back a ConfigMap someone deleted or edited. Skipped, as istiod skips them: `kube-public`,
//! `kube-node-lease`, `local-path-storage` and terminating namespaces. Writes are
//! create-or-replace with the read `resourceVersion`, so two writers never lose an update
//! silently (a 409 is retried at the next round). Only the leader writes (the Lease in
//! [`super::lease`]); a replica that becomes leader writes every namespace at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use citadel_identity::TrustBundle;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

/// Name of the ConfigMap.
pub const CONFIGMAP_NAME: &str = "istio-ca-root-cert";
/// Key of the PEM bundle in it.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// Label istiod puts on it.
pub const CONFIG_LABEL: (&str, &str) = ("istio.io/config", "true");
/// Namespaces that never get it.
pub const SKIPPED_NAMESPACES: [&str; 3] = ["kube-public", "kube-node-lease", "local-path-storage"];
/// Default time between two full passes over all namespaces.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(60);

/// Whether namespace `ns` gets the ConfigMap (pure).
pub fn wants_configmap(ns: &Namespace) -> bool {
    let name = ns.metadata.name.as_deref().unwrap_or_default();
    let terminating = ns.metadata.deletion_timestamp.is_some()
        || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    !name.is_empty() && !terminating && !SKIPPED_NAMESPACES.contains(&name)
}

/// What to do about one namespace's ConfigMap (pure).
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// It is as it should be.
    Nothing,
    /// It is missing: create this.
    Create(ConfigMap),
    /// It differs: replace it with this (carrying the read resourceVersion).
    Replace(ConfigMap),
}

/// Decides the write for namespace `ns` given the ConfigMap found there and the bundle PEM.
pub fn plan(ns: &str, existing: Option<&ConfigMap>, pem: &str) -> Action {
    let Some(current) = existing else {
        return Action::Create(ConfigMap {
            metadata: ObjectMeta {
                name: Some(CONFIGMAP_NAME.into()),
                namespace: Some(ns.into()),
                labels: Some(BTreeMap::from([(
                    CONFIG_LABEL.0.to_owned(),
                    CONFIG_LABEL.1.to_owned(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(ROOT_CERT_KEY.to_owned(), pem.to_owned())])),
            ..Default::default()
        });
    };
    let data_ok = current
        .data
        .as_ref()
        .and_then(|d| d.get(ROOT_CERT_KEY))
        .is_some_and(|v| v == pem);
    let label_ok = current
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(CONFIG_LABEL.0))
        .is_some_and(|v| v == CONFIG_LABEL.1);
    if data_ok && label_ok {
        return Action::Nothing;
    }
    let mut next = current.clone();
    next.data
        .get_or_insert_with(Default::default)
        .insert(ROOT_CERT_KEY.into(), pem.into());
    next.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(CONFIG_LABEL.0.into(), CONFIG_LABEL.1.into());
    Action::Replace(next)
}

async fn reconcile(client: &kube::Client, ns: &str, pem: &str) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let existing = api.get_opt(CONFIGMAP_NAME).await?;
    match plan(ns, existing.as_ref(), pem) {
        Action::Nothing => {}
        Action::Create(cm) => {
            api.create(&PostParams::default(), &cm).await?;
            tracing::info!(namespace = ns, "root certificate ConfigMap created");
        }
        Action::Replace(cm) => {
            api.replace(CONFIGMAP_NAME, &PostParams::default(), &cm)
                .await?;
            tracing::info!(namespace = ns, "root certificate ConfigMap updated");
        }
    }
    Ok(())
}

/// Publishes `bundle` into every namespace while `leader` is true, until `shutdown`.
pub async fn run_root_configmaps(
    client: kube::Client,
    mut bundle: watch::Receiver<TrustBundle>,
    mut leader: watch::Receiver<bool>,
    resync: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut namespaces = BTreeSet::new();
    let mut relist: Option<BTreeSet<String>> = None;
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut synced = false;
    loop {
        // Which namespaces to (re)write now.
        let todo: Vec<String> = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            changed = bundle.changed() => {
                if changed.is_err() { return }
                namespaces.iter().cloned().collect()
            }
            _ = tick.tick() => if synced { namespaces.iter().cloned().collect() } else { Vec::new() },
            changed = leader.changed() => {
                if changed.is_err() { return }
                namespaces.iter().cloned().collect()
            }
            event = events.next() => match event {
                None => return,
                Some(Ok(Event::Init)) => { relist = Some(BTreeSet::new()); Vec::new() }
                Some(Ok(Event::InitApply(ns))) => {
                    if wants_configmap(&ns) && let Some(name) = ns.metadata.name {
                        relist.get_or_insert_with(BTreeSet::new).insert(name);
                    }
                    Vec::new()
                }
                Some(Ok(Event::InitDone)) => {
                    namespaces = relist.take().unwrap_or_default();
                    synced = true;
                    namespaces.iter().cloned().collect()
                }
                Some(Ok(Event::Apply(ns))) => {
                    let name = ns.metadata.name.clone().unwrap_or_default();
                    if wants_configmap(&ns) {
                        namespaces.insert(name.clone());
                        vec![name]
                    } else {
                        namespaces.remove(&name);
                        Vec::new()
                    }
                }
                Some(Ok(Event::Delete(ns))) => {
                    if let Some(name) = ns.metadata.name.as_deref() { namespaces.remove(name); }
                    Vec::new()
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "namespace watch failed; retrying");
                    Vec::new()
                }
            },
        };
        if todo.is_empty() || !*leader.borrow_and_update() {
            continue;
        }
        let pem = bundle.borrow_and_update().to_pem();
        for ns in todo {
            if let Err(e) = reconcile(&client, &ns, &pem).await {
                tracing::warn!(namespace = %ns, error = %e, "root certificate ConfigMap not written; retrying at the next resync");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ns(name: &str, phase: &str) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name}, "status": {"phase": phase}}))
            .unwrap()
    }

    #[test]
    fn system_and_terminating_namespaces_get_no_configmap() {
        assert!(wants_configmap(&ns("shop", "Active")));
        assert!(!wants_configmap(&ns("kube-public", "Active")));
        assert!(!wants_configmap(&ns("kube-node-lease", "Active")));
        assert!(!wants_configmap(&ns("shop", "Terminating")));
    }

    #[test]
    fn a_missing_configmap_is_created_labelled_and_a_stale_one_replaced() {
        let Action::Create(cm) = plan("shop", None, "PEM1") else {
            panic!("expected a create")
        };
        assert_eq!(cm.data.as_ref().unwrap()[ROOT_CERT_KEY], "PEM1");
        assert_eq!(
            cm.metadata.labels.as_ref().unwrap()["istio.io/config"],
            "true"
        );
        assert_eq!(plan("shop", Some(&cm), "PEM1"), Action::Nothing);
        let mut stale = cm.clone();
        stale.metadata.resource_version = Some("7".into());
        let Action::Replace(next) = plan("shop", Some(&stale), "PEM2") else {
            panic!("expected a replace")
        };
        assert_eq!(next.data.as_ref().unwrap()[ROOT_CERT_KEY], "PEM2");
        assert_eq!(
            next.metadata.resource_version.as_deref(),
            Some("7"),
            "optimistic concurrency"
        );
    }
}
