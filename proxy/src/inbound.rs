//! Inbound connections: peek, TLS (or plaintext where the port's mode allows),
//! then either decide once per connection and copy bytes to the application, or
//! serve HTTP with one decision per request ([`crate::l7`]). Explicit listeners
//! and the transparent inbound capture share this path; they differ in the
//! [`Target`]. Open connections are registered with their facts so that a new
//! policy version closes those it no longer allows.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel_identity::Escaped;
use citadel_policy::{Mode, principal_from_spiffe_id};
use citadel_tls::{alpn, peer_spiffe_id};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::Protocol;
use crate::decide::{
    ConnFacts, HttpVersion, PolicyState, Sniffed, admit, http_version, sniff, to_close,
    transport_allowed,
};
use crate::detect::{AppProtocol, Hello, app_protocol, client_hello_alpn};
use crate::l7::{self, HttpServing};
use crate::metrics::ProxyMetrics;
use crate::prefixed::Prefixed;

/// Open inbound connections and how to close each.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, (ConnFacts, oneshot::Sender<String>)>>,
}

/// Removes its connection from the registry when dropped.
pub struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (ConnFacts, oneshot::Sender<String>)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an open connection; the receiver fires with the reason when a
    /// policy closes it.
    pub fn register(self: &Arc<Self>, facts: ConnFacts) -> (Registered, oneshot::Receiver<String>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, (facts, tx));
        (
            Registered {
                registry: self.clone(),
                id,
            },
            rx,
        )
    }

    /// Number of open connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every open connection `state` no longer allows; returns how many.
    pub fn enforce(&self, state: &PolicyState, metrics: &ProxyMetrics) -> usize {
        let mut open = self.lock();
        let closing = to_close(state, open.iter().map(|(id, (facts, _))| (*id, facts)));
        for (id, admission) in &closing {
            if let Some((facts, tx)) = open.remove(id) {
                tracing::warn!(
                    source = facts.peer_id.as_deref().unwrap_or("plaintext"),
                    destination = %state.spiffe_id,
                    port = facts.app_port,
                    policy_version = %state.version,
                    reason = %admission.reason,
                    "open connection closed: the new policy denies it"
                );
                metrics.connection(
                    facts.principal.as_deref(),
                    facts.app_port,
                    "closed_by_policy",
                );
                let _ = tx.send(admission.reason.clone());
            }
        }
        closing.len()
    }
}

/// The loopback source of connections to the application in transparent mode:
/// the iptables rules return it before any redirect, so the proxy's connection
/// to the application is never captured again.
#[derive(Debug, Clone, Copy)]
pub struct AppSource {
    /// For IPv4 applications (`127.0.0.6`).
    pub v4: Ipv4Addr,
    /// For IPv6 applications (`::6`).
    pub v6: Ipv6Addr,
}

/// What every inbound connection shares.
pub struct Inbound {
    /// TLS server side (client certificate required and verified as an SVID),
    /// no ALPN: for clients that offer none the server could select.
    pub acceptor: TlsAcceptor,
    /// The same, selecting one of [`alpn::SERVER`] (ours, `h2`, `http/1.1`, `istio`).
    pub alpn_acceptor: TlsAcceptor,
    /// HTTP serving and the pooled client to the application.
    pub http: HttpServing,
    /// The policies of the moment.
    pub policy: watch::Receiver<Option<Arc<PolicyState>>>,
    /// Open connections.
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: ProxyMetrics,
    /// Time for the first bytes and the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to connect to the application.
    pub connect_timeout: Duration,
    /// Where connections to the application come from (`None`: the kernel
    /// chooses, for explicit listeners).
    pub app_source: Option<AppSource>,
}

/// Where an inbound connection goes once admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The application's address; its port is the port PeerAuthentication and
    /// AuthorizationPolicy are decided for.
    pub app: SocketAddr,
    /// How its bytes are served.
    pub protocol: Protocol,
}

/// Accepts connections on `listener` for `127.0.0.1:app_port` until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    app_port: u16,
    protocol: Protocol,
    inbound: Arc<Inbound>,
) {
    let target = Target {
        app: SocketAddr::from(([127, 0, 0, 1], app_port)),
        protocol,
    };
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Small handshake and request writes must not wait for
                // Nagle's algorithm and the peer's delayed ACK (~40 ms).
                let _ = stream.set_nodelay(true);
                let inbound = inbound.clone();
                tokio::spawn(async move { inbound.handle(stream, peer, target).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Peeks until the first bytes tell TLS from plaintext (nothing is consumed).
async fn peek_kind(stream: &TcpStream) -> std::io::Result<Sniffed> {
    let mut buf = [0u8; 2];
    loop {
        let n = stream.peek(&mut buf).await?;
        let first = buf.get(..n).unwrap_or_default();
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match sniff(first) {
            Sniffed::NeedMore => tokio::time::sleep(Duration::from_millis(5)).await,
            kind => return Ok(kind),
        }
    }
}

/// The most of a ClientHello the proxy peeks at (one full TLS record).
const MAX_HELLO_PEEK: usize = 16 * 1024 + 5;

/// Peeks until a whole ClientHello is there and reads its ALPN offer (nothing
/// is consumed); [`Hello::Invalid`] when it is not one, or larger than a record.
async fn peek_hello(stream: &TcpStream) -> std::io::Result<Hello> {
    let mut buf = vec![0u8; MAX_HELLO_PEEK];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match client_hello_alpn(buf.get(..n).unwrap_or_default()) {
            Hello::NeedMore if n == buf.len() => return Ok(Hello::Invalid),
            Hello::NeedMore => tokio::time::sleep(Duration::from_millis(5)).await,
            hello => return Ok(hello),
        }
    }
}

/// Peeks until the first bytes tell HTTP/2 prior knowledge from HTTP/1.
async fn peek_http_version(stream: &TcpStream) -> std::io::Result<HttpVersion> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match http_version(buf.get(..n).unwrap_or_default()) {
            HttpVersion::NeedMore => tokio::time::sleep(Duration::from_millis(5)).await,
            v => return Ok(v),
        }
    }
}

/// Peeks until the first bytes tell HTTP/1, HTTP/2 or opaque bytes apart.
async fn peek_app_protocol(stream: &TcpStream) -> std::io::Result<AppProtocol> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match app_protocol(buf.get(..n).unwrap_or_default()) {
            AppProtocol::NeedMore => tokio::time::sleep(Duration::from_millis(5)).await,
            p => return Ok(p),
        }
    }
}

/// Reads the first bytes of a decrypted stream until they tell the application
/// protocol; the bytes are served again before the rest.
async fn read_app_protocol<S: AsyncRead + Unpin>(
    mut io: S,
) -> std::io::Result<(Prefixed<S>, AppProtocol)> {
    let mut first = Vec::with_capacity(24);
    let mut buf = [0u8; 24];
    loop {
        let want = 24usize.saturating_sub(first.len()).max(1);
        let n = io.read(buf.get_mut(..want).unwrap_or_default()).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        first.extend_from_slice(buf.get(..n).unwrap_or_default());
        match app_protocol(&first) {
            AppProtocol::NeedMore if first.len() < 24 => {}
            AppProtocol::NeedMore => return Ok((Prefixed::new(first, io), AppProtocol::Opaque)),
            p => return Ok((Prefixed::new(first, io), p)),
        }
    }
}

fn current(policy: &watch::Receiver<Option<Arc<PolicyState>>>) -> Option<Arc<PolicyState>> {
    policy.borrow().clone()
}

impl Inbound {
    /// Serves one accepted connection for `target` until it ends.
    pub async fn handle(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, target: Target) {
        let app_port = target.app.port();
        let Some(state) = current(&self.policy) else {
            tracing::debug!(%peer, "connection refused: no policy version yet");
            return;
        };
        let kind = match tokio::time::timeout(self.handshake_timeout, peek_kind(&stream)).await {
            Ok(Ok(kind)) => kind,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection closed before its first bytes");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, port = app_port, "connection closed: nothing sent within the handshake timeout");
                return;
            }
        };
        let mut tls = kind == Sniffed::Tls;
        let mode = state.with_workload(|w| state.set.effective_mtls(w, app_port));
        let mut offered: Vec<Vec<u8>> = Vec::new();
        if tls {
            match tokio::time::timeout(self.handshake_timeout, peek_hello(&stream)).await {
                Ok(Ok(Hello::Alpn(values))) => {
                    // PERMISSIVE, as Istio's filter chains: TLS that offers no
                    // mesh ALPN is not a mesh peer's; its bytes are the
                    // application's business and pass through as opaque TCP.
                    if mode == Mode::Permissive && !alpn::is_mesh(values.iter().map(Vec::as_slice))
                    {
                        tracing::debug!(%peer, port = app_port, "TLS without a mesh ALPN: passed through as opaque TCP");
                        tls = false;
                    }
                    offered = values;
                }
                // Not a ClientHello rustls reads: the handshake below refuses it.
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "connection closed within its ClientHello");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, port = app_port, "TLS handshake timed out");
                    return;
                }
            }
        }
        let passthrough = kind == Sniffed::Tls && !tls;
        if !transport_allowed(mode, tls) {
            let what = if tls { "mTLS" } else { "plaintext" };
            tracing::warn!(
                source = %peer,
                destination = %state.spiffe_id,
                port = app_port,
                "connection denied: {what} refused by PeerAuthentication mode {mode}"
            );
            self.metrics.connection(Some("unknown"), app_port, "deny");
            return;
        }
        if tls {
            let acceptor = if alpn::server_can_select(offered.iter().map(Vec::as_slice)) {
                &self.alpn_acceptor
            } else {
                &self.acceptor
            };
            match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(conn)) => {
                    let id = peer_spiffe_id(conn.get_ref().1.peer_certificates());
                    let Some(id) = id else {
                        tracing::warn!(%peer, "connection closed: the client presented no SVID");
                        return;
                    };
                    let principal = principal_from_spiffe_id(id.as_str()).ok();
                    let facts = ConnFacts {
                        tls: true,
                        peer_id: Some(id.to_string()),
                        principal,
                        source_ip: Some(peer.ip()),
                        app_port,
                    };
                    let by_alpn = match conn.get_ref().1.alpn_protocol() {
                        Some(alpn::H2) => Some(AppProtocol::Http2),
                        Some(alpn::HTTP11) => Some(AppProtocol::Http1),
                        _ => None,
                    };
                    match (target.protocol, by_alpn) {
                        (Protocol::Tcp, _) => {
                            self.decide_and_forward(conn, facts, peer, target.app).await;
                        }
                        (_, Some(p)) => {
                            self.serve_as(conn, facts, peer, target, p).await;
                        }
                        (_, None) => {
                            // Our own ALPN, `istio` or none: the first decrypted
                            // bytes tell the protocol.
                            let read = tokio::time::timeout(
                                self.handshake_timeout,
                                read_app_protocol(conn),
                            )
                            .await;
                            let Ok(Ok((io, p))) = read else {
                                tracing::debug!(%peer, "mTLS connection closed before its first bytes");
                                return;
                            };
                            self.serve_as(io, facts, peer, target, p).await;
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, port = app_port, error = %Escaped(&e), "TLS handshake refused");
                    self.metrics.connection(Some("unknown"), app_port, "deny");
                }
                Err(_) => {
                    tracing::info!(%peer, port = app_port, "TLS handshake timed out");
                }
            }
        } else {
            let facts = ConnFacts {
                tls: false,
                peer_id: None,
                principal: None,
                source_ip: Some(peer.ip()),
                app_port,
            };
            if passthrough {
                self.decide_and_forward(stream, facts, peer, target.app)
                    .await;
                return;
            }
            match target.protocol {
                Protocol::Tcp => {
                    self.decide_and_forward(stream, facts, peer, target.app)
                        .await;
                }
                Protocol::Http => {
                    let version =
                        tokio::time::timeout(self.handshake_timeout, peek_http_version(&stream))
                            .await;
                    let Ok(Ok(version)) = version else {
                        tracing::debug!(%peer, "HTTP connection closed before its first request line");
                        return;
                    };
                    let h2 = version == HttpVersion::Http2;
                    l7::serve_connection(self.clone(), stream, facts, peer, target.app, h2).await;
                }
                Protocol::Detect => {
                    let p =
                        tokio::time::timeout(self.handshake_timeout, peek_app_protocol(&stream))
                            .await;
                    let Ok(Ok(p)) = p else {
                        tracing::debug!(%peer, "connection closed before its first bytes told its protocol");
                        return;
                    };
                    self.serve_as(stream, facts, peer, target, p).await;
                }
            }
        }
    }

    /// Serves an admitted transport as `protocol` found: HTTP per request, else
    /// opaque TCP (an HTTP port serves whatever it got as HTTP/1, which refuses it).
    async fn serve_as<S>(
        self: &Arc<Self>,
        io: S,
        facts: ConnFacts,
        peer: SocketAddr,
        target: Target,
        protocol: AppProtocol,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match (target.protocol, protocol) {
            (_, AppProtocol::Http2) => {
                l7::serve_connection(self.clone(), io, facts, peer, target.app, true).await;
            }
            (Protocol::Http, _) | (_, AppProtocol::Http1) => {
                l7::serve_connection(self.clone(), io, facts, peer, target.app, false).await;
            }
            _ => self.decide_and_forward(io, facts, peer, target.app).await,
        }
    }

    /// Connects to the application, from [`Self::app_source`] when set.
    async fn connect_app(&self, app: SocketAddr) -> std::io::Result<TcpStream> {
        let Some(source) = self.app_source else {
            return TcpStream::connect(app).await;
        };
        let (socket, ip) = match app {
            SocketAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(source.v4)),
            SocketAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(source.v6)),
        };
        socket.bind(SocketAddr::new(ip, 0))?;
        socket.connect(app).await
    }

    async fn decide_and_forward<S>(
        &self,
        mut client: S,
        facts: ConnFacts,
        peer: SocketAddr,
        app: SocketAddr,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Registered before deciding: a policy version published from here on is
        // enforced on this connection by the registry.
        let (registered, mut closed) = self.registry.register(facts.clone());
        let Some(state) = current(&self.policy) else {
            return;
        };
        let admission = admit(&state, &facts);
        let source = facts.peer_id.as_deref().unwrap_or("plaintext");
        if let Some(dry_run) = &admission.dry_run {
            tracing::info!(
                source,
                destination = %state.spiffe_id,
                port = facts.app_port,
                dry_run = %dry_run,
                "dry-run policies would decide"
            );
        }
        if !admission.allowed() {
            tracing::warn!(
                source,
                source_ip = %peer.ip(),
                destination = %state.spiffe_id,
                port = facts.app_port,
                policy_version = %state.version,
                reason = %admission.reason,
                "connection denied"
            );
            self.metrics
                .connection(facts.principal.as_deref(), facts.app_port, "deny");
            return;
        }
        tracing::debug!(source, port = facts.app_port, reason = %admission.reason, "connection allowed");
        self.metrics
            .connection(facts.principal.as_deref(), facts.app_port, "allow");
        let mut upstream = match tokio::time::timeout(self.connect_timeout, self.connect_app(app))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(source, port = facts.app_port, error = %e, "the application refused the connection; closing the client's");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    source,
                    port = facts.app_port,
                    "connecting to the application timed out; closing the client's"
                );
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = r {
                    tracing::debug!(source, error = %e, "inbound connection ended with an error");
                }
            }
            _ = &mut closed => {}
        }
        drop(registered);
    }
}
