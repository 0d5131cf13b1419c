//! End-user authentication on `http` ports (Istio RequestAuthentication), before
//! authorization, as Envoy's `jwt_authn` filter runs before RBAC:
//!
//! - the token is looked for where the applicable rules say (default
//!   `Authorization: Bearer …`, then `?access_token=…`);
//! - a present but invalid token ends the request: 401 (403 for an audience
//!   mismatch) with Envoy's words as the body and a `www-authenticate` header;
//! - no token: the request goes on without a request principal;
//! - a valid token: the request carries `<iss>/<sub>` and its claims into
//!   AuthorizationPolicy; once allowed, the token is removed (unless
//!   `forwardOriginalToken`) and `outputPayloadToHeader`/`outputClaimToHeaders` set.
//!
//! The headers a rule writes are always removed from what the client sent, so a client
//! cannot pose as a verified user by sending them itself.
//!
//! The decision is [`citadel_policy::authenticate`] (pure, shared with `citadel policy
//! check`); this module only reads the request and edits it.

use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{StatusCode, Uri};

use citadel_policy::{AuthnOutcome, OwnedJwt, TokenLocation, authenticate};

use crate::decide::PolicyState;

/// A request that may go on to authorization.
#[derive(Debug, Default)]
pub struct Passed {
    /// The verified token as AuthorizationPolicy sees it.
    pub jwt: Option<OwnedJwt>,
    remove_headers: Vec<HeaderName>,
    remove_param: Option<String>,
    remove_cookie: Option<String>,
    set_headers: Vec<(HeaderName, HeaderValue)>,
}

/// A request refused by request authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// 401, or 403 for an audience mismatch.
    pub status: StatusCode,
    /// Envoy's words, e.g. `Jwt is expired`.
    pub body: String,
    /// Where the rule that refused it comes from is not known for every error, so
    /// only the realm and error go into `www-authenticate`.
    pub www_authenticate: Option<HeaderValue>,
}

fn header_token<'r>(parts: &'r Parts, loc: &TokenLocation) -> Option<&'r str> {
    let TokenLocation::Header { name, .. } = loc else {
        return None;
    };
    parts
        .headers
        .get_all(name.as_str())
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| loc.token_in_header_value(v))
}

fn param_token<'r>(uri: &'r Uri, name: &str) -> Option<&'r str> {
    uri.query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v)
}

fn cookie_token<'r>(parts: &'r Parts, name: &str) -> Option<&'r str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v)
}

/// Runs request authentication for one request of the workload `state` describes,
/// at `now` (Unix seconds).
pub fn authenticate_request(
    state: &PolicyState,
    parts: &Parts,
    now: i64,
) -> Result<Passed, Refused> {
    let providers = state.with_workload(|w| state.set.jwt_providers(w));
    let find = |loc: &TokenLocation| match loc {
        TokenLocation::Header { .. } => header_token(parts, loc),
        TokenLocation::Param(name) => param_token(&parts.uri, name),
        TokenLocation::Cookie(name) => cookie_token(parts, name),
    };
    let mut passed = Passed::default();
    // Headers that only a verified token may set.
    for p in &providers {
        let written = p
            .output_payload_to_header
            .iter()
            .chain(p.output_claim_to_headers.iter().map(|(h, _)| h));
        for h in written {
            if let Ok(name) = HeaderName::from_bytes(h.as_bytes()) {
                passed.remove_headers.push(name);
            }
        }
    }
    match authenticate(&providers, find, now) {
        AuthnOutcome::NoPolicy | AuthnOutcome::Anonymous => Ok(passed),
        AuthnOutcome::Rejected(r) => {
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::UNAUTHORIZED);
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| parts.uri.authority().map(|a| a.as_str()))
                .unwrap_or_default();
            let realm = format!("http://{host}{}", parts.uri.path()).replace('"', "");
            Err(Refused {
                status,
                body: r.error.to_string(),
                www_authenticate: (status == StatusCode::UNAUTHORIZED)
                    .then(|| {
                        HeaderValue::from_str(&format!(
                            "Bearer realm=\"{realm}\", error=\"invalid_token\""
                        ))
                        .ok()
                    })
                    .flatten(),
            })
        }
        AuthnOutcome::Verified(v) => {
            let p = v.provider;
            if !p.forward_original_token {
                match &v.location {
                    TokenLocation::Header { name, .. } => {
                        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                            passed.remove_headers.push(n);
                        }
                    }
                    TokenLocation::Param(name) => passed.remove_param = Some(name.clone()),
                    TokenLocation::Cookie(name) => passed.remove_cookie = Some(name.clone()),
                }
            }
            if let Some(h) = &p.output_payload_to_header
                && let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(h.as_bytes()),
                    HeaderValue::from_str(v.jwt.payload_b64()),
                )
            {
                passed.set_headers.push((name, value));
            }
            for (h, claim) in &p.output_claim_to_headers {
                if let Some(value) = citadel_policy::authn::claim_header_value(&v.jwt, claim)
                    && let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(h.as_bytes()),
                        HeaderValue::from_str(&value),
                    )
                {
                    passed.set_headers.push((name, value));
                }
            }
            passed.jwt = Some(OwnedJwt::from_verified(&v.jwt));
            Ok(passed)
        }
    }
}

impl Passed {
    /// Edits the request for the application: removes the token and the headers only a
    /// verified token may set, then sets those this token gives.
    pub fn apply(&self, parts: &mut Parts) {
        for h in &self.remove_headers {
            parts.headers.remove(h);
        }
        if let Some(name) = &self.remove_param
            && let Some(q) = parts.uri.query()
        {
            let kept: Vec<&str> = q
                .split('&')
                .filter(|kv| kv.split_once('=').map_or(*kv, |(k, _)| k) != name)
                .collect();
            let pq = if kept.is_empty() {
                parts.uri.path().to_owned()
            } else {
                format!("{}?{}", parts.uri.path(), kept.join("&"))
            };
            let mut up = parts.uri.clone().into_parts();
            if let Ok(pq) = pq.parse() {
                up.path_and_query = Some(pq);
                if let Ok(uri) = Uri::from_parts(up) {
                    parts.uri = uri;
                }
            }
        }
        if let Some(name) = &self.remove_cookie {
            let cookies: Vec<String> = parts
                .headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .map(str::trim)
                .filter(|c| !c.is_empty() && c.split_once('=').map_or(*c, |(k, _)| k) != name)
                .map(str::to_owned)
                .collect();
            parts.headers.remove(header::COOKIE);
            if !cookies.is_empty()
                && let Ok(v) = HeaderValue::from_str(&cookies.join("; "))
            {
                parts.headers.insert(header::COOKIE, v);
            }
        }
        for (name, value) in &self.set_headers {
            parts.headers.insert(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_policy::citadel_jwt::testing::{TestSigner, jwks};
    use citadel_policy::{Loader, MeshConfig};
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn state(signer: &TestSigner, rule_extra: &str) -> PolicyState {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: shop}}\nspec:\n  jwtRules:\n  - issuer: https://idp.example\n    jwks: '{}'\n{rule_extra}",
            jwks(&[signer])
        );
        let mut loader = Loader::new(MeshConfig::default());
        loader.add_source("r.yaml", &text);
        let (set, _) = loader
            .finish()
            .unwrap_or_else(|e| panic!("{:#?}", e.diagnostics));
        PolicyState {
            version: "v".into(),
            spiffe_id: "spiffe://cluster.local/ns/shop/sa/api".into(),
            namespace: "shop".into(),
            labels: Vec::new(),
            set,
        }
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn token(s: &TestSigner) -> String {
        s.sign(
            "ES256",
            &json!({"iss": "https://idp.example", "sub": "alice", "exp": NOW + 60, "tier": "gold"}),
        )
    }

    #[test]
    fn the_token_is_stripped_and_spoofed_output_headers_are_replaced() {
        let s = TestSigner::es256("k");
        let st = state(
            &s,
            "    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders: [{header: x-tier, claim: tier}]\n",
        );
        let t = token(&s);
        let auth = format!("Bearer {t}");
        let mut p = parts(
            "/a?x=1",
            &[
                ("authorization", &auth),
                ("x-tier", "platinum"),
                ("x-jwt-payload", "forged"),
            ],
        );
        let passed = authenticate_request(&st, &p, NOW).unwrap();
        assert_eq!(
            passed.jwt.as_ref().unwrap().principal,
            "https://idp.example/alice"
        );
        passed.apply(&mut p);
        assert!(p.headers.get("authorization").is_none());
        assert_eq!(p.headers["x-tier"], "gold");
        assert_eq!(p.headers["x-jwt-payload"], t.split('.').nth(1).unwrap());
        // Without a token the spoofed headers are removed too.
        let mut p = parts("/a", &[("x-tier", "platinum")]);
        let passed = authenticate_request(&st, &p, NOW).unwrap();
        assert!(passed.jwt.is_none());
        passed.apply(&mut p);
        assert!(p.headers.get("x-tier").is_none());
    }

    #[test]
    fn forward_original_token_keeps_it_and_params_and_cookies_are_read() {
        let s = TestSigner::es256("k");
        let st = state(&s, "    forwardOriginalToken: true\n");
        let t = token(&s);
        let auth = format!("Bearer {t}");
        let mut p = parts("/", &[("authorization", &auth)]);
        authenticate_request(&st, &p, NOW).unwrap().apply(&mut p);
        assert!(p.headers.get("authorization").is_some());

        let st = state(&s, "    fromParams: [tok]\n    fromCookies: [session]\n");
        let mut p = parts(&format!("/x?a=1&tok={t}&b=2"), &[]);
        let passed = authenticate_request(&st, &p, NOW).unwrap();
        assert!(passed.jwt.is_some());
        passed.apply(&mut p);
        assert_eq!(p.uri.to_string(), "/x?a=1&b=2");
        let cookie = format!("theme=dark; session={t}");
        let mut p = parts("/", &[("cookie", &cookie)]);
        let passed = authenticate_request(&st, &p, NOW).unwrap();
        assert!(passed.jwt.is_some());
        passed.apply(&mut p);
        assert_eq!(p.headers["cookie"], "theme=dark");
    }

    #[test]
    fn rejects_an_invalid_token_with_401_envoys_words_and_www_authenticate() {
        let s = TestSigner::es256("k");
        let st = state(&s, "");
        let p = parts(
            "/orders?id=1",
            &[
                ("host", "shop.example"),
                ("authorization", "Bearer not.a.jwt!"),
            ],
        );
        let r = authenticate_request(&st, &p, NOW).unwrap_err();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.body, "Jwt header is an invalid Base64url encoded");
        assert_eq!(
            r.www_authenticate.unwrap(),
            "Bearer realm=\"http://shop.example/orders\", error=\"invalid_token\""
        );
    }
}
