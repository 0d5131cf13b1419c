//! Validation of RequestAuthentication objects: Istio's admission rules for
//! `jwtRules`, plus what Citadel does not support (plain-HTTP JWKS URIs,
//! `spaceDelimitedClaims`) and inline key sets it could not use.

use std::time::Duration;

use crate::diag::Issue;
use crate::model::RequestAuthentication;
use crate::validate::validate_targets;

/// Longest JWKS fetch time accepted in `timeout`.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads a protobuf-JSON duration such as `5s` or `0.5s` (also `500ms`).
pub fn parse_timeout(s: &str) -> Option<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse::<u64>().ok().map(Duration::from_millis);
    }
    let secs = s.strip_suffix('s')?;
    if secs.is_empty() || !secs.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    secs.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
}

/// An HTTP header name (RFC 9110 token), not a pseudo-header.
pub(crate) fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

pub(crate) fn validate_request_authentication(ra: &RequestAuthentication, out: &mut Vec<Issue>) {
    let spec = &ra.spec;
    validate_targets(
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        spec.target_refs.as_ref(),
        out,
    );
    for (i, rule) in spec.jwt_rules.iter().flatten().enumerate() {
        let p = format!("spec.jwtRules[{i}]");
        let issuer = rule.issuer.as_deref().unwrap_or_default();
        let uri = rule.jwks_uri.as_deref().unwrap_or_default();
        if issuer.is_empty() && uri.is_empty() {
            out.push(Issue::error(
                format!("{p}.issuer"),
                "issuer or jwksUri must be set",
            ));
        }
        if rule.jwks.is_some() && rule.jwks_uri.is_some() {
            out.push(Issue::error(
                format!("{p}.jwks"),
                "cannot be set together with jwksUri",
            ));
        }
        if rule.jwks_uri.is_some() {
            if !uri.starts_with("https://") || uri.len() <= "https://".len() {
                out.push(Issue::error(
                    format!("{p}.jwksUri"),
                    format!(
                        "{uri:?} is not supported: the CA fetches JWKS over https only (or put the keys inline in jwks)"
                    ),
                ));
            }
        } else if rule.jwks.is_none() && !issuer.starts_with("https://") {
            // Without jwks or jwksUri the CA finds the keys by OIDC discovery at the
            // issuer, which needs an https issuer URL.
            out.push(Issue::warning(
                format!("{p}.issuer"),
                format!(
                    "{issuer:?} is not an https URL, so its keys cannot be discovered: every token of this issuer will be refused (set jwksUri or jwks)"
                ),
            ));
        }
        if let Some(jwks) = &rule.jwks
            && let Err(e) = citadel_jwt::Jwks::parse(jwks)
        {
            out.push(Issue::error(
                format!("{p}.jwks"),
                format!("unusable key set: {e}"),
            ));
        }
        for (j, aud) in rule.audiences.iter().flatten().enumerate() {
            if aud.is_empty() {
                out.push(Issue::error(
                    format!("{p}.audiences[{j}]"),
                    "empty value not allowed",
                ));
            }
        }
        for (j, h) in rule.from_headers.iter().flatten().enumerate() {
            let name = h.name.as_deref().unwrap_or_default();
            if !is_header_name(name) {
                out.push(Issue::error(
                    format!("{p}.fromHeaders[{j}].name"),
                    format!("{name:?} is not a header name"),
                ));
            }
        }
        for (field, list) in [
            ("fromParams", &rule.from_params),
            ("fromCookies", &rule.from_cookies),
        ] {
            for (j, v) in list.iter().flatten().enumerate() {
                if v.is_empty() {
                    out.push(Issue::error(
                        format!("{p}.{field}[{j}]"),
                        "empty value not allowed",
                    ));
                }
            }
        }
        if let Some(h) = &rule.output_payload_to_header
            && !is_header_name(h)
        {
            out.push(Issue::error(
                format!("{p}.outputPayloadToHeader"),
                format!("{h:?} is not a header name"),
            ));
        }
        for (j, c) in rule.output_claim_to_headers.iter().flatten().enumerate() {
            let header = c.header.as_deref().unwrap_or_default();
            if !is_header_name(header) {
                out.push(Issue::error(
                    format!("{p}.outputClaimToHeaders[{j}].header"),
                    format!("{header:?} is not a header name"),
                ));
            }
            if c.claim.as_deref().is_none_or(str::is_empty) {
                out.push(Issue::error(
                    format!("{p}.outputClaimToHeaders[{j}].claim"),
                    "missing",
                ));
            }
        }
        if let Some(t) = &rule.timeout {
            match parse_timeout(t) {
                Some(d) if !d.is_zero() && d <= MAX_TIMEOUT => {}
                _ => out.push(Issue::error(
                    format!("{p}.timeout"),
                    format!("{t:?} must be a duration such as \"5s\", more than 0 and at most 60s"),
                )),
            }
        }
        if rule.space_delimited_claims.is_some() {
            out.push(Issue::error(
                format!("{p}.spaceDelimitedClaims"),
                "unsupported: Citadel matches claims as strings and lists of strings only",
            ));
        }
    }
}
