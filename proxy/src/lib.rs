//! `citadel-proxy`: the data plane. Mutual TLS 1.3 between workloads with
//! certificates from the node agent over SDS, Istio PeerAuthentication and
//! AuthorizationPolicy enforced once per inbound TCP connection or per HTTP request, secure naming
//! on outbound connections.
//!
//! - [`config`]: listener specs and the one config struct, validated once;
//! - [`decide`]: the pure core (sniffing, admission, which open connections a
//!   new policy closes);
//! - [`agent_client`]: SDS and policy streams from the agent;
//! - [`inbound`], [`outbound`]: the listeners; [`l7`]: HTTP inbound ports, with
//!   [`framing`] (request smuggling checks);
//! - [`app`]: [`app::start`] and the admin endpoint.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod agent_client;
pub mod app;
pub mod config;
pub mod decide;
pub mod framing;
pub mod inbound;
pub mod l7;
pub mod metrics;
pub mod outbound;
pub mod request_auth;

/// Now, in unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A sample in `[0, 1)` for backoff jitter (from the clock's nanoseconds: spreading
/// retries needs no cryptographic randomness).
pub fn random_unit() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}
