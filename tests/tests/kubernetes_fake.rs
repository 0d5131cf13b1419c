//! The fake Kubernetes API server, driven through the real `kube` client:
//! the JSON and status codes it answers are what `kube` expects of a real one.

use std::time::Duration;

use citadel_e2e::fake_kube::{Availability, FakeKube, namespace, pod, resources};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher::{self, Event};
use serde_json::json;

fn configmap(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "data": {"k": value},
    }))
    .unwrap()
}

#[tokio::test]
async fn create_get_replace_delete_with_optimistic_concurrency() {
    let fake = FakeKube::start().await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(fake.client().unwrap(), "ns1");
    let created = api
        .create(&PostParams::default(), &configmap("c", "1"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    assert!(created.metadata.uid.is_some());

    let err = api
        .create(&PostParams::default(), &configmap("c", "1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );

    let mut next = created.clone();
    next.data = Some([("k".to_string(), "2".to_string())].into());
    let replaced = api
        .replace("c", &PostParams::default(), &next)
        .await
        .unwrap();
    assert_ne!(replaced.metadata.resource_version.as_ref(), Some(&rv));

    // `next` still carries the old resourceVersion: a lost update is refused.
    let err = api
        .replace("c", &PostParams::default(), &next)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );

    assert_eq!(api.get("c").await.unwrap().data, replaced.data);
    api.delete("c", &DeleteParams::default()).await.unwrap();
    let err = api.get("c").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_lease_update_without_resource_version_is_invalid_and_put_creates_it() {
    let fake = FakeKube::start().await.unwrap();
    let api: Api<Lease> = Api::namespaced(fake.client().unwrap(), "citadel-system");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "l"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    // PUT creates a missing Lease.
    api.replace("l", &PostParams::default(), &lease)
        .await
        .unwrap();
    let err = api
        .replace("l", &PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422 && s.reason == "Invalid"),
        "{err:?}"
    );
}

#[tokio::test]
async fn lists_filter_by_field_and_label_selectors() {
    let fake = FakeKube::start().await.unwrap();
    fake.insert(resources::PODS, pod("a", "p1", "web", "node-a", "Running"))
        .unwrap();
    fake.insert(resources::PODS, pod("a", "p2", "web", "node-b", "Running"))
        .unwrap();
    fake.insert(resources::PODS, pod("b", "p3", "db", "node-a", "Running"))
        .unwrap();
    let all: Api<Pod> = Api::all(fake.client().unwrap());
    let on_a = all
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    let mut names: Vec<_> = on_a
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["p1", "p3"]);
    let by_label = all
        .list(&ListParams::default().labels("app=p2"))
        .await
        .unwrap();
    assert_eq!(by_label.items.len(), 1);
    let in_b: Api<Pod> = Api::namespaced(fake.client().unwrap(), "b");
    assert_eq!(
        in_b.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    let err = all
        .list(&ListParams::default().fields("spec.bogus=x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 400),
        "{err:?}"
    );
}

/// Next Apply/Delete names from a watcher, skipping init events and errors.
async fn next_change<S>(events: &mut S) -> (String, String)
where
    S: futures::Stream<Item = Result<Event<Namespace>, watcher::Error>> + Unpin,
{
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("a watch event within 10 s")
            .expect("the watcher never ends");
        match ev {
            Ok(Event::Apply(o)) => return ("apply".into(), o.metadata.name.unwrap_or_default()),
            Ok(Event::Delete(o)) => return ("delete".into(), o.metadata.name.unwrap_or_default()),
            Ok(Event::InitApply(o)) => return ("init".into(), o.metadata.name.unwrap_or_default()),
            _ => {}
        }
    }
}

#[tokio::test]
async fn watcher_sees_changes_and_resumes_after_410_gone() {
    let fake = FakeKube::start().await.unwrap();
    fake.insert(resources::NAMESPACES, namespace("first"))
        .unwrap();
    let api: Api<Namespace> = Api::all(fake.client().unwrap());
    let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
    assert_eq!(
        next_change(&mut events).await,
        ("init".into(), "first".into())
    );
    fake.insert(resources::NAMESPACES, namespace("second"))
        .unwrap();
    assert_eq!(
        next_change(&mut events).await,
        ("apply".into(), "second".into())
    );

    // The server goes away (the stream ends); while it is away a namespace is created and
    // the history is compacted, so the watcher's next watch is told its resourceVersion is too
    // old; it re-lists and so learns of what happened meanwhile.
    fake.set_availability(Availability::Refusing);
    fake.insert(resources::NAMESPACES, namespace("third"))
        .unwrap();
    fake.compact();
    fake.set_availability(Availability::Up);
    let mut seen = Vec::new();
    while !seen.contains(&("init".to_string(), "third".to_string())) {
        seen.push(next_change(&mut events).await);
    }
    assert!(
        !seen.contains(&("apply".into(), "third".into())),
        "{seen:?}"
    );
    let lists = fake
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/namespaces?") && !r.contains("watch=true"))
        .count();
    assert!(
        lists >= 2,
        "a list at start, one after 410: {:?}",
        fake.requests()
    );
    let gone = fake
        .requests()
        .iter()
        .filter(|r| r.contains("watch=true"))
        .count();
    assert!(gone >= 2, "{:?}", fake.requests());

    fake.remove(resources::NAMESPACES, "", "second").unwrap();
    assert_eq!(
        next_change(&mut events).await,
        ("delete".into(), "second".into())
    );
}

#[tokio::test]
async fn watch_with_a_compacted_resource_version_gets_an_expired_error_event() {
    let fake = FakeKube::start().await.unwrap();
    fake.insert(resources::NAMESPACES, namespace("a")).unwrap();
    fake.insert(resources::NAMESPACES, namespace("b")).unwrap();
    fake.compact();
    let api: Api<Namespace> = Api::all(fake.client().unwrap());
    let mut stream = api
        .watch(&kube::api::WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match stream.next().await {
        Some(Ok(kube::api::WatchEvent::Error(s))) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert!(
                s.message.starts_with("too old resource version: 1"),
                "{}",
                s.message
            );
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn unavailable_server_answers_503_status() {
    let fake = FakeKube::start().await.unwrap();
    fake.set_availability(Availability::Unavailable);
    let mut config = fake.config();
    config.default_retry = false;
    let api: Api<Namespace> = Api::all(kube::Client::try_from(config).unwrap());
    let err = api.get("x").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 503),
        "{err:?}"
    );
}
