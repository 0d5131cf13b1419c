//! The proxy's configuration: one struct, its listener specs parsed from
//! flags by pure functions, validated once before anything binds.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use citadel_identity::{Backoff, SpiffeId};
use citadel_policy::MeshConfig;

use crate::cidr::Cidr;

/// The protocol of an inbound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Opaque TCP: one authorization decision per connection.
    Tcp,
    /// HTTP/1.1 and HTTP/2: one authorization decision per request.
    Http,
    /// Told by the first bytes (transparent capture): an HTTP/1.1 request line or
    /// the HTTP/2 preface is served as [`Protocol::Http`], anything else as
    /// [`Protocol::Tcp`].
    Detect,
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

/// `--transparent`: the capture listeners and where captured traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransparentConfig {
    /// Inbound capture port (iptables redirects inbound TCP here).
    pub inbound_port: u16,
    /// Outbound capture port (iptables redirects outbound TCP here).
    pub outbound_port: u16,
    /// Destinations inside these ranges are mesh peers (mTLS); others pass through.
    pub mesh_cidrs: Vec<Cidr>,
    /// Application ports served as opaque TCP without looking at their bytes.
    pub tcp_ports: Vec<u16>,
    /// Secure naming: the SPIFFE ID each of these addresses must present.
    pub peers: Vec<(IpAddr, SpiffeId)>,
    /// The loopback source of connections to the application, which the
    /// iptables rules never capture (Istio's `127.0.0.6`).
    pub app_source_v4: std::net::Ipv4Addr,
    /// The same for IPv6 (`::6`).
    pub app_source_v6: std::net::Ipv6Addr,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        TransparentConfig {
            inbound_port: 15006,
            outbound_port: 15001,
            mesh_cidrs: Vec::new(),
            tcp_ports: Vec::new(),
            peers: Vec::new(),
            app_source_v4: std::net::Ipv4Addr::new(127, 0, 0, 6),
            app_source_v6: std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6),
        }
    }
}

/// A `--peers` file that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--peers line {line}: {reason} (expected `IP SPIFFE_ID`)")]
pub struct PeersError {
    /// 1-based line number.
    pub line: usize,
    /// Why.
    pub reason: String,
}

/// Parses a `--peers` file: one `IP SPIFFE_ID` per line; blank lines and `#`
/// comments are skipped. An address given twice is refused.
pub fn parse_peers(text: &str) -> Result<Vec<(IpAddr, SpiffeId)>, PeersError> {
    let mut out: Vec<(IpAddr, SpiffeId)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason: String| PeersError {
            line: i + 1,
            reason,
        };
        let mut words = line.split_whitespace();
        let (Some(ip), Some(id), None) = (words.next(), words.next(), words.next()) else {
            return Err(err(format!("{line:?} is not two words")));
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| err(format!("{ip:?} is not an IP address")))?;
        let id = SpiffeId::parse(id).map_err(|e| err(e.to_string()))?;
        if out.iter().any(|(seen, _)| *seen == ip) {
            return Err(err(format!("{ip} is given twice")));
        }
        out.push((ip, id));
    }
    Ok(out)
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
    /// Transparent capture, when on.
    pub transparent: Option<TransparentConfig>,
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
            transparent: None,
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
            .chain(
                self.transparent
                    .iter()
                    .flat_map(|t| [t.inbound_port, t.outbound_port]),
            )
        {
            // Port 0 (tests: any free port) never collides.
            if p != 0 && !seen.insert(p) {
                return Err(ConfigError::DuplicatePort(p));
            }
        }
        if self.inbound.is_empty() && self.outbound.is_empty() && self.transparent.is_none() {
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
    #[error("port {0} is given to more than one --inbound/--outbound/capture listener")]
    DuplicatePort(u16),
    /// Nothing to do.
    #[error("no --inbound or --outbound listener given, and not --transparent")]
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
    fn peers_file_maps_addresses_to_spiffe_ids() {
        let p = parse_peers(
            "# pods\n10.0.0.2 spiffe://cluster.local/ns/shop/sa/api\n\nfd00::2 spiffe://td/x # v6\n",
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].0, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(p[1].1.as_str(), "spiffe://td/x");
    }

    #[test]
    fn rejects_peers_lines_that_do_not_parse() {
        for (bad, line) in [
            ("10.0.0.2", 1),
            ("\nx spiffe://td/a", 2),
            ("10.0.0.2 http://x", 1),
            ("10.0.0.2 spiffe://td/a extra", 1),
            ("10.0.0.2 spiffe://td/a\n10.0.0.2 spiffe://td/b", 2),
        ] {
            let e = parse_peers(bad).unwrap_err();
            assert_eq!(e.line, line, "{bad}: {e}");
        }
    }

    #[test]
    fn transparent_alone_is_a_listener_and_its_ports_are_checked() {
        let mut c = ProxyConfig::new("/s".into());
        c.transparent = Some(TransparentConfig::default());
        assert_eq!(c.validate(), Ok(()));
        c.inbound.push(parse_inbound("15006:8080").unwrap());
        assert_eq!(c.validate(), Err(ConfigError::DuplicatePort(15006)));
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
