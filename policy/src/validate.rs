//! Validation of typed objects: every rule Istio's admission checks enforce that
//! serde cannot (types and unknown fields are serde's job), plus the features
//! Citadel does not support. Pure; returns every issue found.

use std::fmt::Write as _;

use crate::attr::{self, Attr, Field, Kind};
use crate::diag::Issue;
use crate::matching::{IpBlock, PathMatch, parse_port};
use crate::model::{
    Action, AuthorizationPolicy, DRY_RUN_ANNOTATION, ObjectMeta, PeerAuthentication, PolicyObject,
    PolicyTargetReference, WorkloadSelector, selector_is_empty,
};
use crate::timestamp::Timestamp;

/// Mesh-wide settings that change how policies apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// The root namespace: its namespace-wide policies apply to the whole mesh.
    pub root_namespace: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            root_namespace: "istio-system".to_owned(),
        }
    }
}

/// Validates one object; returns every error and warning.
pub fn validate(object: &PolicyObject, mesh: &MeshConfig) -> Vec<Issue> {
    let mut out = Vec::new();
    validate_metadata(object.metadata(), &mut out);
    match object {
        PolicyObject::PeerAuthentication(pa) => validate_peer_authentication(pa, mesh, &mut out),
        PolicyObject::AuthorizationPolicy(ap) => validate_authorization_policy(ap, &mut out),
        PolicyObject::RequestAuthentication(ra) => {
            crate::validate_authn::validate_request_authentication(ra, &mut out);
        }
    }
    out
}

fn validate_metadata(meta: &ObjectMeta, out: &mut Vec<Issue>) {
    match meta.name.as_deref() {
        None => out.push(Issue::error("metadata.name", "missing")),
        Some("") => out.push(Issue::error("metadata.name", "must not be empty")),
        Some(_) => {}
    }
    if meta.namespace.as_deref() == Some("") {
        out.push(Issue::error("metadata.namespace", "must not be empty"));
    }
    if let Some(ts) = meta.creation_timestamp.as_deref()
        && Timestamp::parse(ts).is_none()
    {
        out.push(Issue::error(
            "metadata.creationTimestamp",
            format!("{ts:?} is not an RFC 3339 timestamp (e.g. 2024-01-02T03:04:05Z)"),
        ));
    }
}

fn validate_selector(path: &str, sel: Option<&WorkloadSelector>, out: &mut Vec<Issue>) {
    let Some(labels) = sel.and_then(|s| s.match_labels.as_ref()) else {
        return;
    };
    for (k, v) in labels {
        let p = format!("{path}.matchLabels.{k}");
        if k.is_empty() {
            out.push(Issue::error(p, "empty label key"));
        } else if k.contains('*') || v.contains('*') {
            out.push(Issue::error(p, "wildcards are not supported in selectors"));
        }
    }
}

fn validate_peer_authentication(pa: &PeerAuthentication, mesh: &MeshConfig, out: &mut Vec<Issue>) {
    let spec = &pa.spec;
    validate_selector("spec.selector", spec.selector.as_ref(), out);
    let no_selector = selector_is_empty(spec.selector.as_ref());
    if let Some(ports) = &spec.port_level_mtls {
        if no_selector {
            out.push(Issue::error(
                "spec.portLevelMtls",
                "portLevelMtls requires a workload selector",
            ));
        }
        if ports.is_empty() {
            out.push(Issue::error(
                "spec.portLevelMtls",
                "must not be empty when set",
            ));
        }
        for port in ports.keys() {
            if !(1..=65535).contains(&port.0) {
                out.push(Issue::error(
                    format!("spec.portLevelMtls.{}", port.0),
                    "port out of range (1..=65535)",
                ));
            }
        }
    }
    if !no_selector && pa.metadata.namespace() == mesh.root_namespace {
        out.push(Issue::warning(
            "spec.selector",
            format!(
                "ignored: a PeerAuthentication with a selector in the root namespace {:?} applies to no workload",
                mesh.root_namespace
            ),
        ));
    }
}

fn validate_target_ref(path: &str, t: &PolicyTargetReference, out: &mut Vec<Issue>) {
    match t.kind.as_deref() {
        None | Some("") => out.push(Issue::error(format!("{path}.kind"), "missing")),
        Some("Gateway" | "GatewayClass" | "Service" | "ServiceEntry") => {}
        Some(k) => out.push(Issue::error(
            format!("{path}.kind"),
            format!("{k:?} is not one of Gateway, GatewayClass, Service, ServiceEntry"),
        )),
    }
    if t.name.as_deref().is_none_or(str::is_empty) {
        out.push(Issue::error(format!("{path}.name"), "missing"));
    }
}

/// `selector` and `targetRef`/`targetRefs` of an AuthorizationPolicy or a
/// RequestAuthentication: at most one way of choosing targets, each target well formed.
pub(crate) fn validate_targets(
    selector: Option<&WorkloadSelector>,
    target_ref: Option<&PolicyTargetReference>,
    target_refs: Option<&Vec<PolicyTargetReference>>,
    out: &mut Vec<Issue>,
) {
    validate_selector("spec.selector", selector, out);
    let has_selector = selector.is_some();
    if let Some(t) = target_ref {
        validate_target_ref("spec.targetRef", t, out);
        if has_selector {
            out.push(Issue::error(
                "spec.targetRef",
                "cannot be set together with selector",
            ));
        }
    }
    if let Some(ts) = target_refs {
        for (i, t) in ts.iter().enumerate() {
            validate_target_ref(&format!("spec.targetRefs[{i}]"), t, out);
        }
        if has_selector {
            out.push(Issue::error(
                "spec.targetRefs",
                "cannot be set together with selector",
            ));
        }
        if target_ref.is_some() {
            out.push(Issue::error(
                "spec.targetRefs",
                "cannot be set together with targetRef",
            ));
        }
    }
    if target_ref.is_some() || target_refs.is_some_and(|t| !t.is_empty()) {
        out.push(Issue::warning(
            "spec.targetRefs",
            "a policy with targetRef(s) applies to gateways and waypoints, not to Citadel's workload proxies; it is ignored",
        ));
    }
}

fn validate_authorization_policy(ap: &AuthorizationPolicy, out: &mut Vec<Issue>) {
    let spec = &ap.spec;
    validate_targets(
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        spec.target_refs.as_ref(),
        out,
    );

    match ap.metadata.annotation(DRY_RUN_ANNOTATION) {
        None | Some("true" | "false") => {}
        Some(v) => out.push(Issue::error(
            format!("metadata.annotations.{DRY_RUN_ANNOTATION}"),
            format!("{v:?} must be \"true\" or \"false\""),
        )),
    }

    let action = spec.action();
    match action {
        Action::Custom => match spec.provider.as_ref().and_then(|p| p.name.as_deref()) {
            None | Some("") => out.push(Issue::error(
                "spec.provider",
                "CUSTOM action requires provider.name",
            )),
            Some(name) => out.push(Issue::error(
                "spec.provider.name",
                format!(
                    "unsupported provider {name:?}: Citadel has no external authorization providers, so this CUSTOM policy could not be enforced"
                ),
            )),
        },
        _ => {
            if spec.provider.is_some() {
                out.push(Issue::error(
                    "spec.provider",
                    format!("must not be set with action {}", action.as_str()),
                ));
            }
        }
    }
    if spec.rules.is_none() {
        match action {
            Action::Custom => out.push(Issue::error(
                "spec.rules",
                "CUSTOM action without rules would never be triggered; add an empty rule {} to match every request",
            )),
            Action::Deny | Action::Audit => out.push(Issue::warning(
                "spec.rules",
                format!(
                    "{} action without rules matches nothing; add an empty rule {{}} to match every request",
                    action.as_str()
                ),
            )),
            Action::Allow => {}
        }
    }

    for (ri, rule) in spec.rules().iter().enumerate() {
        let rp = format!("spec.rules[{ri}]");
        if let Some(from) = &rule.from {
            if from.is_empty() {
                out.push(Issue::error(
                    format!("{rp}.from"),
                    "must not be empty when set",
                ));
            }
            for (fi, f) in from.iter().enumerate() {
                let fp = format!("{rp}.from[{fi}].source");
                let Some(src) = &f.source else {
                    out.push(Issue::error(fp, "missing"));
                    continue;
                };
                let fields = attr::source_fields(src);
                validate_fields(&fp, &fields, out);
                let has = |names: &[&str]| {
                    fields
                        .iter()
                        .any(|f| names.contains(&f.name) && f.values.is_some())
                };
                if has(&["serviceAccounts", "notServiceAccounts"])
                    && has(&["principals", "notPrincipals", "namespaces", "notNamespaces"])
                {
                    out.push(Issue::error(
                        format!("{fp}.serviceAccounts"),
                        "cannot be set together with principals or namespaces (or their not* forms)",
                    ));
                }
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                out.push(Issue::error(
                    format!("{rp}.to"),
                    "must not be empty when set",
                ));
            }
            for (ti, t) in to.iter().enumerate() {
                let tp = format!("{rp}.to[{ti}].operation");
                let Some(op) = &t.operation else {
                    out.push(Issue::error(tp, "missing"));
                    continue;
                };
                validate_fields(&tp, &attr::operation_fields(op), out);
            }
        }
        for (ci, c) in rule.when.iter().flatten().enumerate() {
            let cp = format!("{rp}.when[{ci}]");
            let attr = match c.key.as_deref() {
                None | Some("") => {
                    out.push(Issue::error(format!("{cp}.key"), "missing"));
                    continue;
                }
                Some(k) => match Attr::parse_key(k) {
                    Ok(a) => a,
                    Err(e) => {
                        out.push(Issue::error(format!("{cp}.key"), e));
                        continue;
                    }
                },
            };
            let values = c.values.as_deref().filter(|v| !v.is_empty());
            let not_values = c.not_values.as_deref().filter(|v| !v.is_empty());
            if values.is_none() && not_values.is_none() {
                out.push(Issue::error(
                    cp.clone(),
                    "at least one of values or notValues must be set",
                ));
            }
            validate_values(
                &format!("{cp}.values"),
                c.values.as_deref().unwrap_or(&[]),
                &attr,
                out,
            );
            validate_values(
                &format!("{cp}.notValues"),
                c.not_values.as_deref().unwrap_or(&[]),
                &attr,
                out,
            );
        }
    }
}

fn validate_fields(path: &str, fields: &[Field<'_>], out: &mut Vec<Issue>) {
    if fields
        .iter()
        .all(|f| f.values.is_none_or(<[String]>::is_empty))
    {
        out.push(Issue::error(
            path,
            "must not be empty (set at least one field)",
        ));
    }
    for f in fields {
        if let Some(values) = f.values {
            validate_values(&format!("{path}.{}", f.name), values, &f.attr, out);
        }
    }
}

fn validate_values(path: &str, values: &[String], attr: &Attr, out: &mut Vec<Issue>) {
    for (i, v) in values.iter().enumerate() {
        let mut p = String::with_capacity(path.len() + 4);
        let _ = write!(p, "{path}[{i}]");
        if v.is_empty() {
            out.push(Issue::error(p, "empty value not allowed"));
            continue;
        }
        let r = match attr.kind() {
            Kind::Ip => IpBlock::parse(v).map(drop),
            Kind::Port => parse_port(v).map(drop),
            Kind::Path => PathMatch::parse(v).map(drop),
            Kind::ServiceAccount => attr::parse_service_account(v).map(drop),
            Kind::Str | Kind::StrIgnoreCase => Ok(()),
        };
        if let Err(e) = r {
            out.push(Issue::error(p, e));
        } else if *attr == Attr::Principal && v.starts_with("spiffe://") {
            out.push(Issue::warning(
                p,
                "principals are written without \"spiffe://\" (e.g. cluster.local/ns/a/sa/b); this value never matches",
            ));
        }
    }
}
