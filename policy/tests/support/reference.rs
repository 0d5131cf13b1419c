//! A naive reference evaluator, written straight from the semantics in
//! `docs/policies.md` over the model types: no index, no precompiled matchers,
//! every policy scanned for every request. Tests only: the compiled evaluator must
//! always agree with it.

use std::net::IpAddr;

use citadel_policy::model::{
    Action, AuthorizationPolicy, Condition, MtlsMode, ObjectMeta, Operation, PeerAuthentication,
    PolicyObject, Rule, Source, WorkloadSelector,
};
use citadel_policy::{MeshConfig, Request, Timestamp};

/// A rule by (namespace, name, index).
pub type RefRule = (String, String, usize);

/// The reference outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefDecision {
    pub allow: bool,
    /// "denied_by", "no_allow_policy", "allowed_by", "no_allow_matched".
    pub kind: &'static str,
    pub rule: Option<RefRule>,
    pub audit: Option<RefRule>,
    pub dry_run: Option<(&'static str, Option<RefRule>)>,
    pub skipped: u32,
}

/// The reference mTLS outcome: mode name and deciding policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefMtls {
    pub mode: &'static str,
    pub policy: Option<(String, String)>,
}

// ---------------------------------------------------------------- matching

/// Istio string pattern, written out case by case.
fn pattern_matches(pattern: &str, value: &str, ignore_case: bool) -> bool {
    let (p, v) = if ignore_case {
        (pattern.to_ascii_lowercase(), value.to_ascii_lowercase())
    } else {
        (pattern.to_owned(), value.to_owned())
    };
    if p == "*" {
        return !v.is_empty();
    }
    if let Some(suffix) = p.strip_prefix('*') {
        return v.ends_with(suffix);
    }
    if let Some(prefix) = p.strip_suffix('*') {
        return v.starts_with(prefix);
    }
    p == v
}

fn ip_in_block(block: &str, ip: IpAddr) -> bool {
    let (addr, len) = match block.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u32>().unwrap())),
        None => (block, None),
    };
    let net: IpAddr = addr.parse().unwrap();
    let net = net.to_canonical();
    let ip = ip.to_canonical();
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let len = len.unwrap_or(32);
            let bits_n = format!("{:032b}", u32::from(n));
            let bits_i = format!("{:032b}", u32::from(i));
            bits_n[..len as usize] == bits_i[..len as usize]
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let len = len.unwrap_or(128);
            let bits_n = format!("{:0128b}", u128::from(n));
            let bits_i = format!("{:0128b}", u128::from(i));
            bits_n[..len as usize] == bits_i[..len as usize]
        }
        _ => false,
    }
}

/// Path templates by backtracking over characters: `{*}` = one or more non-`/`
/// characters, `{**}` = any characters.
fn template_matches(t: &[u8], p: &[u8]) -> bool {
    if t.is_empty() {
        return p.is_empty();
    }
    if t.starts_with(b"{**}") {
        return (0..=p.len()).any(|k| template_matches(&t[4..], &p[k..]));
    }
    if t.starts_with(b"{*}") {
        return (1..=p.len())
            .take_while(|&k| p[k - 1] != b'/')
            .any(|k| template_matches(&t[3..], &p[k..]));
    }
    !p.is_empty() && p[0] == t[0] && template_matches(&t[1..], &p[1..])
}

fn path_matches(pattern: &str, path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or("");
    if pattern.contains("{*}") || pattern.contains("{**}") {
        template_matches(pattern.as_bytes(), path.as_bytes())
    } else {
        pattern_matches(pattern, path, false)
    }
}

// ---------------------------------------------------------------- attributes

/// The value(s) of an attribute: `None` = the request cannot tell (fail closed);
/// `Some(vec![])` = known to be absent.
enum Val {
    Strings(Vec<String>),
    Ips(Vec<IpAddr>),
    Port(u16),
    Paths(Vec<String>),
    NoCase(Vec<String>),
    ServiceAccounts(Vec<String>),
}

fn principal_split(p: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = p.split('/').collect();
    if parts.len() == 5
        && !parts[0].is_empty()
        && parts[1] == "ns"
        && parts[3] == "sa"
        && !parts[2].is_empty()
        && !parts[4].is_empty()
    {
        Some((parts[2].to_owned(), parts[4].to_owned()))
    } else {
        None
    }
}

fn attribute(name: &str, req: &Request<'_>) -> Option<Val> {
    let principal = req.source.principal.map(str::to_owned);
    let split = req.source.principal.and_then(principal_split);
    let http = req.http;
    let jwt = http.and_then(|h| h.jwt);
    let opt = |o: Option<&str>| o.map(|s| vec![s.to_owned()]).unwrap_or_default();
    Some(match name {
        "principal" => Val::Strings(principal.into_iter().collect()),
        "namespace" => Val::Strings(split.clone().map(|s| vec![s.0]).unwrap_or_default()),
        "service_account" => Val::ServiceAccounts(
            split
                .map(|(n, s)| vec![format!("{n}/{s}")])
                .unwrap_or_default(),
        ),
        "source_ip" => Val::Ips(vec![req.source.ip?]),
        "remote_ip" => Val::Ips(vec![req.source.remote_ip.or(req.source.ip)?]),
        "destination_ip" => Val::Ips(vec![req.destination.ip?]),
        "port" => Val::Port(req.destination.port),
        "sni" => Val::Strings(opt(req.sni)),
        "host" => Val::NoCase(vec![http?.host.to_owned()]),
        "method" => Val::Strings(vec![http?.method.to_owned()]),
        "path" => Val::Paths(vec![http?.path.to_owned()]),
        "request_principal" => Val::Strings(opt(http?.jwt.map(|j| j.principal))),
        "audiences" => Val::Strings(
            http?
                .jwt
                .map(|j| j.audiences.iter().map(|a| a.to_string()).collect())
                .unwrap_or_default(),
        ),
        "presenter" => Val::Strings(opt(http?.jwt.and_then(|j| j.presenter))),
        other => {
            if let Some(name) = other.strip_prefix("header:") {
                let h = http?;
                let v = h
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_string());
                return Some(Val::Strings(v.into_iter().collect()));
            }
            if let Some(c) = other.strip_prefix("claim:") {
                let _ = http?;
                return Some(Val::Strings(
                    jwt.map(|j| {
                        j.claims
                            .iter()
                            .filter(|(k, _)| *k == c)
                            .map(|(_, v)| v.to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
                ));
            }
            panic!("unknown attribute {other}")
        }
    })
}

/// Does one field/condition hold? `None` when the request cannot tell.
fn holds(attr: &str, values: &[String], negate: bool, req: &Request<'_>) -> Option<bool> {
    let val = attribute(attr, req)?;
    let any = match val {
        Val::Strings(vs) => vs
            .iter()
            .any(|v| values.iter().any(|p| pattern_matches(p, v, false))),
        Val::NoCase(vs) => vs
            .iter()
            .any(|v| values.iter().any(|p| pattern_matches(p, v, true))),
        Val::Paths(vs) => vs.iter().any(|v| values.iter().any(|p| path_matches(p, v))),
        Val::Ips(ips) => ips
            .iter()
            .any(|ip| values.iter().any(|b| ip_in_block(b, *ip))),
        Val::Port(port) => values.iter().any(|p| p.parse::<u16>() == Ok(port)),
        Val::ServiceAccounts(vs) => vs.iter().any(|v| values.iter().any(|p| p == v)),
    };
    Some(if negate { !any } else { any })
}

fn list(v: &Option<Vec<String>>) -> Option<&[String]> {
    v.as_deref().filter(|l| !l.is_empty())
}

fn source_checks(s: &Source) -> Vec<(&'static str, &[String], bool)> {
    let mut out = Vec::new();
    for (a, v, n) in [
        ("principal", &s.principals, false),
        ("principal", &s.not_principals, true),
        ("request_principal", &s.request_principals, false),
        ("request_principal", &s.not_request_principals, true),
        ("namespace", &s.namespaces, false),
        ("namespace", &s.not_namespaces, true),
        ("service_account", &s.service_accounts, false),
        ("service_account", &s.not_service_accounts, true),
        ("source_ip", &s.ip_blocks, false),
        ("source_ip", &s.not_ip_blocks, true),
        ("remote_ip", &s.remote_ip_blocks, false),
        ("remote_ip", &s.not_remote_ip_blocks, true),
    ] {
        if let Some(l) = list(v) {
            out.push((a, l, n));
        }
    }
    out
}

fn operation_checks(o: &Operation) -> Vec<(&'static str, &[String], bool)> {
    let mut out = Vec::new();
    for (a, v, n) in [
        ("host", &o.hosts, false),
        ("host", &o.not_hosts, true),
        ("port", &o.ports, false),
        ("port", &o.not_ports, true),
        ("method", &o.methods, false),
        ("method", &o.not_methods, true),
        ("path", &o.paths, false),
        ("path", &o.not_paths, true),
    ] {
        if let Some(l) = list(v) {
            out.push((a, l, n));
        }
    }
    out
}

fn condition_attr(key: &str) -> String {
    match key {
        "source.ip" => "source_ip".into(),
        "remote.ip" => "remote_ip".into(),
        "source.namespace" => "namespace".into(),
        "source.principal" => "principal".into(),
        "source.serviceAccount" => "service_account".into(),
        "request.auth.principal" => "request_principal".into(),
        "request.auth.audiences" => "audiences".into(),
        "request.auth.presenter" => "presenter".into(),
        "destination.ip" => "destination_ip".into(),
        "destination.port" => "port".into(),
        "connection.sni" => "sni".into(),
        k if k.starts_with("request.headers[") => format!("header:{}", &k[16..k.len() - 1]),
        k if k.starts_with("request.auth.claims[") => format!("claim:{}", &k[20..k.len() - 1]),
        k => panic!("unknown key {k}"),
    }
}

fn condition_checks(c: &Condition) -> Vec<(String, &[String], bool)> {
    let a = condition_attr(c.key.as_deref().unwrap());
    let mut out = Vec::new();
    if let Some(l) = list(&c.values) {
        out.push((a.clone(), l, false));
    }
    if let Some(l) = list(&c.not_values) {
        out.push((a, l, true));
    }
    out
}

/// Every check of a rule, grouped: (from groups, to groups, when).
type Group<'a> = Vec<(String, &'a [String], bool)>;

fn own<'a>(v: Vec<(&'static str, &'a [String], bool)>) -> Vec<(String, &'a [String], bool)> {
    v.into_iter()
        .map(|(a, l, n)| (a.to_owned(), l, n))
        .collect()
}

fn rule_groups(rule: &Rule) -> (Vec<Group<'_>>, Vec<Group<'_>>, Group<'_>) {
    let from = rule
        .from
        .iter()
        .flatten()
        .map(|f| own(f.source.as_ref().map(source_checks).unwrap_or_default()))
        .collect();
    let to = rule
        .to
        .iter()
        .flatten()
        .map(|t| {
            own(t
                .operation
                .as_ref()
                .map(operation_checks)
                .unwrap_or_default())
        })
        .collect();
    let when = rule
        .when
        .iter()
        .flatten()
        .flat_map(condition_checks)
        .collect();
    (from, to, when)
}

/// Whether a check on `attr` can be judged at all for this request.
fn judgeable(attr: &str, req: &Request<'_>) -> bool {
    attribute(attr, req).is_some()
}

/// For ALLOW: a rule mentioning anything unjudgeable (even with empty lists it is
/// not mentioned) is dropped. `when` keys count even if both lists are empty.
fn rule_lacks(rule: &Rule, req: &Request<'_>) -> bool {
    let (from, to, when) = rule_groups(rule);
    let keys_lack = rule
        .when
        .iter()
        .flatten()
        .any(|c| !judgeable(&condition_attr(c.key.as_deref().unwrap()), req));
    keys_lack
        || from
            .iter()
            .chain(to.iter())
            .flatten()
            .chain(when.iter())
            .any(|(a, _, _)| !judgeable(a, req))
}

fn rule_matches(rule: &Rule, req: &Request<'_>, action: Action) -> bool {
    if action == Action::Allow && rule_lacks(rule, req) {
        return false;
    }
    // DENY / AUDIT: an unjudgeable check is dropped (treated as holding).
    let ok = |(a, l, n): &(String, &[String], bool)| holds(a, l, *n, req).unwrap_or(true);
    let (from, to, when) = rule_groups(rule);
    let from_ok = from.is_empty() || from.iter().any(|g| g.iter().all(ok));
    let to_ok = to.is_empty() || to.iter().any(|g| g.iter().all(ok));
    let when_ok = when.iter().all(ok);
    from_ok && to_ok && when_ok
}

// ---------------------------------------------------------------- policies

fn selector_labels(s: &Option<WorkloadSelector>) -> Vec<(String, String)> {
    s.as_ref()
        .and_then(|s| s.match_labels.clone())
        .map(|m| m.into_iter().collect())
        .unwrap_or_default()
}

fn selects(s: &Option<WorkloadSelector>, labels: &[(&str, &str)]) -> bool {
    selector_labels(s)
        .iter()
        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
}

fn ns(m: &ObjectMeta) -> String {
    m.namespace.clone().unwrap_or_else(|| "default".into())
}

fn name(m: &ObjectMeta) -> String {
    m.name.clone().unwrap()
}

fn applies(ap: &AuthorizationPolicy, req: &Request<'_>, root: &str) -> bool {
    let wl = req.destination.workload;
    let targeted =
        ap.spec.target_ref.is_some() || ap.spec.target_refs.as_ref().is_some_and(|t| !t.is_empty());
    let p_ns = ns(&ap.metadata);
    !targeted && (p_ns == wl.namespace || p_ns == root) && selects(&ap.spec.selector, wl.labels)
}

fn evaluate(
    policies: &[&AuthorizationPolicy],
    req: &Request<'_>,
) -> (&'static str, Option<RefRule>, Option<RefRule>, u32) {
    let first = |action: Action| -> Option<RefRule> {
        policies
            .iter()
            .filter(|p| p.spec.action() == action)
            .find_map(|p| {
                p.spec
                    .rules()
                    .iter()
                    .position(|r| rule_matches(r, req, action))
                    .map(|i| (ns(&p.metadata), name(&p.metadata), i))
            })
    };
    let audit = first(Action::Audit);
    let skipped = policies
        .iter()
        .filter(|p| p.spec.action() == Action::Allow)
        .flat_map(|p| p.spec.rules())
        .filter(|r| rule_lacks(r, req))
        .count() as u32;
    if let Some(d) = first(Action::Deny) {
        return ("denied_by", Some(d), audit, skipped);
    }
    if !policies.iter().any(|p| p.spec.action() == Action::Allow) {
        return ("no_allow_policy", None, audit, skipped);
    }
    match first(Action::Allow) {
        Some(a) => ("allowed_by", Some(a), audit, skipped),
        None => ("no_allow_matched", None, audit, skipped),
    }
}

/// The reference authorization decision.
pub fn decide(objects: &[PolicyObject], mesh: &MeshConfig, req: &Request<'_>) -> RefDecision {
    let mut aps: Vec<&AuthorizationPolicy> = objects
        .iter()
        .filter_map(|o| match o {
            PolicyObject::AuthorizationPolicy(a) => Some(a),
            _ => None,
        })
        .filter(|a| applies(a, req, &mesh.root_namespace))
        .collect();
    aps.sort_by_key(|a| (ns(&a.metadata), name(&a.metadata)));
    let is_dry = |a: &&AuthorizationPolicy| {
        a.metadata
            .annotations
            .as_ref()
            .and_then(|m| m.get("istio.io/dry-run"))
            .map(String::as_str)
            == Some("true")
    };
    let enforced: Vec<&AuthorizationPolicy> = aps.iter().copied().filter(|a| !is_dry(a)).collect();
    let (kind, rule, audit, skipped) = evaluate(&enforced, req);
    let dry_run = aps.iter().any(is_dry).then(|| {
        let (k, r, _, _) = evaluate(&aps, req);
        (k, r)
    });
    RefDecision {
        allow: matches!(kind, "no_allow_policy" | "allowed_by"),
        kind,
        rule,
        audit,
        dry_run,
        skipped,
    }
}

/// The reference mTLS resolution.
pub fn mtls(objects: &[PolicyObject], mesh: &MeshConfig, req: &Request<'_>) -> RefMtls {
    let wl = req.destination.workload;
    let root = mesh.root_namespace.as_str();
    let pas: Vec<&PeerAuthentication> = objects
        .iter()
        .filter_map(|o| match o {
            PolicyObject::PeerAuthentication(p) => Some(p),
            _ => None,
        })
        .collect();
    let age = |p: &PeerAuthentication| {
        (
            p.metadata
                .creation_timestamp
                .as_deref()
                .and_then(Timestamp::parse),
            ns(&p.metadata),
            name(&p.metadata),
        )
    };
    let oldest = |filter: &dyn Fn(&PeerAuthentication) -> bool| -> Option<&PeerAuthentication> {
        pas.iter()
            .copied()
            .filter(|p| filter(p))
            .min_by_key(|p| age(p))
    };
    let no_selector = |p: &PeerAuthentication| selector_labels(&p.spec.selector).is_empty();
    let mesh_p = oldest(&|p| ns(&p.metadata) == root && no_selector(p));
    let ns_p =
        oldest(&|p| wl.namespace != root && ns(&p.metadata) == wl.namespace && no_selector(p));
    let wl_p = oldest(&|p| {
        wl.namespace != root
            && ns(&p.metadata) == wl.namespace
            && !no_selector(p)
            && selects(&p.spec.selector, wl.labels)
    });
    let mut mode = "PERMISSIVE";
    let mut by = None;
    let set = |p: &PeerAuthentication,
               m: MtlsMode,
               mode: &mut &'static str,
               by: &mut Option<(String, String)>| {
        let s = match m {
            MtlsMode::Unset => return,
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        };
        *mode = s;
        *by = Some((ns(&p.metadata), name(&p.metadata)));
    };
    for p in [mesh_p, ns_p, wl_p].into_iter().flatten() {
        set(
            p,
            p.spec.mtls.as_ref().map(|m| m.mode()).unwrap_or_default(),
            &mut mode,
            &mut by,
        );
    }
    if let Some(p) = wl_p
        && let Some(m) = p.spec.port_level_mtls.as_ref().and_then(|m| {
            m.iter()
                .find(|(k, _)| k.0 == i64::from(req.destination.port))
        })
    {
        set(p, m.1.mode(), &mut mode, &mut by);
    }
    RefMtls { mode, policy: by }
}
