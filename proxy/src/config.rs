//! The proxy's configuration: one struct, its listener specs parsed from
//! flags by pure functions, validated once before anything binds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use citadel_identity::{Backoff, SpiffeId};
use citadel_policy::MeshConfig;

/// The protocol of an inbound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Opaque TCP: one authorization decision per connection.
    Tcp,
    /// HTTP/1.1 and HTTP/2: one authorization decision per request.
    Http,
}

/// `--inbound PORT:APP_PORT[:http|:tcp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundSpec {
    /// The port listened on (all addresses).
    pub port: u16,
    /// The application's port on 127.0.0.1.
    pub app_port: u16,
    /// `tcp` unless given.
    pub protocol: Protocol,
}

/// `--outbound LOCAL_PORT=HOST:PORT,SPIFFE_ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundSpec {
    /// The port listened on, on 127.0.0.1.
    pub local_port: u16,
    /// The upstream host (name or IP).
    pub host: String,
    /// The upstream port.
    pub port: u16,
    /// The SPIFFE ID the upstream must present (secure naming).
    pub spiffe_id: SpiffeId,
}

/// A listener spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Wrong shape.
    #[error("{flag} {given:?}: expected {expected}")]
    Shape {
        /// `--inbound` or `--outbound`.
        flag: &'static str,
        /// What was given.
        given: String,
        /// The expected form.
        expected: &'static str,
    },
    /// A port is not a number in 1..=65535.
    #[error("{flag} {given:?}: {what} {port:?} is not a port number (1-65535)")]
    Port {
        /// `--inbound` or `--outbound`.
        flag: &'static str,
        /// What was given.
        given: String,
        /// Which port.
        what: &'static str,
        /// The text.
        port: String,
    },
    /// Unknown protocol.
    #[error("--inbound {given:?}: protocol {protocol:?} is neither tcp nor http")]
    Protocol {
        /// What was given.
        given: String,
        /// The text.
        protocol: String,
    },
    /// A SPIFFE ID that does not parse.
    #[error("--outbound {given:?}: {reason}")]
    SpiffeId {
        /// What was given.
        given: String,
        /// Why.
        reason: String,
    },
}

const INBOUND_FORM: &str = "PORT:APP_PORT[:tcp|:http]";
const OUTBOUND_FORM: &str = "LOCAL_PORT=HOST:PORT,SPIFFE_ID";

fn port(flag: &'static str, given: &str, what: &'static str, text: &str) -> Result<u16, SpecError> {
    match text.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(SpecError::Port {
            flag,
            given: given.to_owned(),
            what,
            port: text.to_owned(),
        }),
    }
}

/// Parses `PORT:APP_PORT[:tcp|:http]`.
pub fn parse_inbound(s: &str) -> Result<InboundSpec, SpecError> {
    let parts: Vec<&str> = s.split(':').collect();
    let (p, a, proto) = match parts.as_slice() {
        [p, a] => (*p, *a, None),
        [p, a, proto] => (*p, *a, Some(*proto)),
        _ => {
            return Err(SpecError::Shape {
                flag: "--inbound",
                given: s.to_owned(),
                expected: INBOUND_FORM,
            });
        }
    };
    let protocol = match proto {
        None | Some("tcp") => Protocol::Tcp,
        Some("http") => Protocol::Http,
        Some(other) => {
            return Err(SpecError::Protocol {
                given: s.to_owned(),
                protocol: other.to_owned(),
            });
        }
    };
    Ok(InboundSpec {
        port: port("--inbound", s, "PORT", p)?,
        app_port: port("--inbound", s, "APP_PORT", a)?,
        protocol,
    })
}

/// Parses `LOCAL_PORT=HOST:PORT,SPIFFE_ID` (an IPv6 host in brackets).
pub fn parse_outbound(s: &str) -> Result<OutboundSpec, SpecError> {
    let shape = || SpecError::Shape {
        flag: "--outbound",
        given: s.to_owned(),
        expected: OUTBOUND_FORM,
    };
    let (local, rest) = s.split_once('=').ok_or_else(shape)?;
    let (address, id) = rest.split_once(',').ok_or_else(shape)?;
    let (host, upstream_port) = address.rsplit_once(':').ok_or_else(shape)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(':') && !address.starts_with('[') {
        return Err(shape());
    }
    let spiffe_id = SpiffeId::parse(id).map_err(|e| SpecError::SpiffeId {
        given: s.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(OutboundSpec {
        local_port: port("--outbound", s, "LOCAL_PORT", local)?,
        host: host.to_owned(),
        port: port("--outbound", s, "PORT", upstream_port)?,
        spiffe_id,
    })
}

/// Everything the proxy needs to run.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The agent's Unix socket (SDS and the policy stream).
    pub agent_socket: PathBuf,
    /// Inbound listeners.
    pub inbound: Vec<InboundSpec>,
    /// Outbound listeners.
    pub outbound: Vec<OutboundSpec>,
    /// `/healthz/ready` and `/metrics`.
    pub admin: SocketAddr,
    /// The address inbound listeners bind (0.0.0.0; tests use 127.0.0.1).
    pub inbound_bind: std::net::IpAddr,
    /// How long a peer has to send its first bytes and finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// How long connecting to the application or an upstream may take.
    pub connect_timeout: Duration,
    /// How long an HTTP client has to send a whole request head.
    pub header_read_timeout: Duration,
    /// The largest HTTP request head accepted, in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Reconnection backoff towards the agent.
    pub backoff: Backoff,
    /// Mesh settings (the root namespace).
    pub mesh: MeshConfig,
}

impl ProxyConfig {
    /// Defaults for everything but the agent socket.
    pub fn new(agent_socket: PathBuf) -> Self {
        Self {
            agent_socket,
            inbound: Vec::new(),
            outbound: Vec::new(),
            admin: SocketAddr::from(([127, 0, 0, 1], 15021)),
            inbound_bind: std::net::IpAddr::from([0, 0, 0, 0]),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            backoff: Backoff::default(),
            mesh: MeshConfig::default(),
        }
    }

    /// Checks what can be checked before binding.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::BTreeSet::new();
        for p in self
            .inbound
            .iter()
            .map(|s| s.port)
            .chain(self.outbound.iter().map(|s| s.local_port))
        {
            // Port 0 (tests: any free port) never collides.
            if p != 0 && !seen.insert(p) {
                return Err(ConfigError::DuplicatePort(p));
            }
        }
        if self.inbound.is_empty() && self.outbound.is_empty() {
            return Err(ConfigError::NoListener);
        }
        if self.handshake_timeout.is_zero()
            || self.connect_timeout.is_zero()
            || self.header_read_timeout.is_zero()
        {
            return Err(ConfigError::ZeroTimeout);
        }
        Ok(())
    }
}

/// A configuration the proxy refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Two listeners on one port.
    #[error("port {0} is given to more than one --inbound/--outbound listener")]
    DuplicatePort(u16),
    /// Nothing to do.
    #[error("no --inbound or --outbound listener given")]
    NoListener,
    /// A zero timeout.
    #[error("timeouts must be greater than zero")]
    ZeroTimeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_defaults_to_tcp() {
        assert_eq!(
            parse_inbound("15006:8080").unwrap(),
            InboundSpec {
                port: 15006,
                app_port: 8080,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(parse_inbound("1:2:tcp").unwrap().protocol, Protocol::Tcp);
        assert_eq!(parse_inbound("1:2:http").unwrap().protocol, Protocol::Http);
    }

    #[test]
    fn inbound_errors_name_the_problem() {
        let e = parse_inbound("15006").unwrap_err().to_string();
        assert!(e.contains("PORT:APP_PORT"), "{e}");
        let e = parse_inbound("15006:0").unwrap_err().to_string();
        assert!(e.contains("APP_PORT \"0\""), "{e}");
        let e = parse_inbound("x:8080").unwrap_err().to_string();
        assert!(e.contains("PORT \"x\""), "{e}");
        let e = parse_inbound("1:70000").unwrap_err().to_string();
        assert!(e.contains("70000"), "{e}");
        let e = parse_inbound("1:2:udp").unwrap_err().to_string();
        assert!(e.contains("\"udp\""), "{e}");
        assert!(parse_inbound("1:2:tcp:x").is_err());
    }

    #[test]
    fn outbound_parses_host_port_and_spiffe_id() {
        let s =
            parse_outbound("9000=api.shop:15006,spiffe://cluster.local/ns/shop/sa/api").unwrap();
        assert_eq!(s.local_port, 9000);
        assert_eq!(s.host, "api.shop");
        assert_eq!(s.port, 15006);
        assert_eq!(
            s.spiffe_id.as_str(),
            "spiffe://cluster.local/ns/shop/sa/api"
        );
        let s = parse_outbound("9000=[::1]:15006,spiffe://td/x").unwrap();
        assert_eq!(s.host, "::1");
    }

    #[test]
    fn outbound_errors_name_the_problem() {
        for bad in [
            "9000",
            "9000=api:15006",
            "9000=api,spiffe://td/x",
            "9000=:15006,spiffe://td/x",
            "9000=::1:15006,spiffe://td/x",
        ] {
            let e = parse_outbound(bad).unwrap_err().to_string();
            assert!(e.contains("LOCAL_PORT=HOST:PORT,SPIFFE_ID"), "{bad}: {e}");
        }
        let e = parse_outbound("9000=api:15006,http://x").unwrap_err();
        assert!(matches!(e, SpecError::SpiffeId { .. }), "{e}");
        let e = parse_outbound("0=api:1,spiffe://td/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOCAL_PORT \"0\""), "{e}");
    }

    #[test]
    fn http_ports_are_accepted_at_start_up() {
        let mut c = ProxyConfig::new("/s".into());
        c.inbound.push(parse_inbound("15006:8080:http").unwrap());
        assert_eq!(c.validate(), Ok(()));
        c.header_read_timeout = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::ZeroTimeout));
    }

    #[test]
    fn one_port_one_listener() {
        let mut c = ProxyConfig::new("/s".into());
        c.inbound.push(parse_inbound("15006:8080").unwrap());
        c.outbound
            .push(parse_outbound("15006=api:1,spiffe://td/x").unwrap());
        assert_eq!(c.validate(), Err(ConfigError::DuplicatePort(15006)));
        assert_eq!(
            ProxyConfig::new("/s".into()).validate(),
            Err(ConfigError::NoListener)
        );
    }
}
