//! CSR bytes → the issuer's checks: the PEM (as `IstioCertificateRequest.csr`
//! carries it) or DER wrapped in PEM, through `parse_and_verify`, then what the
//! issuer applies to a verified CSR: the requested names against the caller's
//! identity, and a requested URI through `authorize` as an impersonation.
#![no_main]

use citadel_ca::auth::{AuthMethod, Caller};
use citadel_ca::csr::parse_and_verify;
use citadel_ca::issuer::{authorize, check_requested_names};
use citadel_identity::{SpiffeId, TrustDomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let pem_text = if mode & 1 == 0 {
        // The gRPC field is a string: only UTF-8 reaches the issuer.
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        text.to_owned()
    } else {
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", rest.to_vec()))
    };
    let Ok(csr) = parse_and_verify(&pem_text) else {
        return;
    };
    let (Ok(td), Ok(own)) = (
        TrustDomain::new("cluster.local"),
        SpiffeId::parse("spiffe://cluster.local/ns/default/sa/workload"),
    ) else {
        return;
    };
    let _ = check_requested_names(&own, &csr.requested_uris, &csr.requested_other_sans);
    let caller = Caller {
        identity: own,
        method: AuthMethod::ClientCertificate,
        node: Some("node-1".into()),
        pod: None,
        pod_uid: None,
        certificate_serial: Some("01".into()),
    };
    for uri in &csr.requested_uris {
        if let Ok(granted) = authorize(&caller, Some(uri), &td) {
            let _ = granted;
        }
        if let Ok(id) = SpiffeId::parse(uri) {
            let _ = check_requested_names(&id, &csr.requested_uris, &csr.requested_other_sans);
        }
    }
});
