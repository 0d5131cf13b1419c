//! RequestAuthentication: validation of `jwtRules`, which rules apply to a workload,
//! and the pure decision on a request's tokens (Envoy's outcomes and words).

use citadel_jwt::testing::{TestSigner, alg_none, hs256, jwks};
use citadel_policy::{
    AuthnOutcome, Loader, MeshConfig, PolicySet, TokenLocation, Workload, authenticate,
};
use serde_json::json;

const NOW: i64 = 1_800_000_000;

fn errors(text: &str) -> Vec<String> {
    let mut loader = Loader::new(MeshConfig::default());
    loader.add_source("ra.yaml", text);
    loader
        .diagnostics()
        .iter()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect()
}

fn ra(rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: shop}}\nspec:\n  jwtRules:\n{rules}"
    )
}

fn assert_error(text: &str, expected: &str) {
    let errs = errors(text);
    assert!(
        errs.iter().any(|e| e.contains(expected)),
        "no error contains {expected:?}: {errs:#?}"
    );
}

#[test]
fn rejects_unknown_fields_in_jwt_rules() {
    assert_error(
        &ra("  - issuer: a\n    jwksUri: https://a/k\n    audience: [x]\n"),
        "spec.jwtRules[0].audience: unknown field",
    );
    assert_error(
        &ra("  - issuer: a\n    jwksUri: https://a/k\n    fromHeaders: [{name: x, prefx: y}]\n"),
        "spec.jwtRules[0].fromHeaders[0].prefx: unknown field",
    );
}

#[test]
fn rejects_unsupported_and_malformed_jwt_rule_values() {
    assert_error(
        &ra("  - audiences: [x]\n"),
        "spec.jwtRules[0].issuer: issuer or jwksUri must be set",
    );
    assert_error(
        &ra("  - issuer: a\n    jwksUri: http://a/k\n"),
        "spec.jwtRules[0].jwksUri: \"http://a/k\" is not supported",
    );
    assert_error(
        &ra("  - issuer: a\n    jwks: '{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}]}'\n"),
        "spec.jwtRules[0].jwks: unusable key set: Jwks doesn't have any valid public key",
    );
    assert_error(
        &ra("  - issuer: a\n    jwksUri: https://a/k\n    fromHeaders: [{name: \"bad header\"}]\n"),
        "spec.jwtRules[0].fromHeaders[0].name",
    );
    assert_error(
        &ra(
            "  - issuer: a\n    jwksUri: https://a/k\n    outputClaimToHeaders: [{header: x-sub}]\n",
        ),
        "spec.jwtRules[0].outputClaimToHeaders[0].claim: missing",
    );
    assert_error(
        &ra("  - issuer: a\n    jwksUri: https://a/k\n    timeout: 5 minutes\n"),
        "spec.jwtRules[0].timeout",
    );
    assert_error(
        &ra("  - issuer: a\n    jwksUri: https://a/k\n    spaceDelimitedClaims: [scope]\n"),
        "spec.jwtRules[0].spaceDelimitedClaims: unsupported",
    );
    assert_error(
        &ra("  - issuer: a\n    jwksUri: https://a/k\n    fromParams: [\"\"]\n"),
        "spec.jwtRules[0].fromParams[0]: empty value not allowed",
    );
}

struct Fixture {
    signer: TestSigner,
    set: PolicySet,
}

const ISS: &str = "https://idp.example";

fn fixture(extra_rule: &str) -> Fixture {
    let signer = TestSigner::es256("k1");
    let keys = jwks(&[&signer]);
    let text = format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: cart-jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: cart}}}}
  jwtRules:
  - issuer: "{ISS}"
    audiences: [shop]
    jwksUri: https://idp.example/jwks.json
{extra_rule}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: other-ns, namespace: bank}}
spec:
  jwtRules:
  - issuer: "https://bank.example"
    jwks: '{keys}'
"#
    );
    let mut loader = Loader::new(MeshConfig::default());
    loader.add_source("ra.yaml", &text);
    loader.add_remote_jwks("https://idp.example/jwks.json", &keys);
    let (set, _) = loader
        .finish()
        .unwrap_or_else(|e| panic!("{:#?}", e.diagnostics));
    Fixture { signer, set }
}

fn cart() -> Workload<'static> {
    Workload {
        namespace: "shop",
        labels: &[("app", "cart")],
    }
}

fn bearer<'t>(token: &'t str) -> impl FnMut(&TokenLocation) -> Option<&'t str> {
    move |loc: &TokenLocation| match loc {
        TokenLocation::Header { name, .. } if name == "authorization" => Some(token),
        _ => None,
    }
}

fn outcome(f: &Fixture, token: Option<&str>) -> Result<Option<String>, (u16, String)> {
    let providers = f.set.jwt_providers(&cart());
    let find = |loc: &TokenLocation| match (loc, token) {
        (TokenLocation::Header { name, .. }, Some(t)) if name == "authorization" => Some(t),
        _ => None,
    };
    match authenticate(&providers, find, NOW) {
        AuthnOutcome::NoPolicy => Ok(Some("<no policy>".into())),
        AuthnOutcome::Anonymous => Ok(None),
        AuthnOutcome::Verified(v) => Ok(Some(v.jwt.principal())),
        AuthnOutcome::Rejected(r) => Err((r.status, r.error.to_string())),
    }
}

fn claims() -> serde_json::Value {
    json!({"iss": ISS, "sub": "alice", "aud": "shop", "exp": NOW + 60})
}

#[test]
fn rules_apply_by_namespace_and_selector() {
    let f = fixture("");
    assert_eq!(f.set.jwt_providers(&cart()).len(), 1);
    let web = Workload {
        namespace: "shop",
        labels: &[("app", "web")],
    };
    assert!(f.set.jwt_providers(&web).is_empty());
    let bank = Workload {
        namespace: "bank",
        labels: &[],
    };
    assert_eq!(f.set.jwt_providers(&bank).len(), 1);
    let providers = f.set.jwt_providers(&web);
    assert!(matches!(
        authenticate(&providers, bearer("x"), NOW),
        AuthnOutcome::NoPolicy
    ));
}

#[test]
fn a_valid_token_gives_the_principal_and_no_token_gives_none() {
    let f = fixture("");
    let t = f.signer.sign("ES256", &claims());
    assert_eq!(
        outcome(&f, Some(&t)),
        Ok(Some("https://idp.example/alice".into()))
    );
    assert_eq!(outcome(&f, None), Ok(None));
}

#[test]
fn rejects_invalid_tokens_with_envoys_status_and_words() {
    let f = fixture("");
    let sign = |c: serde_json::Value| f.signer.sign("ES256", &c);
    let mut expired = claims();
    expired["exp"] = json!(NOW - 3600);
    assert_eq!(
        outcome(&f, Some(&sign(expired))),
        Err((401, "Jwt is expired".into()))
    );
    let mut wrong_iss = claims();
    wrong_iss["iss"] = json!("https://evil.example");
    assert_eq!(
        outcome(&f, Some(&sign(wrong_iss))),
        Err((401, "Jwt issuer is not configured".into()))
    );
    let mut wrong_aud = claims();
    wrong_aud["aud"] = json!("bank");
    assert_eq!(
        outcome(&f, Some(&sign(wrong_aud))),
        Err((403, "Audiences in Jwt are not allowed".into()))
    );
    let other = TestSigner::es256("k2");
    assert_eq!(
        outcome(&f, Some(&other.sign("ES256", &claims()))),
        Err((
            401,
            "Jwks doesn't have key to match kid or alg from Jwt".into()
        ))
    );
    assert_eq!(
        outcome(&f, Some(&alg_none(&claims()))),
        Err((401, "Jwt header [alg] is not supported".into()))
    );
    let forged = hs256(&f.signer.public_key_bytes(), "k1", &claims());
    assert_eq!(
        outcome(&f, Some(&forged)),
        Err((
            401,
            "Jwks doesn't have key to match kid or alg from Jwt".into()
        ))
    );
    assert_eq!(
        outcome(&f, Some("garbage")),
        Err((
            401,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
                .into()
        ))
    );
}

#[test]
fn rejects_every_token_when_the_remote_keys_are_missing() {
    let signer = TestSigner::es256("k1");
    let text = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: shop}}\nspec:\n  jwtRules:\n  - issuer: \"{ISS}\"\n    jwksUri: https://idp.example/jwks.json\n"
    );
    let mut loader = Loader::new(MeshConfig::default());
    loader.add_source("ra.yaml", &text);
    let (set, _) = loader.finish().unwrap();
    let providers = set.jwt_providers(&cart());
    let t = signer.sign("ES256", &claims());
    assert!(matches!(
        authenticate(&providers, bearer(&t), NOW),
        AuthnOutcome::Rejected(r) if r.status == 401
    ));
}

#[test]
fn a_second_issuer_rule_accepts_its_own_tokens() {
    let other = TestSigner::es256("o1");
    let keys = jwks(&[&other]);
    let f = fixture(&format!(
        "  - issuer: https://other.example\n    jwks: '{keys}'\n    fromHeaders: [{{name: x-token}}]\n"
    ));
    let t = other.sign(
        "ES256",
        &json!({"iss": "https://other.example", "sub": "svc"}),
    );
    let providers = f.set.jwt_providers(&cart());
    let find = |loc: &TokenLocation| match loc {
        TokenLocation::Header { name, .. } if name == "x-token" => Some(t.as_str()),
        _ => None,
    };
    match authenticate(&providers, find, NOW) {
        AuthnOutcome::Verified(v) => {
            assert_eq!(v.jwt.principal(), "https://other.example/svc");
            assert_eq!(v.provider.source, "shop/cart-jwt jwtRules[1]");
        }
        other => panic!("{other:?}"),
    }
    // The same token in the default location is not this rule's: its issuer is
    // unknown to the rule that reads Authorization.
    assert_eq!(
        outcome(&f, Some(&t)),
        Err((401, "Jwt issuer is not configured".into()))
    );
}

#[test]
fn header_prefixes_are_matched_as_envoy_does() {
    let loc = &TokenLocation::defaults()[0];
    assert_eq!(
        loc.token_in_header_value("Bearer abc.def.ghi"),
        Some("abc.def.ghi")
    );
    assert_eq!(loc.token_in_header_value("Basic abc"), None);
    assert_eq!(loc.token_in_header_value("Bearer "), None);
    assert_eq!(loc.token_in_header_value("Bearer a.b.c, x"), Some("a.b.c"));
}

#[test]
fn verified_claims_are_flattened_for_authorization() {
    let f = fixture("");
    let mut c = claims();
    c["groups"] = json!(["dev", "ops"]);
    c["realm_access"] = json!({"roles": ["admin"], "level": 3});
    c["azp"] = json!("web");
    c["a][b"] = json!("spoof");
    let t = f.signer.sign("ES256", &c);
    let providers = f.set.jwt_providers(&cart());
    let AuthnOutcome::Verified(v) = authenticate(&providers, bearer(&t), NOW) else {
        panic!("not verified");
    };
    let owned = citadel_policy::OwnedJwt::from_verified(&v.jwt);
    assert_eq!(owned.principal, "https://idp.example/alice");
    assert_eq!(owned.audiences, ["shop"]);
    assert_eq!(owned.presenter.as_deref(), Some("web"));
    let has = |k: &str, val: &str| owned.claims.iter().any(|(a, b)| a == k && b == val);
    assert!(has("groups", "dev") && has("groups", "ops"));
    assert!(has("realm_access][roles", "admin"));
    assert!(
        !owned.claims.iter().any(|(k, _)| k == "a][b"),
        "{:?}",
        owned.claims
    );
}
