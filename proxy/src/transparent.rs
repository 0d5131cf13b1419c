//! Transparent capture (`--transparent`): the iptables rules of
//! [`crate::iptables`] redirect a pod's inbound TCP to one listener and its
//! outbound TCP to another. Each captured connection's original destination is
//! read ([`OriginalDst`]); then
//!
//! - inbound: the original destination is the application. The connection takes
//!   the same path as an explicit inbound port ([`Inbound::handle`]) for the
//!   original port, with the protocol told by the first bytes unless the port is
//!   in `--tcp-ports`. The proxy connects to the application from `127.0.0.6`
//!   (or `::6`), which the rules never capture again;
//! - outbound: a destination in `--mesh-cidr` (or in `--peers`) gets mutual TLS
//!   with our ALPN, and must present exactly the `--peers` identity or else any
//!   SVID of our trust domain; every other destination gets its bytes unchanged.
//!
//! A redirect loop cannot form: the proxy refuses a connection whose original
//! destination is one of its capture listeners, or which comes from a socket it
//! opened itself (its upstream connections, bound before they connect, or the
//! `127.0.0.6` source), whatever the rules say.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel_identity::SpiffeId;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::cidr::Cidr;
use crate::config::Protocol;
use crate::detect::{Route, check_loop, route};
use crate::inbound::{AppSource, Inbound, Target};
use crate::metrics::ProxyMetrics;
use crate::original_dst::OriginalDst;
use crate::outbound::Mtls;

/// Local ports of the sockets the proxy opened towards upstreams, while open.
#[derive(Debug, Default)]
pub struct OwnSockets {
    ports: Mutex<HashSet<u16>>,
}

/// Removes its port from [`OwnSockets`] when dropped.
pub struct OwnPort {
    own: Arc<OwnSockets>,
    port: u16,
}

impl Drop for OwnPort {
    fn drop(&mut self) {
        self.own.lock().remove(&self.port);
    }
}

impl OwnSockets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `port` is the local port of a socket the proxy opened.
    pub fn contains(&self, port: u16) -> bool {
        self.lock().contains(&port)
    }

    /// Opens a socket towards `dst`, bound (so its port is known and recorded)
    /// before it connects: its SYN cannot reach a capture listener unrecorded.
    pub async fn connect(
        self: &Arc<Self>,
        dst: SocketAddr,
    ) -> std::io::Result<(TcpStream, OwnPort)> {
        let socket = match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        let any = match dst {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        socket.bind(any)?;
        let port = socket.local_addr()?.port();
        self.lock().insert(port);
        let guard = OwnPort {
            own: self.clone(),
            port,
        };
        let stream = socket.connect(dst).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, guard))
    }
}

/// Which capture listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Inbound (`15006`).
    Inbound,
    /// Outbound (`15001`).
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// What both capture listeners share.
pub struct Capture {
    /// The inbound path (its [`Inbound::app_source`] is set).
    pub inbound: Arc<Inbound>,
    /// Reads the original destination.
    pub original_dst: Arc<dyn OriginalDst>,
    /// Sockets the proxy opened.
    pub own: Arc<OwnSockets>,
    /// The source of connections to the application.
    pub app_source: AppSource,
    /// The ports of both capture listeners.
    pub capture_ports: Vec<u16>,
    /// Application ports served as opaque TCP.
    pub tcp_ports: HashSet<u16>,
    /// Mesh ranges.
    pub mesh_cidrs: Vec<Cidr>,
    /// Secure naming by address.
    pub peers: HashMap<IpAddr, SpiffeId>,
    /// mTLS client accepting any SVID of our trust domain.
    pub any_connector: TlsConnector,
    /// mTLS clients pinned to each `--peers` identity.
    pub peer_connectors: HashMap<IpAddr, TlsConnector>,
    /// Metrics.
    pub metrics: ProxyMetrics,
    /// Time to connect upstream.
    pub connect_timeout: Duration,
    /// Time for the upstream TLS handshake.
    pub handshake_timeout: Duration,
}

/// Accepts captured connections on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, direction: Direction, capture: Arc<Capture>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let capture = capture.clone();
                tokio::spawn(async move { capture.handle(stream, peer, direction).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, direction = direction.as_str(), "capture accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Capture {
    /// Serves one captured connection.
    pub async fn handle(&self, stream: TcpStream, peer: SocketAddr, direction: Direction) {
        let dir = direction.as_str();
        let original = match self.original_dst.original_dst(&stream) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%peer, direction = dir, error = %e, "captured connection refused: its original destination cannot be read");
                self.metrics.captured(dir, "no_original_dst");
                return;
            }
        };
        let Ok(local) = stream.local_addr() else {
            return;
        };
        let from_app_source = peer.ip() == IpAddr::V4(self.app_source.v4)
            || peer.ip() == IpAddr::V6(self.app_source.v6);
        // Every connection on the outbound listener comes from this host, so a
        // port of our own sockets there is our own traffic; inbound peers are
        // remote and only the application source can be ours.
        let own =
            from_app_source || (direction == Direction::Outbound && self.own.contains(peer.port()));
        if let Err(why) = check_loop(original, local, peer, &self.capture_ports, own) {
            tracing::error!(%peer, direction = dir, original_dst = %original, "captured connection refused as a redirect loop: {why}");
            self.metrics.captured(dir, "loop");
            return;
        }
        match direction {
            Direction::Inbound => {
                self.metrics.captured(dir, "inbound");
                let protocol = if self.tcp_ports.contains(&original.port()) {
                    Protocol::Tcp
                } else {
                    Protocol::Detect
                };
                let target = Target {
                    app: original,
                    protocol,
                };
                self.inbound.handle(stream, peer, target).await;
            }
            Direction::Outbound => self.outbound(stream, peer, original).await,
        }
    }

    async fn outbound(&self, app: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let decided = route(dst.ip(), &self.mesh_cidrs, &self.peers);
        let upstream = tokio::time::timeout(self.connect_timeout, self.own.connect(dst)).await;
        let (tcp, _own) = match upstream {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(%peer, upstream = %dst, error = %e, "cannot connect to the original destination");
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, upstream = %dst, "connecting to the original destination timed out");
                return;
            }
        };
        let target = dst.to_string();
        match decided {
            Route::Passthrough => {
                self.metrics.captured("outbound", "passthrough");
                tracing::debug!(%peer, upstream = %dst, "outside the mesh: passed through");
                let (mut app, mut tcp) = (app, tcp);
                if let Err(e) = tokio::io::copy_bidirectional(&mut app, &mut tcp).await {
                    tracing::debug!(upstream = %dst, error = %e, "passthrough connection ended with an error");
                }
            }
            Route::Mesh(expected) => {
                self.metrics.captured("outbound", "mesh");
                let (connector, expected) = match &expected {
                    Some(id) => match self.peer_connectors.get(&dst.ip()) {
                        Some(c) => (c, id.as_str()),
                        // Built from the same list: never, and never a weaker check.
                        None => return,
                    },
                    None => (&self.any_connector, "any SVID of the trust domain"),
                };
                let sni = dst.ip().to_string();
                let mtls = Mtls {
                    connector,
                    sni: &sni,
                    expected,
                    handshake_timeout: self.handshake_timeout,
                };
                mtls.copy(app, tcp, peer, &target).await;
            }
        }
    }
}
