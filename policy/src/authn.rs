//! RequestAuthentication: which JWT issuers a workload accepts, where their tokens are
//! found, and the pure decision on the tokens a request carries.
//!
//! Every RequestAuthentication that applies to a workload contributes its `jwtRules`
//! (they merge, as in Istio). Then, as Envoy's `jwt_authn` filter configured by Istio
//! decides:
//! - no token in any configured location: the request passes with no request principal
//!   (AuthorizationPolicy decides);
//! - a token verified by some rule: the request carries its principal `<iss>/<sub>` and
//!   claims;
//! - otherwise the request is refused, 401 (403 for an audience mismatch), with the
//!   reason in Envoy's words.

use std::collections::BTreeMap;

use citadel_jwt::{Jwks, Jwt, JwtError, Validation};

use crate::model::{JwtRule, RequestAuthentication};
use crate::request::OwnedJwt;

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocation {
    /// A header (lowercase name), the token after `prefix`.
    Header {
        /// Lowercase header name.
        name: String,
        /// Text before the token (may be empty).
        prefix: String,
    },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl TokenLocation {
    /// `Authorization: Bearer <token>` and `?access_token=<token>`: where Istio looks
    /// when a rule names no location.
    pub fn defaults() -> Vec<Self> {
        vec![
            Self::Header {
                name: "authorization".into(),
                prefix: "Bearer ".into(),
            },
            Self::Param("access_token".into()),
        ]
    }

    /// The token in a header value at this location (a header location only): the
    /// text after the prefix, up to the first character a JWT cannot contain.
    pub fn token_in_header_value<'v>(&self, value: &'v str) -> Option<&'v str> {
        let Self::Header { prefix, .. } = self else {
            return None;
        };
        // As Envoy: the prefix may be anywhere in the value, matched exactly.
        let rest = if prefix.is_empty() {
            value.trim_start()
        } else {
            let at = value.find(prefix.as_str())?;
            value.get(at + prefix.len()..)?
        };
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=')))
            .unwrap_or(rest.len());
        let token = &rest[..end];
        (!token.is_empty()).then_some(token)
    }
}

/// Where the CA fetches a rule's keys from, which is also the key under which
/// [`crate::Loader::add_remote_jwks`] expects the document: `jwksUri`, or, for a
/// rule with neither `jwks` nor `jwksUri`, the OIDC discovery document of an https
/// issuer (`<issuer>/.well-known/openid-configuration`). `None` for inline keys.
pub fn remote_jwks_key(rule: &JwtRule) -> Option<String> {
    if rule.jwks.is_some() {
        return None;
    }
    if let Some(uri) = rule.jwks_uri.as_deref().filter(|u| !u.is_empty()) {
        return Some(uri.to_owned());
    }
    let issuer = rule.issuer.as_deref()?.trim_end_matches('/');
    issuer
        .starts_with("https://")
        .then(|| format!("{issuer}/.well-known/openid-configuration"))
}

/// One `jwtRules[]` entry, compiled: its keys parsed once.
#[derive(Debug, Clone)]
pub struct JwtProvider {
    /// `namespace/name` of the RequestAuthentication and the rule index, for logs.
    pub source: String,
    /// Required `iss`; `None` = any.
    pub issuer: Option<String>,
    /// Accepted audiences; empty = any.
    pub audiences: Vec<String>,
    /// Where tokens are looked for.
    pub locations: Vec<TokenLocation>,
    /// The issuer's keys (inline `jwks`, or the CA's copy of `jwksUri`).
    pub keys: Jwks,
    /// Where the CA fetches the keys (see [`remote_jwks_key`]).
    pub jwks_uri: Option<String>,
    /// Header for the base64url payload.
    pub output_payload_to_header: Option<String>,
    /// `(header, claim)` pairs.
    pub output_claim_to_headers: Vec<(String, String)>,
    /// Keep the token for the application.
    pub forward_original_token: bool,
}

impl JwtProvider {
    pub(crate) fn compile(
        ra: &RequestAuthentication,
        index: usize,
        rule: &JwtRule,
        remote: &BTreeMap<String, String>,
    ) -> Self {
        let mut locations = Vec::new();
        for h in rule.from_headers.iter().flatten() {
            locations.push(TokenLocation::Header {
                name: h.name.clone().unwrap_or_default().to_ascii_lowercase(),
                prefix: h.prefix.clone().unwrap_or_default(),
            });
        }
        for p in rule.from_params.iter().flatten() {
            locations.push(TokenLocation::Param(p.clone()));
        }
        for c in rule.from_cookies.iter().flatten() {
            locations.push(TokenLocation::Cookie(c.clone()));
        }
        if locations.is_empty() {
            locations = TokenLocation::defaults();
        }
        // Validation already refused an inline JWKS without usable keys; a missing
        // remote document leaves the rule keyless (every token of it fails).
        let keys = rule
            .jwks
            .as_deref()
            .or_else(|| {
                remote_jwks_key(rule)
                    .and_then(|k| remote.get(&k))
                    .map(String::as_str)
            })
            .and_then(|j| Jwks::parse(j).ok())
            .unwrap_or_default();
        Self {
            source: format!(
                "{}/{} jwtRules[{index}]",
                ra.metadata.namespace(),
                ra.metadata.name()
            ),
            issuer: rule.issuer.clone().filter(|i| !i.is_empty()),
            audiences: rule.audiences.clone().unwrap_or_default(),
            locations,
            keys,
            jwks_uri: remote_jwks_key(rule),
            output_payload_to_header: rule
                .output_payload_to_header
                .clone()
                .filter(|h| !h.is_empty()),
            output_claim_to_headers: rule
                .output_claim_to_headers
                .iter()
                .flatten()
                .map(|c| {
                    (
                        c.header.clone().unwrap_or_default().to_ascii_lowercase(),
                        c.claim.clone().unwrap_or_default(),
                    )
                })
                .collect(),
            forward_original_token: rule.forward_original_token.unwrap_or(false),
        }
    }

    fn validation(&self) -> Validation {
        Validation {
            issuer: self.issuer.clone(),
            audiences: self.audiences.clone(),
            leeway_secs: citadel_jwt::DEFAULT_LEEWAY_SECS,
            required: Vec::new(),
        }
    }
}

/// A token found in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundToken<'r> {
    /// Where it was.
    pub location: &'r TokenLocation,
    /// The token text.
    pub token: &'r str,
}

/// A request's token, verified.
#[derive(Debug, Clone)]
pub struct Verified<'p> {
    /// The rule that verified it.
    pub provider: &'p JwtProvider,
    /// Where it was found.
    pub location: TokenLocation,
    /// The verified token.
    pub jwt: Jwt,
}

/// Why a request was refused by request authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// 401, or 403 for an audience mismatch (as Envoy answers).
    pub status: u16,
    /// Envoy's words, e.g. `Jwt is expired`.
    pub error: JwtError,
}

/// What request authentication says about one request.
#[derive(Debug, Clone)]
pub enum AuthnOutcome<'p> {
    /// No RequestAuthentication applies: tokens are not looked at.
    NoPolicy,
    /// No token at any configured location: no request principal.
    Anonymous,
    /// A token was verified.
    Verified(Box<Verified<'p>>),
    /// A token is present and invalid.
    Rejected(Rejection),
}

/// Decides request authentication (pure). `find` returns the token at a location,
/// if the request has one there; `now` is Unix seconds.
pub fn authenticate<'p, 'r>(
    providers: &[&'p JwtProvider],
    mut find: impl FnMut(&TokenLocation) -> Option<&'r str>,
    now: i64,
) -> AuthnOutcome<'p> {
    if providers.is_empty() {
        return AuthnOutcome::NoPolicy;
    }
    // Each distinct (location, token) once, with the providers that look there.
    let mut found: Vec<(TokenLocation, &'r str)> = Vec::new();
    for p in providers {
        for loc in &p.locations {
            if let Some(t) = find(loc)
                && !found.iter().any(|(l, tok)| l == loc && *tok == t)
            {
                found.push((loc.clone(), t));
            }
        }
    }
    if found.is_empty() {
        return AuthnOutcome::Anonymous;
    }
    // An error from a rule of the token's issuer says more than "issuer not
    // configured", which is only the answer when no rule knows the issuer.
    let mut error: Option<JwtError> = None;
    for (location, token) in found {
        let jwt = match Jwt::parse(token) {
            Ok(j) => j,
            Err(e) => {
                error.get_or_insert(e);
                continue;
            }
        };
        for p in providers.iter().filter(|p| p.locations.contains(&location)) {
            let checked = jwt
                .check_claims(&p.validation(), now)
                .and_then(|()| jwt.verify_signature(&p.keys));
            match checked {
                Ok(()) => {
                    return AuthnOutcome::Verified(Box::new(Verified {
                        provider: p,
                        location,
                        jwt,
                    }));
                }
                Err(JwtError::UnknownIssuer) => {
                    error.get_or_insert(JwtError::UnknownIssuer);
                }
                Err(e) => {
                    if error
                        .as_ref()
                        .is_none_or(|prev| *prev == JwtError::UnknownIssuer)
                    {
                        error = Some(e);
                    }
                }
            }
        }
    }
    let error = error.unwrap_or(JwtError::UnknownIssuer);
    AuthnOutcome::Rejected(Rejection {
        status: if error == JwtError::AudienceNotAllowed {
            403
        } else {
            401
        },
        error,
    })
}

/// Nested claims deeper than this are not offered to AuthorizationPolicy.
const MAX_CLAIM_DEPTH: usize = 8;
/// At most this many `(claim, value)` pairs are offered to AuthorizationPolicy.
const MAX_CLAIM_VALUES: usize = 512;

impl OwnedJwt {
    /// What AuthorizationPolicy sees of a verified token: principal `<iss>/<sub>`,
    /// `aud`, `azp`, and every string claim as `(name, value)`. A list claim gives one
    /// pair per string element; a nested claim `{a: {b: v}}` is named `a][b`, as it
    /// is written inside `request.auth.claims[a][b]`. Names containing `[` or `]`
    /// are left out, so no claim can pose as a nested one.
    pub fn from_verified(jwt: &Jwt) -> Self {
        let mut claims = Vec::new();
        flatten(&jwt.claims, String::new(), 0, &mut claims);
        Self {
            principal: jwt.principal(),
            audiences: jwt.aud.clone(),
            presenter: jwt
                .claims
                .get("azp")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            claims,
        }
    }
}

fn flatten(
    map: &serde_json::Map<String, serde_json::Value>,
    prefix: String,
    depth: usize,
    out: &mut Vec<(String, String)>,
) {
    use serde_json::Value;
    if depth >= MAX_CLAIM_DEPTH {
        return;
    }
    for (k, v) in map {
        if k.is_empty() || k.contains(['[', ']']) {
            continue;
        }
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}][{k}")
        };
        match v {
            Value::String(s) if out.len() < MAX_CLAIM_VALUES => out.push((name, s.clone())),
            Value::Array(items) => {
                for s in items.iter().filter_map(Value::as_str) {
                    if out.len() < MAX_CLAIM_VALUES {
                        out.push((name.clone(), s.to_owned()));
                    }
                }
            }
            Value::Object(inner) => flatten(inner, name, depth + 1, out),
            _ => {}
        }
    }
}

/// The value of a claim for `outputClaimToHeaders`: a string as is, a number or
/// boolean as text; `a.b` reaches a nested claim when there is no top-level `a.b`.
pub fn claim_header_value(jwt: &Jwt, claim: &str) -> Option<String> {
    use serde_json::Value;
    let mut v = jwt.claims.get(claim);
    if v.is_none() {
        let mut parts = claim.split('.');
        let mut cur = jwt.claims.get(parts.next()?);
        for part in parts {
            cur = cur.and_then(|c| c.get(part));
        }
        v = cur;
    }
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
