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
use citadel_identity::SpiffeId;
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
use crate::config::{ConfigError, InboundSpec, OutboundSpec, ProxyConfig};
use crate::decide::PolicyState;
use crate::inbound::{self, Inbound, Registry};
use crate::l7::{HttpLimits, HttpServing};
use crate::metrics::ProxyMetrics;
use crate::outbound::{self, Outbound};
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

fn client_config(inputs: &Inputs, expected: &SpiffeId) -> Result<ClientConfig, StartError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        inputs.bundle.clone(),
        ExpectedServer::Exactly(expected.clone()),
        provider(),
    ));
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(inputs.certs.clone()))
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
    config.validate()?;
    tracing::info!(?config, "starting the proxy");
    let metrics = ProxyMetrics::new();
    let registry = Arc::new(Registry::default());
    let mut tasks = Vec::new();

    let inbound_shared = Arc::new(Inbound {
        acceptor: TlsAcceptor::from(Arc::new(server_config(&inputs, &[])?)),
        http_acceptor: TlsAcceptor::from(Arc::new(server_config(&inputs, &[b"h2", b"http/1.1"])?)),
        http: HttpServing::new(HttpLimits {
            header_read_timeout: config.header_read_timeout,
            max_header_bytes: config.max_header_bytes,
            connect_timeout: config.connect_timeout,
        }),
        policy: inputs.policy.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        handshake_timeout: config.handshake_timeout,
        connect_timeout: config.connect_timeout,
    });
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
            connector: TlsConnector::from(Arc::new(client_config(&inputs, &spec.spiffe_id)?)),
            connect_timeout: config.connect_timeout,
            handshake_timeout: config.handshake_timeout,
        });
        outbound_bound.push((spec.clone(), addr));
        tasks.push(tokio::spawn(outbound::serve(l, shared)));
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
    tracing::info!(%admin, inbound = ?inbound_bound, outbound = ?outbound_bound, "proxy listening");
    Ok(RunningProxy {
        inbound: inbound_bound,
        outbound: outbound_bound,
        admin,
        registry,
        metrics,
        tasks,
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
