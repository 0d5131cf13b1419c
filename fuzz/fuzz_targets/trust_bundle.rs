//! Trust-bundle updates as the agent applies them: `TrustBundleUpdate`
//! messages decoded from the CA's stream bytes, each through `apply_update` on
//! top of the bundle in force (the state then serves SDS `ROOTCA` and the
//! Workload API); and the identity crate's bundle readers (PEM as saved by the
//! agent or given with `--ca-bundle`, concatenated DER as the Workload API
//! carries it).
#![no_main]

use arbitrary::Unstructured;
use citadel_agent::bundle::{BundleState, apply_update};
use citadel_identity::{TrustBundle, TrustDomain};
use citadel_proto::citadel::v1::TrustBundleUpdate;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const ROOT_DER: &[u8] = include_bytes!("../fixtures/root.der");

fn updates(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let mut current: Option<BundleState> = None;
    while !u.is_empty() {
        let flags: u8 = u.arbitrary()?;
        let len = u.int_in_range(0..=4096usize)?;
        let Ok(mut update) = TrustBundleUpdate::decode(u.bytes(len)?) else {
            continue;
        };
        // Reach past the structural checks now and then with a real root.
        if flags & 1 != 0 {
            update.x509_authorities.push(ROOT_DER.to_vec());
        }
        if flags & 2 != 0 {
            update.trust_domain = "cluster.local".into();
        }
        if let Ok(next) = apply_update(current.as_ref(), &update) {
            if let Some(cur) = &current {
                assert!(next.sequence >= cur.sequence, "a bundle never goes back");
            }
            let _ = (next.pem(), next.der(), next.trust_domain_id());
            current = Some(next);
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(td) = TrustDomain::new("cluster.local") else {
        return;
    };
    match mode % 3 {
        0 => {
            let _ = updates(&mut Unstructured::new(rest));
        }
        1 => {
            if let Ok(text) = std::str::from_utf8(rest)
                && let Ok(b) = TrustBundle::from_pem(td, text)
            {
                let _ = b.to_concatenated_der();
            }
        }
        _ => {
            if let Ok(b) = TrustBundle::from_concatenated_der(td, rest) {
                let _ = b.to_pem();
            }
        }
    }
});
