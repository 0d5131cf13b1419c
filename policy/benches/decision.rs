//! Decision cost with 10, 1,000 and 10,000 AuthorizationPolicies spread over 1,000
//! namespaces. Policy `i` lives in namespace `ns{i % 1000}` and selects
//! `app: svc{i / 1000}`, so the destination (`ns0`, `app=svc0`) has exactly one
//! applicable policy in every configuration, plus the same mesh-wide DENY policy; the
//! rest are unrelated and must not cost anything. After criterion's report, a plain
//! timing loop prints ns/decision and the 10,000/10 ratio (target <= 1.5).
//!
//! The `same_workload` group is the other shape: 10 or 1,000 ALLOW policies that all
//! apply to one workload, each allowing one exact principal. It is timed for a
//! caller allowed by the last policy and for a caller no policy names (denied).

use std::hint::black_box;
use std::time::Instant;

use citadel_policy::{MeshConfig, OwnedHttp, OwnedRequest, PolicySet, Verdict, load_str};
use criterion::{BenchmarkId, Criterion};

const NAMESPACES: usize = 1000;
const SIZES: [usize; 3] = [10, 1_000, 10_000];

fn policy_yaml(i: usize) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p{i}
  namespace: ns{ns}
spec:
  selector:
    matchLabels:
      app: svc{svc}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/client{i}/sa/a", "cluster.local/ns/ns{ns}/sa/frontend"]
    to:
    - operation:
        methods: ["GET", "POST"]
        paths: ["/api/*", "/healthz"]
  - from:
    - source:
        namespaces: ["ops"]
    to:
    - operation:
        ports: ["9090"]
---
"#,
        ns = i % NAMESPACES,
        svc = i / NAMESPACES
    )
}

const MESH_DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-plaintext
  namespace: istio-system
spec:
  action: DENY
  rules:
  - from:
    - source:
        notPrincipals: ["*"]
"#;

fn build(n: usize) -> PolicySet {
    let mut text = String::with_capacity(n * 600);
    for i in 0..n {
        text.push_str(&policy_yaml(i));
    }
    text.push_str(MESH_DENY);
    load_str("bench.yaml", &text, &MeshConfig::default()).expect("valid bench policies")
}

fn request() -> OwnedRequest {
    OwnedRequest {
        principal: Some("cluster.local/ns/ns0/sa/frontend".into()),
        source_ip: Some("10.0.0.1".parse().unwrap()),
        remote_ip: None,
        namespace: "ns0".into(),
        labels: vec![
            ("app".into(), "svc0".into()),
            ("version".into(), "v1".into()),
        ],
        destination_ip: Some("10.0.0.2".parse().unwrap()),
        port: 8080,
        sni: None,
        http: Some(OwnedHttp {
            method: "GET".into(),
            path: "/api/items/42?x=1".into(),
            host: "svc0.ns0".into(),
            headers: vec![("user-agent".into(), "bench".into())],
            jwt: None,
        }),
    }
}

const SAME_WORKLOAD_SIZES: [usize; 2] = [10, 1_000];

/// `n` ALLOW policies in `shop`, all selecting `app: cart`; policy `i` allows only
/// `cluster.local/ns/shop/sa/client-{i}`.
fn build_same_workload(n: usize) -> PolicySet {
    let mut text = String::with_capacity(n * 300);
    for i in 0..n {
        text.push_str(&format!(
            r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-{i:05}
  namespace: shop
spec:
  selector:
    matchLabels:
      app: cart
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/client-{i}"]
---
"#
        ));
    }
    load_str("bench.yaml", &text, &MeshConfig::default()).expect("valid bench policies")
}

fn same_workload_request(principal: String) -> OwnedRequest {
    OwnedRequest {
        principal: Some(principal),
        source_ip: Some("10.0.0.1".parse().unwrap()),
        namespace: "shop".into(),
        labels: vec![("app".into(), "cart".into())],
        destination_ip: Some("10.0.0.2".parse().unwrap()),
        port: 8080,
        ..Default::default()
    }
}

fn same_workload_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("same_workload");
    for n in SAME_WORKLOAD_SIZES {
        let set = build_same_workload(n);
        let cases = [
            (
                "last_matches",
                format!("cluster.local/ns/shop/sa/client-{}", n - 1),
                Verdict::Allow,
            ),
            (
                "none_matches",
                "cluster.local/ns/shop/sa/nobody".to_owned(),
                Verdict::Deny,
            ),
        ];
        for (case, principal, verdict) in cases {
            let owned = same_workload_request(principal);
            let parts = owned.parts();
            let req = parts.request();
            assert_eq!(set.decide(&req).verdict, verdict);
            group.bench_with_input(BenchmarkId::new(case, n), &set, |b, set| {
                b.iter(|| set.decide(black_box(&req)))
            });
        }
    }
    group.finish();
}

fn sets() -> Vec<(usize, PolicySet)> {
    SIZES.iter().map(|&n| (n, build(n))).collect()
}

fn criterion_benches(c: &mut Criterion, sets: &[(usize, PolicySet)]) {
    let owned = request();
    let parts = owned.parts();
    let req = parts.request();
    let mut group = c.benchmark_group("decision");
    for (n, set) in sets {
        assert_eq!(set.decide(&req).verdict, Verdict::Allow);
        group.bench_with_input(BenchmarkId::new("policies", n), set, |b, set| {
            b.iter(|| set.decide(black_box(&req)))
        });
    }
    group.finish();
}

/// Best of several timed batches per set, in ns per decision. The sets are
/// measured round-robin so that background load hits all of them alike, and the
/// minimum filters out batches slowed by other processes on a shared machine.
fn ns_per_decision(sets: &[(usize, PolicySet)]) -> Vec<f64> {
    let owned = request();
    let parts = owned.parts();
    let req = parts.request();
    const BATCH: u32 = 20_000;
    let mut best = vec![f64::INFINITY; sets.len()];
    for _round in 0..15 {
        for (slot, (_, set)) in best.iter_mut().zip(sets) {
            let start = Instant::now();
            for _ in 0..BATCH {
                black_box(set.decide(black_box(&req)));
            }
            let t = start.elapsed().as_nanos() as f64 / f64::from(BATCH);
            *slot = slot.min(t);
        }
    }
    best
}

fn main() {
    let sets = sets();
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &sets);
    same_workload_benches(&mut c);
    c.final_summary();

    println!("\nplain timing (best of 15 interleaved batches of 20,000 decisions, same request):");
    let times = ns_per_decision(&sets);
    for ((n, _), t) in sets.iter().zip(&times) {
        println!("  {n:>6} policies over {NAMESPACES} namespaces: {t:8.1} ns/decision");
    }
    println!(
        "  ratio 10,000 / 10 = {:.2} (target <= 1.5)",
        times[times.len() - 1] / times[0]
    );
}
