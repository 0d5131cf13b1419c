//! Objects and tokens shaped as the real cluster makes them, for tests to
//! put into the fake API server.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::token_review::TokenInfo;

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A random UID in the API server's format.
pub fn uid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A pod `ns/name` of service account `sa` scheduled on `node`, in `phase`
/// (`Running`, `Pending`, `Succeeded`, …), with a random UID and one container
/// (`containerd://<64 hex>`).
pub fn pod(ns: &str, name: &str, sa: &str, node: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": uid(),
            "labels": {"app": name},
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": "example.com/app:1"}],
        },
        "status": {
            "phase": phase,
            "podIP": "10.0.0.1",
            "podIPs": [{"ip": "10.0.0.1"}],
            "containerStatuses": [{
                "name": "app",
                "ready": true,
                "restartCount": 0,
                "image": "example.com/app:1",
                "imageID": "",
                "containerID": format!("containerd://{}", random_hex(32)),
            }],
        },
    })
}

/// A namespace.
pub fn namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// A projected service-account token and what the API server knows of it.
#[derive(Debug, Clone)]
pub struct ServiceAccountToken {
    /// The token (JWT-shaped; its signature is not real: only the fake's TokenReview can
    /// tell it is valid).
    pub token: String,
    /// What TokenReview answers for it.
    pub info: TokenInfo,
}

/// A pod-bound service-account token for `ns/sa`, audiences `aud`, expiring at `exp`
/// (Unix seconds): `pod` is `(name, uid)`, `node` the node name (both land in the claims
/// and in TokenReview's `extra`, as from Kubernetes 1.30).
pub fn service_account_token(
    ns: &str,
    sa: &str,
    pod: Option<(&str, &str)>,
    node: Option<&str>,
    aud: &[&str],
    exp: i64,
) -> ServiceAccountToken {
    let sa_uid = uid();
    let jti = uid();
    let now = crate::unix_now();
    let mut k8s = json!({
        "namespace": ns,
        "serviceaccount": {"name": sa, "uid": sa_uid},
    });
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some((name, pod_uid)) = pod {
        k8s["pod"] = json!({"name": name, "uid": pod_uid});
        extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            vec![name.into()],
        );
        extra.insert(
            "authentication.kubernetes.io/pod-uid".into(),
            vec![pod_uid.into()],
        );
    }
    if let Some(node) = node {
        let node_uid = uid();
        k8s["node"] = json!({"name": node, "uid": node_uid});
        extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            vec![node.into()],
        );
        extra.insert(
            "authentication.kubernetes.io/node-uid".into(),
            vec![node_uid],
        );
    }
    extra.insert(
        "authentication.kubernetes.io/credential-id".into(),
        vec![format!("JTI={jti}")],
    );
    let username = format!("system:serviceaccount:{ns}:{sa}");
    let claims = json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": username,
        "aud": aud,
        "exp": exp,
        "iat": now,
        "nbf": now,
        "jti": jti,
        "kubernetes.io": k8s,
    });
    let header = json!({"alg": "RS256", "kid": "fake-kube-not-a-real-key"});
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap_or_default());
    let token = format!(
        "{}.{}.{}",
        enc(&header),
        enc(&claims),
        URL_SAFE_NO_PAD.encode(random_hex(32))
    );
    ServiceAccountToken {
        token,
        info: TokenInfo {
            username,
            uid: sa_uid,
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            extra,
            audiences: aud.iter().map(|s| (*s).to_owned()).collect(),
        },
    }
}
