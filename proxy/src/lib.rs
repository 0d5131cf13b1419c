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
//! - [`transparent`]: capture listeners (`--transparent`), with [`detect`]
//!   (pure), [`original_dst`] (the `SO_ORIGINAL_DST` seam), [`cidr`], [`prefixed`];
//! - [`iptables`]: the nat rules that redirect a pod's traffic to the proxy;
//! - [`app`]: [`app::start`] and the admin endpoint.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod agent_client;
pub mod app;
pub mod cidr;
pub mod config;
pub mod decide;
pub mod detect;
pub mod framing;
pub mod inbound;
pub mod iptables;
pub mod l7;
pub mod metrics;
pub mod original_dst;
pub mod outbound;
pub mod prefixed;
pub mod request_auth;
pub mod transparent;

/// Now, in unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A sample in `[0, 1)` for backoff jitter, from the system's random source
/// (so proxies restarted together do not retry in step).
pub fn random_unit() -> f64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No randomness at all: no jitter rather than no retry.
        return 0.0;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn jitter_samples_are_in_range_and_differ() {
        let samples: Vec<f64> = (0..64).map(|_| super::random_unit()).collect();
        assert!(samples.iter().all(|s| (0.0..1.0).contains(s)));
        let first = samples.first().copied().unwrap_or_default();
        assert!(samples.iter().any(|s| *s != first), "{samples:?}");
    }
}
