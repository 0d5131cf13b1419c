//! `citadel policy check` answers "would this user's request get through?": with
//! `--jwt` the token is judged by the RequestAuthentications in the files (the same
//! code the proxy runs), with `--request-principal`/`--claim` the identity is given.

use citadel_e2e::process::citadel;
use citadel_jwt::testing::{TestSigner, jwks};
use serde_json::json;

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn run(dir: &std::path::Path, extra: &[&str]) -> String {
    let policies = dir.display().to_string();
    let mut args = vec![
        "policy",
        "check",
        "--policies",
        policies.as_str(),
        "--to-namespace",
        "shop",
        "--to-labels",
        "app=cart",
        "--port",
        "8080",
    ];
    args.extend_from_slice(extra);
    let out = citadel(&args).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn policy_check_judges_a_jwt_like_the_proxy() {
    let signer = TestSigner::es256("k1");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("jwt.yaml"),
        format!(
            "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: cart-jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: cart}}}}
  jwtRules:
  - issuer: https://idp.example
    jwks: '{}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-alice, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: cart}}}}
  rules:
  - from: [{{source: {{requestPrincipals: [https://idp.example/alice]}}}}]
    when: [{{key: \"request.auth.claims[groups]\", values: [buyers]}}]
",
            jwks(&[&signer])
        ),
    )
    .unwrap();
    let now = unix_now();
    let token = |sub: &str, exp: i64| {
        signer.sign(
            "ES256",
            &json!({"iss": "https://idp.example", "sub": sub, "exp": exp, "groups": ["buyers"]}),
        )
    };

    let out = run(dir.path(), &["--jwt", &token("alice", now + 600)]);
    assert!(
        out.contains("request auth:  verified by shop/cart-jwt jwtRules[0]: principal https://idp.example/alice"),
        "{out}"
    );
    assert!(out.contains("decision:      ALLOW"), "{out}");

    let out = run(dir.path(), &["--jwt", &token("bob", now + 600)]);
    assert!(out.contains("decision:      DENY"), "{out}");

    let out = run(dir.path(), &["--jwt", &token("alice", now - 3600)]);
    assert!(
        out.contains("request auth:  401 Jwt is expired (refused before authorization)"),
        "{out}"
    );
    assert!(out.contains("decision:      DENY"), "{out}");

    let out = run(
        dir.path(),
        &["--jwt", &token("alice", now - 3600), "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["request_authentication"]["error"], "Jwt is expired");
    assert_eq!(v["request_authentication"]["status"], 401);

    // The identity and claims stated directly.
    let out = run(
        dir.path(),
        &[
            "--request-principal",
            "https://idp.example/alice",
            "--claim",
            "groups=buyers",
        ],
    );
    assert!(out.contains("decision:      ALLOW"), "{out}");
    let out = run(
        dir.path(),
        &[
            "--request-principal",
            "https://idp.example/alice",
            "--claim",
            "groups=sellers",
        ],
    );
    assert!(out.contains("decision:      DENY"), "{out}");
}
