//! Property: the compiled, indexed evaluator agrees with the naive reference
//! evaluator on random policy sets and random requests (decision, deciding rule,
//! audit, dry run, skipped rules, and the mTLS mode with its deciding policy).

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;

use citadel_policy::model::{
    Action, ApiVersion, AuthorizationPolicy, AuthorizationPolicySpec, Condition, MtlsMode,
    MutualTls, ObjectMeta, Operation, PeerAuthentication, PeerAuthenticationSpec, PolicyObject,
    PortKey, Rule, RuleFrom, RuleTo, Source, WorkloadSelector,
};
use citadel_policy::{MeshConfig, OwnedHttp, OwnedJwt, OwnedRequest, PolicySet, Reason};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use support::reference;

const NAMESPACES: &[&str] = &["istio-system", "a", "b"];

fn pick(pool: &'static [&'static str], max: usize) -> impl Strategy<Value = Option<Vec<String>>> {
    option::weighted(
        0.3,
        vec(select(pool), 1..=max).prop_map(|v| v.into_iter().map(String::from).collect()),
    )
}

fn selector() -> impl Strategy<Value = Option<WorkloadSelector>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(WorkloadSelector::default())),
        2 => Just(Some(sel(&[("app", "web")]))),
        1 => Just(Some(sel(&[("app", "db")]))),
        1 => Just(Some(sel(&[("app", "web"), ("version", "v1")]))),
        1 => Just(Some(sel(&[("version", "v2")]))),
    ]
}

fn sel(pairs: &[(&str, &str)]) -> WorkloadSelector {
    WorkloadSelector {
        match_labels: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
    }
}

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/a/sa/x",
    "cluster.local/ns/b/*",
    "*",
    "*/sa/y",
    "td/ns/a/sa/y",
];
const NS_PATTERNS: &[&str] = &["a", "b", "*", "a*", "*b", "istio-system"];
const SAS: &[&str] = &["a/x", "b/y", "a/y"];
const IPS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "192.168.1.1",
    "::1",
    "0.0.0.0/0",
];
const HOSTS: &[&str] = &[
    "example.com",
    "*.example.com",
    "API.example.com",
    "*",
    "api.*",
];
const PORTS: &[&str] = &["80", "8080", "9000"];
const METHODS: &[&str] = &["GET", "POST", "G*"];
const PATHS: &[&str] = &[
    "/api",
    "/api/*",
    "*/admin",
    "/api/{*}",
    "/api/{**}",
    "/api/{*}/x",
    "*",
    "/x/{**}/admin",
];
const RPS: &[&str] = &["iss/alice", "iss/*", "*"];
const SNIS: &[&str] = &["example.com", "*.example.com", "*"];
const HEADER_VALUES: &[&str] = &["t1", "t*", "*"];

fn source() -> impl Strategy<Value = Source> {
    (
        (
            pick(PRINCIPALS, 2),
            pick(PRINCIPALS, 2),
            pick(RPS, 2),
            pick(RPS, 1),
        ),
        (
            pick(NS_PATTERNS, 2),
            pick(NS_PATTERNS, 2),
            pick(SAS, 2),
            pick(SAS, 1),
        ),
        (pick(IPS, 2), pick(IPS, 2), pick(IPS, 2), pick(IPS, 1)),
    )
        .prop_map(
            |((p, np, rp, nrp), (n, nn, sa, nsa), (ip, nip, rip, nrip))| {
                let mut s = Source {
                    principals: p,
                    not_principals: np,
                    request_principals: rp,
                    not_request_principals: nrp,
                    namespaces: n,
                    not_namespaces: nn,
                    service_accounts: sa,
                    not_service_accounts: nsa,
                    ip_blocks: ip,
                    not_ip_blocks: nip,
                    remote_ip_blocks: rip,
                    not_remote_ip_blocks: nrip,
                };
                // serviceAccounts may not be combined with principals / namespaces.
                if s.principals.is_some()
                    || s.not_principals.is_some()
                    || s.namespaces.is_some()
                    || s.not_namespaces.is_some()
                {
                    s.service_accounts = None;
                    s.not_service_accounts = None;
                }
                if s == Source::default() {
                    s.namespaces = Some(vec!["a".into()]);
                }
                s
            },
        )
}

fn operation() -> impl Strategy<Value = Operation> {
    (
        (
            pick(HOSTS, 2),
            pick(HOSTS, 1),
            pick(PORTS, 2),
            pick(PORTS, 1),
        ),
        (
            pick(METHODS, 2),
            pick(METHODS, 1),
            pick(PATHS, 2),
            pick(PATHS, 2),
        ),
    )
        .prop_map(|((h, nh, p, np), (m, nm, pa, npa))| {
            let mut o = Operation {
                hosts: h,
                not_hosts: nh,
                ports: p,
                not_ports: np,
                methods: m,
                not_methods: nm,
                paths: pa,
                not_paths: npa,
            };
            if o == Operation::default() {
                o.ports = Some(vec!["80".into()]);
            }
            o
        })
}

fn condition() -> impl Strategy<Value = Condition> {
    let keyed: Vec<(&'static str, &'static [&'static str])> = vec![
        ("source.ip", IPS),
        ("remote.ip", IPS),
        ("destination.ip", IPS),
        ("destination.port", PORTS),
        ("connection.sni", SNIS),
        ("source.namespace", NS_PATTERNS),
        ("source.principal", PRINCIPALS),
        ("source.serviceAccount", SAS),
        ("request.headers[X-Token]", HEADER_VALUES),
        ("request.auth.principal", RPS),
        ("request.auth.audiences", &["aud1", "aud*"]),
        ("request.auth.presenter", &["web", "*"]),
        ("request.auth.claims[groups]", &["admin", "dev*"]),
    ];
    select(keyed).prop_flat_map(|(key, pool)| {
        (pick(pool, 2), pick(pool, 1)).prop_map(move |(values, not_values)| Condition {
            key: Some(key.to_owned()),
            values: if values.is_none() && not_values.is_none() {
                Some(vec![pool[0].to_owned()])
            } else {
                values
            },
            not_values,
        })
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        option::weighted(0.5, vec(source(), 1..=2)),
        option::weighted(0.5, vec(operation(), 1..=2)),
        option::weighted(0.4, vec(condition(), 1..=2)),
    )
        .prop_map(|(from, to, when)| Rule {
            from: from.map(|v| {
                v.into_iter()
                    .map(|s| RuleFrom { source: Some(s) })
                    .collect()
            }),
            to: to.map(|v| {
                v.into_iter()
                    .map(|o| RuleTo { operation: Some(o) })
                    .collect()
            }),
            when,
        })
}

fn meta(name: String, ns: &str, ts: Option<&str>, dry_run: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(ns.to_owned()),
        creation_timestamp: ts.map(str::to_owned),
        annotations: dry_run
            .map(|v| BTreeMap::from([("istio.io/dry-run".to_owned(), v.to_owned())])),
        ..ObjectMeta::default()
    }
}

/// (namespace, selector, action, rules, dry-run annotation)
type ApParts = (
    String,
    Option<WorkloadSelector>,
    Action,
    Option<Vec<Rule>>,
    Option<&'static str>,
);

/// (namespace, selector, mtls, port-level modes, creationTimestamp)
type PaParts = (
    String,
    Option<WorkloadSelector>,
    Option<MutualTls>,
    Vec<(u16, Option<MutualTls>)>,
    Option<&'static str>,
);

fn authorization_policy() -> impl Strategy<Value = ApParts> {
    (
        select(NAMESPACES),
        selector(),
        prop_oneof![4 => Just(Action::Allow), 3 => Just(Action::Deny), 1 => Just(Action::Audit)],
        prop_oneof![
            1 => Just(None),
            1 => Just(Some(vec![])),
            1 => Just(Some(vec![Rule::default()])),
            6 => vec(rule(), 1..=3).prop_map(Some),
        ],
        prop_oneof![6 => Just(None), 1 => Just(Some("true")), 1 => Just(Some("false"))],
    )
        .prop_map(|(ns, s, a, r, d)| (ns.to_owned(), s, a, r, d))
}

fn mode() -> impl Strategy<Value = Option<MutualTls>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(MutualTls { mode: None })),
        1 => Just(Some(MutualTls { mode: Some(MtlsMode::Unset) })),
        2 => Just(Some(MutualTls { mode: Some(MtlsMode::Disable) })),
        2 => Just(Some(MutualTls { mode: Some(MtlsMode::Permissive) })),
        2 => Just(Some(MutualTls { mode: Some(MtlsMode::Strict) })),
    ]
}

fn peer_authentication() -> impl Strategy<Value = PaParts> {
    (
        select(NAMESPACES),
        selector(),
        mode(),
        vec((select(&[80u16, 8080, 9000][..]), mode()), 0..=2),
        select(
            &[
                None,
                Some("2024-01-01T00:00:00Z"),
                Some("2024-02-01T00:00:00Z"),
                Some("2023-12-31T23:00:00-02:00"),
            ][..],
        ),
    )
        .prop_map(|(ns, s, m, p, ts)| (ns.to_owned(), s, m, p, ts))
}

fn policies() -> impl Strategy<Value = Vec<PolicyObject>> {
    (
        vec(authorization_policy(), 0..=6),
        vec(peer_authentication(), 0..=4),
    )
        .prop_map(|(aps, pas)| {
            let mut out = Vec::new();
            for (i, (ns, selector, action, rules, dry)) in aps.into_iter().enumerate() {
                out.push(PolicyObject::AuthorizationPolicy(AuthorizationPolicy {
                    api_version: ApiVersion::V1,
                    metadata: meta(format!("ap{}", (i * 7) % 10), &ns, None, dry),
                    spec: AuthorizationPolicySpec {
                        selector,
                        rules,
                        action: Some(action),
                        ..AuthorizationPolicySpec::default()
                    },
                }));
            }
            for (i, (ns, selector, mtls, ports, ts)) in pas.into_iter().enumerate() {
                let has_selector = selector.as_ref().is_some_and(|s| !s.is_empty());
                let port_level_mtls = (has_selector && !ports.is_empty()).then(|| {
                    ports
                        .into_iter()
                        .map(|(p, m)| (PortKey(i64::from(p)), m.unwrap_or_default()))
                        .collect()
                });
                out.push(PolicyObject::PeerAuthentication(PeerAuthentication {
                    api_version: ApiVersion::V1beta1,
                    metadata: meta(format!("pa{}", (i * 3) % 5), &ns, ts, None),
                    spec: PeerAuthenticationSpec {
                        selector,
                        mtls,
                        port_level_mtls,
                    },
                }));
            }
            out
        })
}

type Labels = &'static [(&'static str, &'static str)];
const LABEL_SETS: &[Labels] = &[
    &[],
    &[("app", "web")],
    &[("app", "web"), ("version", "v1")],
    &[("app", "db"), ("version", "v2")],
    &[("version", "v2")],
];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn request() -> impl Strategy<Value = OwnedRequest> {
    let principal = option::weighted(
        0.7,
        select(
            &[
                "cluster.local/ns/a/sa/x",
                "cluster.local/ns/b/sa/y",
                "td/ns/a/sa/y",
                "weird-principal",
                "x/ns/istio-system/sa/y",
            ][..],
        ),
    );
    let ips = &[
        "10.1.2.3",
        "10.2.0.1",
        "192.168.1.1",
        "::1",
        "::ffff:10.1.0.9",
    ][..];
    let labels = select(LABEL_SETS);
    let http = option::weighted(
        0.6,
        (
            select(&["GET", "POST", "get", "GOT"][..]),
            select(
                &[
                    "/api",
                    "/api/v1",
                    "/api/v1/x",
                    "/x/admin",
                    "/api?q=1",
                    "/x/a/b/admin",
                    "/",
                ][..],
            ),
            select(&["example.com", "api.EXAMPLE.com", "other.org", ""][..]),
            option::of((
                select(&["x-token", "X-Token"][..]),
                select(&["t1", "t2", ""][..]),
            )),
            option::weighted(
                0.5,
                (
                    select(&["iss/alice", "iss/bob", "other/carol"][..]),
                    vec(select(&["aud1", "aud2"][..]), 0..=2),
                    option::of(select(&["web", "cli"][..])),
                    vec(select(&["admin", "dev1", "ops"][..]), 0..=2),
                ),
            ),
        ),
    );
    (
        (
            principal,
            option::weighted(0.9, select(ips)),
            option::weighted(0.3, select(ips)),
        ),
        (
            select(NAMESPACES),
            labels,
            option::weighted(0.8, select(ips)),
            select(&[80u16, 8080, 9000][..]),
        ),
        option::weighted(0.4, select(&["example.com", "a.example.com", "x.org"][..])),
        http,
    )
        .prop_map(
            |((p, sip, rip), (ns, labels, dip, port), sni, http)| OwnedRequest {
                principal: p.map(str::to_owned),
                source_ip: sip.map(ip),
                remote_ip: rip.map(ip),
                namespace: ns.to_owned(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                destination_ip: dip.map(ip),
                port,
                sni: sni.map(str::to_owned),
                http: http.map(|(m, path, host, token, jwt)| OwnedHttp {
                    method: m.to_owned(),
                    path: path.to_owned(),
                    host: host.to_owned(),
                    headers: token
                        .map(|(name, t)| vec![(name.to_owned(), t.to_owned())])
                        .unwrap_or_default(),
                    jwt: jwt.map(|(pr, aud, pres, groups)| OwnedJwt {
                        principal: pr.to_owned(),
                        audiences: aud.into_iter().map(str::to_owned).collect(),
                        presenter: pres.map(str::to_owned),
                        claims: groups
                            .into_iter()
                            .map(|g| ("groups".to_owned(), g.to_owned()))
                            .collect(),
                    }),
                }),
            },
        )
}

fn reason_parts(r: &Reason<'_>) -> (&'static str, Option<(String, String, usize)>) {
    match r {
        Reason::DeniedBy(x) => (
            "denied_by",
            Some((x.namespace.into(), x.name.into(), x.rule)),
        ),
        Reason::AllowedBy(x) => (
            "allowed_by",
            Some((x.namespace.into(), x.name.into(), x.rule)),
        ),
        Reason::NoAllowPolicy => ("no_allow_policy", None),
        Reason::NoAllowMatched => ("no_allow_matched", None),
    }
}

/// Names are drawn from a small pool, so duplicates happen; keep the first of each.
fn dedup(objects: Vec<PolicyObject>) -> Vec<PolicyObject> {
    let mut seen = std::collections::HashSet::new();
    objects
        .into_iter()
        .filter(|o| {
            seen.insert((
                o.kind(),
                o.metadata().namespace().to_owned(),
                o.metadata().name().to_owned(),
            ))
        })
        .collect()
}

/// Exact principals, most of them carried by generated requests.
const EXACT_PRINCIPALS: &[&str] = &[
    "cluster.local/ns/a/sa/x",
    "cluster.local/ns/b/sa/y",
    "td/ns/a/sa/y",
    "weird-principal",
    "cluster.local/ns/a/sa/z",
];

/// A rule that tests only exact peer principals (the shape the decision looks up by
/// principal instead of evaluating).
fn exact_principal_rule() -> impl Strategy<Value = Rule> {
    vec(vec(select(EXACT_PRINCIPALS), 1..=3), 1..=2).prop_map(|sources| Rule {
        from: Some(
            sources
                .into_iter()
                .map(|ps| RuleFrom {
                    source: Some(Source {
                        principals: Some(ps.into_iter().map(String::from).collect()),
                        ..Source::default()
                    }),
                })
                .collect(),
        ),
        ..Rule::default()
    })
}

/// Many policies on few workloads: mostly exact-principal rules, some wildcard or
/// other rules mixed in (also within one policy), all actions, some dry-run.
fn many_exact_principal_policies() -> impl Strategy<Value = Vec<PolicyObject>> {
    let rules = prop_oneof![
        1 => Just(None),
        6 => vec(prop_oneof![4 => exact_principal_rule(), 1 => rule()], 1..=3).prop_map(Some),
    ];
    let ap = (
        select(NAMESPACES),
        prop_oneof![2 => Just(None), 2 => Just(Some(sel(&[("app", "web")]))), 1 => selector()],
        prop_oneof![5 => Just(Action::Allow), 3 => Just(Action::Deny), 1 => Just(Action::Audit)],
        rules,
        prop_oneof![8 => Just(None), 1 => Just(Some("true"))],
    );
    (vec(ap, 10..=40), vec(authorization_policy(), 0..=4)).prop_map(|(exact, mixed)| {
        exact
            .into_iter()
            .map(|(ns, s, a, r, d)| (ns.to_owned(), s, a, r, d))
            .chain(mixed)
            .enumerate()
            .map(|(i, (ns, selector, action, rules, dry))| {
                PolicyObject::AuthorizationPolicy(AuthorizationPolicy {
                    api_version: ApiVersion::V1,
                    // Shuffled names, so that policy order differs from generation order.
                    metadata: meta(format!("p{:02}", (i * 37) % 100), &ns, None, dry),
                    spec: AuthorizationPolicySpec {
                        selector,
                        rules,
                        action: Some(action),
                        ..AuthorizationPolicySpec::default()
                    },
                })
            })
            .collect()
    })
}

/// Compares one decision of the compiled set with the reference evaluator.
fn check_against_reference(
    set: &PolicySet,
    objects: &[PolicyObject],
    mesh: &MeshConfig,
    owned: &OwnedRequest,
) -> Result<(), TestCaseError> {
    let parts = owned.parts();
    let req = parts.request();
    let d = set.decide(&req);
    let r = reference::decide(objects, mesh, &req);
    let (kind, rule) = reason_parts(&d.reason);
    prop_assert_eq!(kind, r.kind, "request {:?}", owned);
    prop_assert_eq!(rule, r.rule.clone());
    prop_assert_eq!(d.verdict == citadel_policy::Verdict::Allow, r.allow);
    prop_assert_eq!(
        d.audited_by
            .map(|a| (a.namespace.to_owned(), a.name.to_owned(), a.rule)),
        r.audit.clone()
    );
    prop_assert_eq!(d.dry_run.map(|x| reason_parts(&x)), r.dry_run.clone());
    prop_assert_eq!(d.skipped_allow_rules, r.skipped);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn exact_principal_index_agrees_with_reference(
        objects in many_exact_principal_policies(),
        reqs in vec(request(), 1..=8),
    ) {
        let objects = dedup(objects);
        let mesh = MeshConfig::default();
        let set = PolicySet::from_objects(objects.clone(), &mesh)
            .unwrap_or_else(|e| panic!("generated policies must be valid: {:#?}", e.diagnostics));
        for owned in &reqs {
            check_against_reference(&set, &objects, &mesh, owned)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_evaluator_agrees_with_reference(objects in policies(), reqs in vec(request(), 1..=6)) {
        let objects = dedup(objects);
        let mesh = MeshConfig::default();
        let set = PolicySet::from_objects(objects.clone(), &mesh)
            .unwrap_or_else(|e| panic!("generated policies must be valid: {:#?}", e.diagnostics));
        for owned in &reqs {
            let parts = owned.parts();
            let req = parts.request();
            let d = set.decide(&req);
            let r = reference::decide(&objects, &mesh, &req);
            let (kind, rule) = reason_parts(&d.reason);
            prop_assert_eq!(kind, r.kind, "request {:?}", owned);
            prop_assert_eq!(rule, r.rule.clone());
            prop_assert_eq!(d.verdict == citadel_policy::Verdict::Allow, r.allow);
            prop_assert_eq!(
                d.audited_by.map(|a| (a.namespace.to_owned(), a.name.to_owned(), a.rule)),
                r.audit.clone()
            );
            prop_assert_eq!(d.dry_run.map(|x| reason_parts(&x)), r.dry_run.clone());
            prop_assert_eq!(d.skipped_allow_rules, r.skipped);

            let m = set.resolve_mtls(&req.destination.workload, req.destination.port);
            let rm = reference::mtls(&objects, &mesh, &req);
            prop_assert_eq!(m.mode.as_str(), rm.mode);
            prop_assert_eq!(m.policy.map(|p| (p.namespace.to_owned(), p.name.to_owned())), rm.policy);
        }
    }
}
