//! `citadel policy validate` and `citadel policy check`, run as the real binary on
//! the fixture directories under tests/fixtures/policy/.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixtures(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/policy")
        .join(sub)
}

fn citadel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_citadel"))
        .args(args)
        .env_remove("CITADEL_ROOT_NAMESPACE")
        .output()
        .expect("run citadel")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn valid() -> String {
    fixtures("valid").display().to_string()
}

#[test]
fn validate_accepts_a_valid_directory_recursively() {
    let out = citadel(&["policy", "validate", &valid()]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    // mesh.yaml (2) + shop/cart.yaml (1; the Service is skipped) + shop/legacy.json (1)
    assert!(
        text(&out.stdout).contains("ok: 4 policies in 3 file(s)"),
        "stdout: {}",
        text(&out.stdout)
    );
    // The Service next to the policy is reported as skipped, not silently dropped.
    assert!(text(&out.stderr).contains("\"Service\" is not a policy kind; skipped"));
}

#[test]
fn validate_lists_every_error_with_its_field_and_exits_1() {
    let out = citadel(&[
        "policy",
        "validate",
        &fixtures("invalid").display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1), "stdout: {}", text(&out.stdout));
    let err = text(&out.stderr);
    for expected in [
        "AuthorizationPolicy shop/typo: spec.rules[0].from[0].source.principalz: unknown field",
        "PeerAuthentication shop/ports-without-selector: spec.portLevelMtls: portLevelMtls requires a workload selector",
        "AuthorizationPolicy shop/many-mistakes: spec.targetRefs: cannot be set together with selector",
        "spec.rules[0].from[0].source.serviceAccounts: cannot be set together with principals or namespaces",
        "spec.rules[0].to[0].operation.ports[0]: port \"70000\" out of range",
        "spec.rules[0].when[0]: at least one of values or notValues must be set",
        "spec.rules[0].when[1].key: unknown key \"source.user\"",
        "AuthorizationPolicy shop/ext-authz: spec.provider: CUSTOM action requires provider.name",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(err.contains("8 error(s)"), "{err}");
}

#[test]
fn check_http_request_reports_mode_decision_policy_and_rule_as_json() {
    let out = citadel(&[
        "policy",
        "check",
        "--policies",
        &valid(),
        "--from",
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "--to-namespace",
        "shop",
        "--to-labels",
        "app=cart,version=v1",
        "--port",
        "8080",
        "--method",
        "POST",
        "--path",
        "/cart/items",
        "--host",
        "cart.shop",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(v["decision"], "ALLOW");
    assert_eq!(v["mtls"]["mode"], "STRICT");
    assert_eq!(v["mtls"]["policy"], "istio-system/default");
    assert_eq!(v["authorization"]["policy"], "shop/cart");
    assert_eq!(v["authorization"]["rule"], 0);
}

#[test]
fn check_without_http_flags_is_tcp_and_http_rules_fail_closed() {
    let out = citadel(&[
        "policy",
        "check",
        "--policies",
        &valid(),
        "--from",
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "--to-namespace",
        "shop",
        "--to-labels",
        "app=cart",
        "--port",
        "8080",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("TCP connection"), "{s}");
    assert!(
        s.contains("authorization: DENY (no ALLOW policy matched)"),
        "{s}"
    );
    assert!(s.contains("1 ALLOW rule(s) skipped"), "{s}");
    assert!(s.contains("decision:      DENY"), "{s}");
}

#[test]
fn check_tcp_rule_names_the_second_rule() {
    let out = citadel(&[
        "policy",
        "check",
        "--policies",
        &valid(),
        "--from",
        "spiffe://cluster.local/ns/ops/sa/prometheus",
        "--to-namespace",
        "shop",
        "--to-labels",
        "app=cart",
        "--port",
        "9090",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"], "ALLOW");
    assert_eq!(v["authorization"]["policy"], "shop/cart");
    assert_eq!(v["authorization"]["rule"], 1);
}

#[test]
fn check_plaintext_peer_is_refused_under_strict() {
    let out = citadel(&[
        "policy",
        "check",
        "--policies",
        &valid(),
        "--to-namespace",
        "shop",
        "--to-labels",
        "app=web",
        "--port",
        "80",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("refused: STRICT requires mutual TLS"), "{s}");
    assert!(
        s.contains("denied by DENY policy istio-system/deny-plaintext rule 0"),
        "{s}"
    );
    assert!(s.contains("decision:      DENY"), "{s}");
}

#[test]
fn check_port_level_mode_is_reported() {
    let out = citadel(&[
        "policy",
        "check",
        "--policies",
        &valid(),
        "--from",
        "spiffe://cluster.local/ns/shop/sa/frontend",
        "--to-namespace",
        "shop",
        "--to-labels",
        "app=legacy",
        "--port",
        "8080",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mtls"]["mode"], "PERMISSIVE");
    assert_eq!(v["mtls"]["scope"], "port");
    assert_eq!(v["mtls"]["policy"], "shop/legacy");
}

#[test]
fn check_rejects_a_malformed_spiffe_id() {
    let out = citadel(&[
        "policy",
        "check",
        "--policies",
        &valid(),
        "--from",
        "cluster.local/ns/shop/sa/frontend",
        "--to-namespace",
        "shop",
        "--port",
        "80",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is not a workload SPIFFE ID"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn check_refuses_invalid_policies() {
    let out = citadel(&[
        "policy",
        "check",
        "--policies",
        &fixtures("invalid").display().to_string(),
        "--to-namespace",
        "shop",
        "--port",
        "80",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("the policies are invalid"));
}
