//! Policy text → load, validate, compile → decisions: the path every policy
//! source takes (files, the Kubernetes CRD watch and the CA's policy stream all
//! end in `Loader`), then `decide`, `effective_mtls`, the JWT providers and
//! `explain` for a few requests.
#![no_main]

use citadel_policy::explain;
use citadel_policy::{Loader, MeshConfig, OwnedHttp, OwnedJwt, OwnedRequest};
use libfuzzer_sys::fuzz_target;

fn requests() -> Vec<OwnedRequest> {
    let labels = vec![("app".to_owned(), "cart".to_owned())];
    let tcp = OwnedRequest {
        principal: Some("cluster.local/ns/shop/sa/frontend".into()),
        source_ip: "10.0.0.7".parse().ok(),
        namespace: "shop".into(),
        labels: labels.clone(),
        destination_ip: "10.0.0.9".parse().ok(),
        port: 8080,
        sni: Some("outbound_.8080_._.cart.shop.svc.cluster.local".into()),
        ..Default::default()
    };
    let http = OwnedRequest {
        principal: None,
        remote_ip: "192.168.1.1".parse().ok(),
        http: Some(OwnedHttp {
            method: "POST".into(),
            path: "/api/v1/items?x=1".into(),
            host: "cart.shop:8080".into(),
            headers: vec![("x-token".into(), "admin".into())],
            jwt: Some(OwnedJwt {
                principal: "https://issuer.example/alice".into(),
                audiences: vec!["citadel".into()],
                presenter: None,
                claims: vec![("groups".into(), "dev".into())],
            }),
        }),
        ..tcp.clone()
    };
    let other_ns = OwnedRequest {
        namespace: "istio-system".into(),
        labels: Vec::new(),
        port: 15443,
        ..tcp.clone()
    };
    vec![tcp, http, other_ns]
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut loader = Loader::new(MeshConfig::default());
    loader.add_source("fuzz.yaml", text);
    let _ = loader.has_errors();
    let Ok((set, _warnings)) = loader.finish() else {
        return;
    };
    for owned in requests() {
        let parts = owned.parts();
        let req = parts.request();
        let decision = set.decide(&req);
        let _ = decision.verdict;
        let _ = set.effective_mtls(&req.destination.workload, req.destination.port);
        let _ = set.jwt_providers(&req.destination.workload);
        let report = explain::check(&set, &req);
        let _ = explain::render_text(&report, &req);
        let _ = explain::render_json(&report);
    }
});
