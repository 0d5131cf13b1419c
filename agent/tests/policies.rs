//! The workload policy stream on the agent's socket: each attested caller gets the part of
//! the CA's policy set that applies to it, and every change of the set or of its labels.

mod support;

use std::time::Duration;

use citadel_proto::citadel::v1::{
    PolicyObject, PolicySet, WorkloadPolicies, WorkloadPoliciesRequest,
};
use support::{Harness, Options, WEB, my_uid};
use tonic::Streaming;

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

fn set(version: &str, extra: Vec<PolicyObject>) -> PolicySet {
    let mut objects = vec![
        object("AuthorizationPolicy", "bank", "bank-all", "{}"),
        object(
            "AuthorizationPolicy",
            "istio-system",
            "mesh-deny",
            r#"{"action":"DENY"}"#,
        ),
        object(
            "AuthorizationPolicy",
            "shop",
            "cart-only",
            r#"{"selector":{"matchLabels":{"app":"cart"}}}"#,
        ),
        object("AuthorizationPolicy", "shop", "shop-all", "{}"),
    ];
    objects.extend(extra);
    PolicySet {
        version: version.into(),
        objects,
    }
}

fn names(msg: &WorkloadPolicies) -> Vec<&str> {
    msg.objects.iter().map(|o| o.name.as_str()).collect()
}

async fn next(stream: &mut Streaming<WorkloadPolicies>) -> WorkloadPolicies {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("no policy message within 5 s")
        .unwrap()
        .expect("the stream ended")
}

async fn open(h: &Harness) -> Streaming<WorkloadPolicies> {
    h.policies()
        .await
        .watch_workload_policies(WorkloadPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn caller_gets_only_the_policies_that_apply_to_it_with_its_identity_and_labels() {
    let h = Harness::start().await;
    h.set_policies(&set("v1", vec![]));
    let mut stream = open(&h).await;
    let msg = next(&mut stream).await;
    assert_eq!(msg.version, "v1");
    assert_eq!(msg.spiffe_id, WEB);
    assert_eq!(msg.namespace, "shop");
    assert_eq!(msg.labels.get("app").map(String::as_str), Some("web"));
    // Its namespace's unselected policy and the mesh-wide one; not cart-only (selector does
    // not match), not bank-all (another namespace).
    assert_eq!(names(&msg), ["mesh-deny", "shop-all"]);
    h.stop().await;
}

#[tokio::test]
async fn a_new_policy_set_is_pushed_to_open_streams() {
    let h = Harness::start().await;
    // No set yet: the stream waits for the first one.
    let mut stream = open(&h).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err(),
        "a message was sent before the agent had a policy set"
    );
    h.set_policies(&set("v1", vec![]));
    assert_eq!(next(&mut stream).await.version, "v1");
    h.set_policies(&set(
        "v2",
        vec![object(
            "PeerAuthentication",
            "shop",
            "shop-strict",
            r#"{"mtls":{"mode":"STRICT"}}"#,
        )],
    ));
    let pushed = next(&mut stream).await;
    assert_eq!(pushed.version, "v2");
    assert_eq!(names(&pushed), ["mesh-deny", "shop-all", "shop-strict"]);
    h.stop().await;
}

#[tokio::test]
async fn new_labels_after_an_entries_reload_are_pushed() {
    let h = Harness::start().await;
    h.set_policies(&set("v1", vec![]));
    let mut stream = open(&h).await;
    assert_eq!(names(&next(&mut stream).await), ["mesh-deny", "shop-all"]);
    h.set_entries(&format!(
        "entries:\n  - spiffe_id: {WEB}\n    uid: {}\n    labels: {{app: cart}}\n",
        my_uid()
    ));
    let pushed = next(&mut stream).await;
    assert_eq!(pushed.labels.get("app").map(String::as_str), Some("cart"));
    assert_eq!(names(&pushed), ["mesh-deny", "cart-only", "shop-all"]);
    h.stop().await;
}

#[tokio::test]
async fn unattested_caller_is_refused_on_the_policy_stream() {
    let h = Harness::start_with(Options {
        entries: Some(
            "entries:\n  - spiffe_id: spiffe://cluster.local/ns/x/sa/y\n    uid: 4242424\n".into(),
        ),
        ..Options::default()
    })
    .await;
    h.set_policies(&set("v1", vec![]));
    let err = h
        .policies()
        .await
        .watch_workload_policies(WorkloadPoliciesRequest {})
        .await
        .expect_err("a caller without an entry must be refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    h.stop().await;
}

#[tokio::test]
async fn removing_the_entry_ends_the_policy_stream() {
    let h = Harness::start().await;
    h.set_policies(&set("v1", vec![]));
    let mut stream = open(&h).await;
    next(&mut stream).await;
    h.set_entries(&format!(
        "entries:\n  - spiffe_id: {WEB}\n    uid: 4242424\n"
    ));
    let err = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    h.stop().await;
}

#[tokio::test]
async fn policy_client_that_never_reads_does_not_hold_up_shutdown() {
    let h = Harness::start().await;
    h.set_policies(&set("v1", vec![]));
    let _stream = open(&h).await;
    // Many changes the client never reads: the agent keeps at most one message for it.
    for i in 0..200 {
        h.set_policies(&set(&format!("v{i}"), vec![]));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // `stop` fails the test if the open stream holds up graceful shutdown.
    h.stop().await;
}
