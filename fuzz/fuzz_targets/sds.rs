//! A sequence of SDS `DiscoveryRequest`s (protobuf bytes, as they come off the
//! agent's socket) → the SDS state machine, in the order `serve_stream` applies
//! them: type URL check, ACK/NACK of the last response (`Sent::acked_bundle`),
//! `SdsSession::on_request`, the entitlement of every name, `build_response`.
//! A flag byte per request may point it at the last response (nonce, version)
//! or add the well-known names, so the fuzzer reaches ACKs and re-subscriptions
//! instead of stopping at stale nonces.
#![no_main]

use std::sync::Arc;

use arbitrary::Unstructured;
use citadel_agent::bundle::BundleState;
use citadel_agent::sds::{
    DEFAULT_NAME, ROOTCA_NAME, SdsSession, Sent, Verdict, build_response, check_entitlement,
    check_type_url,
};
use citadel_identity::{SpiffeId, TrustBundle, TrustDomain};
use citadel_proto::envoy::service::discovery::v3::DiscoveryRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const ROOT_DER: &[u8] = include_bytes!("../fixtures/root.der");

fn bundle() -> Option<Arc<BundleState>> {
    let td = TrustDomain::new("cluster.local").ok()?;
    let roots = vec![ROOT_DER.to_vec().into()];
    Some(Arc::new(BundleState::new(
        TrustBundle::new(td, roots).ok()?,
        7,
    )))
}

fn run(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let Ok(own_id) = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/workload") else {
        return Ok(());
    };
    let bundle = bundle();
    let mut session = SdsSession::default();
    let mut sent: Option<Sent> = None;
    let mut last_version: Option<String> = None;
    while !u.is_empty() {
        let flags: u8 = u.arbitrary()?;
        let len = u.int_in_range(0..=1024usize)?;
        let Ok(mut req) = DiscoveryRequest::decode(u.bytes(len)?) else {
            continue;
        };
        if let Some(s) = &sent {
            if flags & 1 != 0 {
                req.response_nonce = s.nonce.clone();
            }
            if flags & 2 != 0 {
                req.version_info = s.version.clone();
            }
        }
        for (bit, name) in [(4, ROOTCA_NAME), (8, DEFAULT_NAME), (16, own_id.as_str())] {
            if flags & bit != 0 {
                req.resource_names.push(name.to_owned());
            }
        }
        if check_type_url(&req.type_url).is_err() {
            return Ok(()); // the stream ends with an error status
        }
        if req.error_detail.is_none() {
            let _ = sent.as_ref().and_then(|s| s.acked_bundle(&req));
        }
        let mut pending = false;
        if session.on_request(&req.resource_names, &req.response_nonce) == Verdict::Respond {
            for name in session.names() {
                if check_entitlement(name, &own_id).is_err() {
                    return Ok(());
                }
            }
            pending = true;
            last_version = None;
        }
        if !pending {
            continue;
        }
        let b = if flags & 32 != 0 {
            bundle.clone()
        } else {
            None
        };
        let Some(mut response) =
            build_response(session.names(), &own_id, None, b.as_deref(), String::new())
        else {
            continue;
        };
        if last_version.as_deref() == Some(response.version_info.as_str()) {
            continue;
        }
        let _ = session.wants_certificate(&own_id);
        response.nonce = session.next_nonce();
        last_version = Some(response.version_info.clone());
        sent = Some(Sent {
            nonce: response.nonce.clone(),
            version: response.version_info.clone(),
            bundle_sequence: b
                .as_deref()
                .filter(|_| session.wants_bundle())
                .map(|b| b.sequence),
        });
        let _ = response.encode_to_vec();
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
