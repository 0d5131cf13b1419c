//! The Citadel node agent.
//!
//! One per node. It attests the workload on the other end of its Unix
//! socket ([`attest`]), generates that workload's keys in memory, obtains
//! certificates from the CA and rotates them ([`manager`]), and serves them
//! over Envoy SDS v3 ([`sds`]) and the SPIFFE Workload API
//! ([`workload_api`]) on that one socket ([`server`], [`socket`]). Its own
//! identity comes from a join token ([`node`]); the trust bundle from the
//! CA's stream ([`bundle`]); the policy set from the CA's policy stream
//! ([`policy`]), of which each workload gets the part that applies to it
//! ([`workload_policy`]).

#![deny(missing_docs)]

pub mod app;
pub mod attest;
pub mod authority;
pub mod bundle;
pub mod ca_client;
pub mod entries;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod files;
pub mod http;
pub mod k8s;
pub mod manager;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod propagation;
pub mod response_stream;
pub mod sds;
pub mod server;
pub mod socket;
pub mod svid;
pub mod workload_api;
pub mod workload_policy;

/// Unix seconds now. The one place the agent reads the wall clock for
/// certificate decisions; the decisions themselves take time as an argument.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A uniform sample in `[0, 1)` from the system's random source, for
/// jitter. Falls back to 0.5 (no spreading, still correct) if the source
/// fails.
pub fn random_unit() -> f64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_be_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}
