//! Inbound TCP listeners: peek, TLS (or plaintext where the port's mode allows),
//! decide once per connection, then copy bytes to the application on 127.0.0.1.
//! Open connections are registered with their facts so that a new policy version
//! closes those it no longer allows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use citadel_policy::{Workload, principal_from_spiffe_id};
use citadel_tls::peer_spiffe_id;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::Protocol;
use crate::decide::{
    ConnFacts, HttpVersion, PolicyState, Sniffed, admit, http_version, sniff, to_close,
    transport_allowed,
};
use crate::l7::{self, HttpServing};
use crate::metrics::ProxyMetrics;

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

/// What every inbound connection shares.
pub struct Inbound {
    /// TLS server side (client certificate required and verified as an SVID).
    pub acceptor: TlsAcceptor,
    /// The same for HTTP ports, offering ALPN `h2` and `http/1.1`.
    pub http_acceptor: TlsAcceptor,
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
}

/// Accepts connections on `listener` for `app_port` until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    app_port: u16,
    protocol: Protocol,
    inbound: Arc<Inbound>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Small handshake and request writes must not wait for
                // Nagle's algorithm and the peer's delayed ACK (~40 ms).
                let _ = stream.set_nodelay(true);
                let inbound = inbound.clone();
                tokio::spawn(async move { inbound.handle(stream, peer, app_port, protocol).await });
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

fn current(policy: &watch::Receiver<Option<Arc<PolicyState>>>) -> Option<Arc<PolicyState>> {
    policy.borrow().clone()
}

impl Inbound {
    async fn handle(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        app_port: u16,
        protocol: Protocol,
    ) {
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
        let tls = kind == Sniffed::Tls;
        let labels: Vec<(&str, &str)> = state
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mode = state.set.effective_mtls(
            &Workload {
                namespace: &state.namespace,
                labels: &labels,
            },
            app_port,
        );
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
        let acceptor = match protocol {
            Protocol::Tcp => &self.acceptor,
            Protocol::Http => &self.http_acceptor,
        };
        if tls {
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
                    match protocol {
                        Protocol::Tcp => self.decide_and_forward(conn, facts, peer).await,
                        Protocol::Http => {
                            let h2 = conn.get_ref().1.alpn_protocol() == Some(b"h2");
                            l7::serve_connection(self.clone(), conn, facts, peer, h2).await;
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, port = app_port, error = %e, "TLS handshake refused");
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
            match protocol {
                Protocol::Tcp => self.decide_and_forward(stream, facts, peer).await,
                Protocol::Http => {
                    let version =
                        tokio::time::timeout(self.handshake_timeout, peek_http_version(&stream))
                            .await;
                    let Ok(Ok(version)) = version else {
                        tracing::debug!(%peer, "HTTP connection closed before its first request line");
                        return;
                    };
                    let h2 = version == HttpVersion::Http2;
                    l7::serve_connection(self.clone(), stream, facts, peer, h2).await;
                }
            }
        }
    }

    async fn decide_and_forward<S>(&self, mut client: S, facts: ConnFacts, peer: SocketAddr)
    where
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
        let app = SocketAddr::from(([127, 0, 0, 1], facts.app_port));
        let mut upstream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(app))
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
