//! Resource limits of the CA's public port: what one peer or caller may hold and ask for,
//! so that a flood (many connections, slow handshakes, many requests) cannot starve the
//! other clients.
//!
//! - Connections ([`crate::conn_limits`]): a cap on open connections (excess ones are
//!   closed at once), a TLS handshake deadline, an idle timeout, HTTP/2 keepalive and a
//!   bound on concurrent streams per connection.
//! - Requests ([`RequestGate`]): a token bucket per authenticated caller and a global bound
//!   on concurrent issuances in which first issuances go before renewals
//!   ([`crate::admission`]); join-token lookups, which reach the database before the caller
//!   is known, are format-checked and rate-limited per peer address first
//!   ([`JoinLookupGate`]). Refusals are `ResourceExhausted` and counted in
//!   `citadel_ca_limit_rejections_total{limit=...}`.
//!
//! The defaults are meant to be invisible to a healthy mesh: the per-caller rate (100/s,
//! burst 1000) lets a node agent start 1,000 workloads at once and leaves `citadel-load`
//! (64 identities) far below it, and 128 issuances in flight is more than two cores sign.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::admission::{Admission, AdmissionLimits, Permit, Rate, RateLimiter, renewal_lane};
use crate::auth::{AuthMethod, Caller};
use crate::duration::parse_duration_secs;
use crate::issuer::IssueError;
use crate::metrics::CaMetrics;

/// Every limit of the public port.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Connections one client IP address keeps open at once, so that one address cannot
    /// take every slot of `max_connections`.
    pub max_connections_per_address: usize,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight for this long is closed; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// HTTP/2 streams (requests) a connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Interval of HTTP/2 pings to a peer; `None` = no pings.
    pub keepalive_interval: Option<Duration>,
    /// A peer that does not answer a ping within this is disconnected.
    pub keepalive_timeout: Duration,
    /// The global bound on concurrent issuances.
    pub admission: AdmissionLimits,
    /// Requests per authenticated caller identity.
    pub caller_rate: Rate,
    /// Join-token lookups per peer IP address.
    pub join_token_rate: Rate,
    /// Callers and addresses tracked by the rate limits at most.
    pub max_tracked: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_address: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(300)),
            max_concurrent_streams: 128,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            admission: AdmissionLimits {
                max_in_flight: 128,
                max_renewals_in_flight: 96,
                max_queued: 2048,
                max_wait: Duration::from_secs(5),
            },
            caller_rate: Rate {
                per_sec: 100.0,
                burst: 1000.0,
            },
            join_token_rate: Rate {
                per_sec: 1.0,
                burst: 10.0,
            },
            max_tracked: 100_000,
        }
    }
}

/// `citadel serve` flags of the limits (defaults are [`Limits::default`]).
#[derive(clap::Args, Debug, Clone)]
pub struct LimitsArgs {
    /// Connections the CSR API keeps open at once; further connections are closed as soon
    /// as they are accepted (counted in citadel_ca_limit_rejections_total{limit="connections"}).
    #[arg(long, env = "CITADEL_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Connections one client IP address keeps open at once; its further connections are
    /// closed as soon as they are accepted
    /// (citadel_ca_limit_rejections_total{limit="connections_per_address"}). A node agent
    /// needs a handful; many pods behind one NAT address need more.
    #[arg(
        long,
        env = "CITADEL_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256
    )]
    pub max_connections_per_address: usize,
    /// Time a client has to complete the TLS handshake before its connection is closed.
    #[arg(long, env = "CITADEL_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration_secs)]
    pub tls_handshake_timeout: i64,
    /// A connection without a request in flight for this long is closed (an open
    /// trust-bundle or policy stream is a request in flight); 0s = never.
    #[arg(long, env = "CITADEL_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration_secs)]
    pub idle_timeout: i64,
    /// HTTP/2 streams (concurrent requests) per connection.
    #[arg(long, env = "CITADEL_MAX_CONCURRENT_STREAMS", default_value_t = 128)]
    pub max_concurrent_streams: u32,
    /// Interval of HTTP/2 keepalive pings to each client; 0s = no pings.
    #[arg(long, env = "CITADEL_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration_secs)]
    pub http2_keepalive_interval: i64,
    /// A client that does not answer a keepalive ping within this is disconnected.
    #[arg(long, env = "CITADEL_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration_secs)]
    pub http2_keepalive_timeout: i64,
    /// Certificate requests signed and recorded at once (after authentication); more wait.
    #[arg(long, env = "CITADEL_MAX_ISSUANCES_IN_FLIGHT", default_value_t = 128)]
    pub max_issuances_in_flight: usize,
    /// Share of those a renewal (a client certificate renewing itself) may hold, in (0, 1];
    /// the rest stays for first issuances, which also go first out of the queue.
    #[arg(long, env = "CITADEL_RENEWAL_SHARE", default_value_t = 0.75)]
    pub renewal_share: f64,
    /// Certificate requests waiting for a slot; more get ResourceExhausted at once.
    #[arg(long, env = "CITADEL_MAX_QUEUED_ISSUANCES", default_value_t = 2048)]
    pub max_queued_issuances: usize,
    /// How long a request waits for a slot before it gets ResourceExhausted.
    #[arg(long, env = "CITADEL_MAX_ISSUANCE_WAIT", default_value = "5s", value_parser = parse_duration_secs)]
    pub max_issuance_wait: i64,
    /// Certificate requests per second per authenticated caller identity (a node agent
    /// asking for its workloads is one caller); 0 = no limit.
    #[arg(long, env = "CITADEL_CALLER_RATE", default_value_t = 100.0)]
    pub caller_rate: f64,
    /// Requests a caller may send at once after a quiet period (a node agent starting all
    /// its workloads).
    #[arg(long, env = "CITADEL_CALLER_BURST", default_value_t = 1000.0)]
    pub caller_burst: f64,
    /// Join-token lookups per second per client IP address, checked before the store is
    /// asked; 0 = no limit.
    #[arg(long, env = "CITADEL_JOIN_TOKEN_RATE", default_value_t = 1.0)]
    pub join_token_rate: f64,
    /// Join-token lookups a client IP address may make at once.
    #[arg(long, env = "CITADEL_JOIN_TOKEN_BURST", default_value_t = 10.0)]
    pub join_token_burst: f64,
}

fn secs(v: i64) -> Duration {
    Duration::from_secs(v.max(0).unsigned_abs())
}

impl LimitsArgs {
    /// The validated limits.
    pub fn into_limits(self) -> Result<Limits, String> {
        if self.max_connections == 0
            || self.max_connections_per_address == 0
            || self.max_concurrent_streams == 0
        {
            return Err("--max-connections, --max-connections-per-address and \
                 --max-concurrent-streams must be at least 1"
                .into());
        }
        if self.max_issuances_in_flight == 0 {
            return Err("--max-issuances-in-flight must be at least 1".into());
        }
        if !(self.renewal_share > 0.0 && self.renewal_share <= 1.0) {
            return Err("--renewal-share must be in (0, 1]".into());
        }
        if self.tls_handshake_timeout < 1 || self.http2_keepalive_timeout < 1 {
            return Err(
                "--tls-handshake-timeout and --http2-keepalive-timeout must be at least 1s".into(),
            );
        }
        let rates = [
            self.caller_rate,
            self.caller_burst,
            self.join_token_rate,
            self.join_token_burst,
        ];
        if rates.iter().any(|r| !r.is_finite() || *r < 0.0)
            || (self.caller_rate > 0.0 && self.caller_burst < 1.0)
            || (self.join_token_rate > 0.0 && self.join_token_burst < 1.0)
        {
            return Err("rates must be 0 (off) or positive, with a burst of at least 1".into());
        }
        let renewals = (self.max_issuances_in_flight as f64 * self.renewal_share).floor() as usize;
        Ok(Limits {
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
            handshake_timeout: secs(self.tls_handshake_timeout),
            idle_timeout: (self.idle_timeout > 0).then(|| secs(self.idle_timeout)),
            max_concurrent_streams: self.max_concurrent_streams,
            keepalive_interval: (self.http2_keepalive_interval > 0)
                .then(|| secs(self.http2_keepalive_interval)),
            keepalive_timeout: secs(self.http2_keepalive_timeout),
            admission: AdmissionLimits {
                max_in_flight: self.max_issuances_in_flight,
                max_renewals_in_flight: renewals.max(1),
                max_queued: self.max_queued_issuances,
                max_wait: secs(self.max_issuance_wait),
            },
            caller_rate: Rate {
                per_sec: self.caller_rate,
                burst: self.caller_burst,
            },
            join_token_rate: Rate {
                per_sec: self.join_token_rate,
                burst: self.join_token_burst,
            },
            max_tracked: Limits::default().max_tracked,
        })
    }
}

/// The per-caller rate limit and the concurrency bound, applied by the issuer once the
/// caller is authenticated (so nobody can spend another identity's budget).
pub struct RequestGate {
    callers: RateLimiter,
    admission: Arc<Admission>,
    metrics: Arc<CaMetrics>,
}

impl RequestGate {
    /// A gate with `limits`, counting refusals in `metrics`.
    pub fn new(limits: &Limits, metrics: Arc<CaMetrics>) -> Self {
        Self {
            callers: RateLimiter::new(limits.caller_rate, limits.max_tracked),
            admission: Admission::new(limits.admission),
            metrics,
        }
    }

    /// Takes a token of `caller`'s bucket, then waits for an issuance slot in its lane.
    pub async fn admit(&self, caller: &Caller, impersonating: bool) -> Result<Permit, IssueError> {
        if let Err(retry) = self.callers.check(caller.identity.as_str(), Instant::now()) {
            self.metrics.limited("caller_rate");
            return Err(IssueError::ResourceExhausted(format!(
                "rate limit: {} sends certificate requests faster than the CA allows; retry in {} ms",
                caller.identity,
                retry.as_millis().max(1)
            )));
        }
        let lane = renewal_lane(
            caller.method == AuthMethod::ClientCertificate,
            impersonating,
        );
        self.admission.admit(lane).await.map_err(|e| {
            self.metrics.limited(match e {
                crate::admission::Overloaded::QueueFull(_) => "queue_full",
                crate::admission::Overloaded::Timeout(_) => "queue_timeout",
            });
            IssueError::ResourceExhausted(e.to_string())
        })
    }
}

/// Bounds unauthenticated join-token lookups before they reach the store: a token of the
/// wrong shape is refused without a lookup, and each peer address has a token bucket.
pub struct JoinLookupGate {
    peers: RateLimiter,
    metrics: Arc<CaMetrics>,
}

impl JoinLookupGate {
    /// A gate with `limits`, counting refusals in `metrics`.
    pub fn new(limits: &Limits, metrics: Arc<CaMetrics>) -> Self {
        Self {
            peers: RateLimiter::new(limits.join_token_rate, limits.max_tracked),
            metrics,
        }
    }

    /// Checks a join-token-looking bearer `token` from `peer` (no lookup happened yet).
    pub fn check(&self, token: &str, peer: Option<IpAddr>) -> Result<(), IssueError> {
        if !crate::join_token::is_well_formed(token) {
            self.metrics.limited("join_token_format");
            return Err(IssueError::Unauthenticated(
                crate::auth::AuthError::Rejected(crate::auth::Rejection {
                    method: AuthMethod::JoinToken.as_str(),
                    reason: "malformed join token".into(),
                }),
            ));
        }
        let key = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        self.peers.check(&key, Instant::now()).map_err(|retry| {
            self.metrics.limited("join_token_rate");
            IssueError::ResourceExhausted(format!(
                "too many join-token attempts from {key}; retry in {} ms",
                retry.as_millis().max(1)
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        limits: LimitsArgs,
    }

    #[test]
    fn flag_defaults_are_the_documented_defaults() {
        let limits = Cli::parse_from(["x"]).limits.into_limits().unwrap();
        assert_eq!(limits, Limits::default());
    }

    #[test]
    fn flags_are_validated() {
        for bad in [
            vec!["x", "--renewal-share", "0"],
            vec!["x", "--max-connections", "0"],
            vec!["x", "--max-connections-per-address", "0"],
            vec!["x", "--caller-rate", "5", "--caller-burst", "0"],
            vec!["x", "--join-token-rate=-1"],
        ] {
            let parsed = Cli::try_parse_from(bad.clone())
                .map_err(|e| e.to_string())
                .and_then(|c| c.limits.into_limits());
            assert!(parsed.is_err(), "{bad:?}");
        }
        let off = Cli::parse_from(["x", "--idle-timeout", "0s", "--caller-rate", "0"])
            .limits
            .into_limits()
            .unwrap();
        assert_eq!(off.idle_timeout, None);
        assert!(!off.caller_rate.is_on());
    }
}
