//! The proxy as a library: one validated [`ProxyConfig`], and [`start`] returning a
//! [`RunningProxy`] with the bound addresses that owns every task it spawned.
//! [`start_with`] takes the certificate, bundle and policy sources directly (tests).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use citadel_tls::{
    CertResolver, ExpectedServer, SharedBundle, SpiffeClientVerifier, SpiffeServerVerifier,
    provider,
};
use rustls::{ClientConfig, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::agent_client::{self, IdentitySinks};
use crate::config::{ConfigError, InboundSpec, OutboundSpec, ProxyConfig, TransparentConfig};
use crate::decide::PolicyState;
use crate::inbound::{self, AppSource, Inbound, Registry};
use crate::l7::{HttpLimits, HttpServing};
use crate::metrics::ProxyMetrics;
use crate::original_dst::{OriginalDst, SystemOriginalDst};
use crate::outbound::{self, Outbound};
use crate::transparent::{self, Capture, Direction, OwnSockets};
use crate::unix_now;

/// Why the proxy did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// rustls refused the TLS settings.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where certificates, the bundle and the policies come from.
#[derive(Clone)]
pub struct Inputs {
    /// The workload certificate of the moment.
    pub certs: Arc<CertResolver>,
    /// The trust bundle of the moment.
    pub bundle: SharedBundle,
    /// The policies of the moment.
    pub policy: watch::Receiver<Option<Arc<PolicyState>>>,
    /// notAfter of the certificate (unix seconds; 0 = unknown), for the expiry gauge.
    pub not_after: Arc<AtomicI64>,
}

/// A started proxy.
pub struct RunningProxy {
    /// Each inbound listener and the address it is bound to.
    pub inbound: Vec<(InboundSpec, SocketAddr)>,
    /// Each outbound listener and the address it is bound to.
    pub outbound: Vec<(OutboundSpec, SocketAddr)>,
    /// The capture listeners (inbound, outbound) with `--transparent`: the IPv4
    /// addresses they are bound to.
    pub capture: Option<(SocketAddr, SocketAddr)>,
    /// `/healthz/ready` and `/metrics`.
    pub admin: SocketAddr,
    /// Open inbound connections.
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: ProxyMetrics,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningProxy {
    /// Stops every listener and background task (open connections end with the runtime).
    pub fn shutdown(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

/// Starts the proxy with its identity and policies from the agent's socket.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    config.validate()?;
    let certs = Arc::new(CertResolver::new(provider()));
    let bundle = SharedBundle::default();
    let sinks = IdentitySinks::new(certs.clone(), bundle.clone());
    let (policy_tx, policy_rx) = watch::channel(None);
    let inputs = Inputs {
        certs,
        bundle,
        policy: policy_rx,
        not_after: sinks.not_after.clone(),
    };
    let mut running = start_with(config.clone(), inputs).await?;
    let socket = config.agent_socket.clone();
    running.tasks.push(tokio::spawn(agent_client::follow_sds(
        socket.clone(),
        agent_client::DEFAULT,
        sinks.clone(),
        config.backoff,
    )));
    running.tasks.push(tokio::spawn(agent_client::follow_sds(
        socket.clone(),
        agent_client::ROOTCA,
        sinks.clone(),
        config.backoff,
    )));
    running
        .tasks
        .push(tokio::spawn(agent_client::expire_certificate(sinks)));
    running
        .tasks
        .push(tokio::spawn(agent_client::follow_policies(
            socket,
            config.mesh.clone(),
            policy_tx,
            config.backoff,
        )));
    Ok(running)
}

fn server_config(inputs: &Inputs, alpn: &[&[u8]]) -> Result<ServerConfig, StartError> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        inputs.bundle.clone(),
        true,
        provider(),
    ));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(inputs.certs.clone());
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The mTLS client side: the server must be `expected`; the session offers our
/// ALPN (then Istio's `istio`) so that the server knows its peer is a proxy.
fn client_config(inputs: &Inputs, expected: ExpectedServer) -> Result<ClientConfig, StartError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        inputs.bundle.clone(),
        expected,
        provider(),
    ));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(inputs.certs.clone());
    config.alpn_protocols = citadel_tls::alpn::CLIENT
        .iter()
        .map(|p| p.to_vec())
        .collect();
    Ok(config)
}

fn connector(inputs: &Inputs, expected: ExpectedServer) -> Result<TlsConnector, StartError> {
    Ok(TlsConnector::from(Arc::new(client_config(
        inputs, expected,
    )?)))
}

/// Binds `[::]:port` for IPv6 only, beside the IPv4 listener; `None` (logged)
/// where the host has no IPv6.
fn bind_v6_only(port: u16) -> Option<TcpListener> {
    let attempt = || -> std::io::Result<TcpListener> {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
        s.set_only_v6(true)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
        s.listen(1024)?;
        s.set_nonblocking(true)?;
        TcpListener::from_std(s.into())
    };
    match attempt() {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(port, error = %e, "no IPv6 capture listener");
            None
        }
    }
}

async fn bind(what: String, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_err = |source| StartError::Bind {
        what: what.clone(),
        addr,
        source,
    };
    let l = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = l.local_addr().map_err(bind_err)?;
    Ok((l, local))
}

/// Starts the listeners and the admin endpoint over the given sources.
pub async fn start_with(config: ProxyConfig, inputs: Inputs) -> Result<RunningProxy, StartError> {
    start_with_original_dst(config, inputs, Arc::new(SystemOriginalDst)).await
}

/// As [`start_with`], captured connections' original destinations read by
/// `original_dst` (tests pass a fake).
pub async fn start_with_original_dst(
    config: ProxyConfig,
    inputs: Inputs,
    original_dst: Arc<dyn OriginalDst>,
) -> Result<RunningProxy, StartError> {
    config.validate()?;
    tracing::info!(?config, "starting the proxy");
    let metrics = ProxyMetrics::new();
    let registry = Arc::new(Registry::default());
    let mut tasks = Vec::new();

    let limits = HttpLimits {
        header_read_timeout: config.header_read_timeout,
        max_header_bytes: config.max_header_bytes,
        connect_timeout: config.connect_timeout,
    };
    let acceptor = TlsAcceptor::from(Arc::new(server_config(&inputs, &[])?));
    let alpn_acceptor = TlsAcceptor::from(Arc::new(server_config(
        &inputs,
        &citadel_tls::alpn::SERVER,
    )?));
    let inbound_with = |http: HttpServing, app_source: Option<AppSource>| {
        Arc::new(Inbound {
            acceptor: acceptor.clone(),
            alpn_acceptor: alpn_acceptor.clone(),
            http,
            policy: inputs.policy.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            handshake_timeout: config.handshake_timeout,
            connect_timeout: config.connect_timeout,
            app_source,
        })
    };
    let inbound_shared = inbound_with(HttpServing::new(limits), None);
    let mut inbound_bound = Vec::new();
    for spec in &config.inbound {
        let (l, addr) = bind(
            format!("--inbound {}:{}", spec.port, spec.app_port),
            SocketAddr::new(config.inbound_bind, spec.port),
        )
        .await?;
        inbound_bound.push((*spec, addr));
        tasks.push(tokio::spawn(inbound::serve(
            l,
            spec.app_port,
            spec.protocol,
            inbound_shared.clone(),
        )));
    }
    let mut outbound_bound = Vec::new();
    for spec in &config.outbound {
        let (l, addr) = bind(
            format!("--outbound {}", spec.local_port),
            SocketAddr::from(([127, 0, 0, 1], spec.local_port)),
        )
        .await?;
        let shared = Arc::new(Outbound {
            spec: spec.clone(),
            connector: connector(&inputs, ExpectedServer::Exactly(spec.spiffe_id.clone()))?,
            connect_timeout: config.connect_timeout,
            handshake_timeout: config.handshake_timeout,
        });
        outbound_bound.push((spec.clone(), addr));
        tasks.push(tokio::spawn(outbound::serve(l, shared)));
    }

    let mut capture = None;
    if let Some(t) = &config.transparent {
        let source = AppSource {
            v4: t.app_source_v4,
            v6: t.app_source_v6,
        };
        let inbound_t = inbound_with(
            HttpServing::with_source(limits, Some((source.v4, source.v6))),
            Some(source),
        );
        let (inbound_l, inbound_addr) = bind(
            "--transparent inbound capture".to_owned(),
            SocketAddr::new(config.inbound_bind, t.inbound_port),
        )
        .await?;
        let (outbound_l, outbound_addr) = bind(
            "--transparent outbound capture".to_owned(),
            SocketAddr::new(config.inbound_bind, t.outbound_port),
        )
        .await?;
        let shared = Arc::new(capture_of(
            t,
            &inputs,
            inbound_t,
            original_dst,
            &metrics,
            &config,
            vec![inbound_addr.port(), outbound_addr.port()],
        )?);
        let mut listeners = vec![
            (inbound_l, Direction::Inbound),
            (outbound_l, Direction::Outbound),
        ];
        if config.inbound_bind.is_unspecified() {
            for (port, direction) in [
                (inbound_addr.port(), Direction::Inbound),
                (outbound_addr.port(), Direction::Outbound),
            ] {
                if let Some(l) = bind_v6_only(port) {
                    listeners.push((l, direction));
                }
            }
        }
        for (l, direction) in listeners {
            tasks.push(tokio::spawn(transparent::serve(
                l,
                direction,
                shared.clone(),
            )));
        }
        capture = Some((inbound_addr, outbound_addr));
    }

    // Every policy version: the gauge, and open connections it no longer allows closed.
    let mut policy = inputs.policy.clone();
    let (r, m) = (registry.clone(), metrics.clone());
    tasks.push(tokio::spawn(async move {
        loop {
            let state = policy.borrow_and_update().clone();
            if let Some(state) = state {
                m.policy_version(&state.version);
                let closed = r.enforce(&state, &m);
                if closed > 0 {
                    tracing::info!(version = %state.version, closed, "policy version closed open connections");
                }
            }
            if policy.changed().await.is_err() {
                return;
            }
        }
    }));

    let (admin_listener, admin) = bind("--admin".to_owned(), config.admin).await?;
    let router = admin_router(AdminState {
        inputs,
        metrics: metrics.clone(),
    });
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(admin_listener, router).await {
            tracing::error!(error = %e, "admin endpoint failed");
        }
    }));
    tracing::info!(%admin, inbound = ?inbound_bound, outbound = ?outbound_bound, capture = ?capture, "proxy listening");
    Ok(RunningProxy {
        inbound: inbound_bound,
        outbound: outbound_bound,
        capture,
        admin,
        registry,
        metrics,
        tasks,
    })
}

fn capture_of(
    t: &TransparentConfig,
    inputs: &Inputs,
    inbound: Arc<Inbound>,
    original_dst: Arc<dyn OriginalDst>,
    metrics: &ProxyMetrics,
    config: &ProxyConfig,
    capture_ports: Vec<u16>,
) -> Result<Capture, StartError> {
    let mut peer_connectors = std::collections::HashMap::new();
    for (ip, id) in &t.peers {
        peer_connectors.insert(*ip, connector(inputs, ExpectedServer::Exactly(id.clone()))?);
    }
    Ok(Capture {
        app_source: inbound.app_source.unwrap_or(AppSource {
            v4: t.app_source_v4,
            v6: t.app_source_v6,
        }),
        inbound,
        original_dst,
        own: Arc::new(OwnSockets::default()),
        capture_ports,
        tcp_ports: t.tcp_ports.iter().copied().collect(),
        mesh_cidrs: t.mesh_cidrs.clone(),
        peers: t.peers.iter().cloned().collect(),
        any_connector: connector(inputs, ExpectedServer::AnyInTrustDomain)?,
        peer_connectors,
        metrics: metrics.clone(),
        connect_timeout: config.connect_timeout,
        handshake_timeout: config.handshake_timeout,
    })
}

#[derive(Clone)]
struct AdminState {
    inputs: Inputs,
    metrics: ProxyMetrics,
}

fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// What readiness lacks, or `None` when ready.
pub fn missing(has_cert: bool, has_bundle: bool, policy_version: Option<&str>) -> Option<String> {
    let mut lacks = Vec::new();
    if !has_cert {
        lacks.push("a certificate");
    }
    if !has_bundle {
        lacks.push("a trust bundle");
    }
    if policy_version.is_none() {
        lacks.push("a policy version");
    }
    (!lacks.is_empty()).then(|| format!("not ready: no {} yet\n", lacks.join(", no ")))
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    let version = s.inputs.policy.borrow().as_ref().map(|p| p.version.clone());
    match missing(
        s.inputs.certs.current().is_some(),
        s.inputs.bundle.get().is_some(),
        version.as_deref(),
    ) {
        None => (
            StatusCode::OK,
            format!("ready: policy version {}\n", version.unwrap_or_default()),
        ),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let not_after = s.inputs.not_after.load(Ordering::Relaxed);
    let left = if not_after == 0 || s.inputs.certs.current().is_none() {
        0.0
    } else {
        (not_after - unix_now()) as f64
    };
    s.metrics.expiry(left);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::missing;

    #[test]
    fn ready_needs_certificate_bundle_and_policy_version() {
        assert_eq!(missing(true, true, Some("v1")), None);
        let m = missing(false, true, Some("v1")).unwrap();
        assert!(m.contains("certificate"), "{m}");
        let m = missing(true, true, None).unwrap();
        assert!(m.contains("policy version"), "{m}");
        let m = missing(true, false, Some("v")).unwrap();
        assert!(m.contains("trust bundle"), "{m}");
    }
}
