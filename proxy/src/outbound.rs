//! Outbound listeners: plain bytes from the application on 127.0.0.1, mutual TLS
//! 1.3 to the upstream with the workload's certificate, and the upstream refused
//! unless it presents exactly the SPIFFE ID configured (secure naming).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use citadel_identity::Escaped;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::config::OutboundSpec;

/// One outbound listener's shared pieces.
pub struct Outbound {
    /// The upstream and the identity it must have.
    pub spec: OutboundSpec,
    /// TLS client side (verifier pinned to `spec.spiffe_id`).
    pub connector: TlsConnector,
    /// Time to connect and to finish the handshake.
    pub connect_timeout: Duration,
    /// Time for the TLS handshake.
    pub handshake_timeout: Duration,
}

/// Accepts connections on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Small handshake and request writes must not wait for
                // Nagle's algorithm and the peer's delayed ACK (~40 ms).
                let _ = stream.set_nodelay(true);
                let outbound = outbound.clone();
                tokio::spawn(async move { outbound.handle(stream, peer).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Outbound {
    async fn handle(&self, app: TcpStream, peer: SocketAddr) {
        let spec = &self.spec;
        let target = format!("{}:{}", spec.host, spec.port);
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&target))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(%peer, upstream = %target, error = %e, "cannot connect to the upstream");
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, upstream = %target, "connecting to the upstream timed out");
                return;
            }
        };
        let mtls = Mtls {
            connector: &self.connector,
            sni: &spec.host,
            expected: spec.spiffe_id.as_str(),
            handshake_timeout: self.handshake_timeout,
        };
        mtls.copy(app, tcp, peer, &target).await;
    }
}

/// Originating mutual TLS on a connected upstream socket.
pub struct Mtls<'a> {
    /// TLS client side; its verifier judges the server's SPIFFE ID.
    pub connector: &'a TlsConnector,
    /// Sent as SNI when it is a valid name.
    pub sni: &'a str,
    /// What the server must be, for the logs.
    pub expected: &'a str,
    /// Time for the TLS handshake.
    pub handshake_timeout: Duration,
}

impl Mtls<'_> {
    /// Handshakes on `tcp`, then copies bytes both ways between `app` and the
    /// TLS session until either side ends. A refused handshake closes `app`.
    pub async fn copy(&self, mut app: TcpStream, tcp: TcpStream, peer: SocketAddr, target: &str) {
        let _ = tcp.set_nodelay(true);
        // The name is only sent as SNI; the verifier judges the SPIFFE ID alone.
        let name = ServerName::try_from(self.sni.to_owned())
            .or_else(|_| ServerName::try_from("citadel.invalid".to_owned()));
        let Ok(name) = name else {
            return;
        };
        let mut tls = match tokio::time::timeout(
            self.handshake_timeout,
            self.connector.connect(name, tcp),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(
                    %peer,
                    upstream = %target,
                    expected = %self.expected,
                    error = %Escaped(&e),
                    "upstream refused: TLS handshake failed (secure naming or trust)"
                );
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, upstream = %target, "TLS handshake with the upstream timed out");
                return;
            }
        };
        if let Err(e) = tokio::io::copy_bidirectional(&mut app, &mut tls).await {
            tracing::debug!(upstream = %target, error = %e, "outbound connection ended with an error");
        }
    }
}
