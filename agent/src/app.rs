//! The agent as a library: one validated [`AgentConfig`], and [`start`]
//! returning a [`RunningAgent`] that owns every task it spawned. `main.rs`
//! only parses flags and signals; tests run the same code in-process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use citadel_identity::{Escaped, SpiffeId};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::attest::{EntriesAttestor, WorkloadAttestor, watch_entries_file};
use crate::bundle::{follow_ca_bundle, load_saved_roots};
use crate::ca_client::{CaEndpoint, CaError, GrpcCa, NodeCredential};
pub use crate::k8s::mode::KubernetesMode;
use crate::manager::{CertManager, ManagerConfig};
use crate::metrics::AgentMetrics;
use crate::node::{self, NeedsJoinToken, NodeIdentity, Startup};
use crate::policy::follow_ca_policies;
use crate::propagation::Propagation;
use crate::server::AgentState;
use crate::{http, random_unit, server, socket, unix_now};

/// How long [`RunningAgent::shutdown`] waits for open streams to end.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A join token. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(pub String);

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

/// Everything the agent needs to run (see `citadel-agent run --help` for
/// the meaning and defaults of each).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The CA's gRPC address, `host:port`.
    pub ca_address: String,
    /// The name the CA's certificate must carry (default: the host of
    /// `ca_address`).
    pub ca_server_name: Option<String>,
    /// PEM file of roots the CA's serving certificate chains to.
    pub ca_bundle: PathBuf,
    /// The Unix socket serving SDS and the Workload API.
    pub socket: PathBuf,
    /// The workload entries file.
    pub entries: PathBuf,
    /// How often the entries file is checked for changes.
    pub entries_poll: Duration,
    /// A join token, used when there is no usable saved identity or when
    /// it is not the one the saved identity came from.
    pub join_token: Option<JoinToken>,
    /// Where the node identity and the last trust bundle are kept.
    pub data_dir: PathBuf,
    /// Lifetime requested for workload certificates.
    pub workload_ttl: Duration,
    /// Lifetime requested for the node certificate.
    pub node_ttl: Duration,
    /// How long an identity nobody asks for is kept.
    pub idle_linger: Duration,
    /// Address of `/metrics`, `/healthz`, `/readyz` (port 0: any).
    pub http_listen: SocketAddr,
    /// How long a unary fetch waits for a first certificate.
    pub fetch_timeout: Duration,
    /// The mesh root namespace: its policies apply to every workload.
    pub root_namespace: String,
    /// When the CA activates a new authority, every certificate signed by another one is
    /// re-issued at a random moment within this window (spreading the load on the CA).
    pub reissue_window: Duration,
    /// Kubernetes mode: callers are attested by pod and the agent authenticates with its
    /// projected service-account token; `entries` and `join_token` are then unused.
    pub kubernetes: Option<KubernetesMode>,
}

impl AgentConfig {
    /// A configuration with the documented defaults for everything but the
    /// CA and the entries file.
    pub fn new(ca_address: impl Into<String>, ca_bundle: PathBuf, entries: PathBuf) -> Self {
        Self {
            ca_address: ca_address.into(),
            ca_server_name: None,
            ca_bundle,
            socket: PathBuf::from("/var/run/citadel/agent.sock"),
            entries,
            entries_poll: Duration::from_secs(2),
            join_token: None,
            data_dir: PathBuf::from("/var/lib/citadel-agent"),
            workload_ttl: Duration::from_secs(24 * 3600),
            node_ttl: Duration::from_secs(24 * 3600),
            idle_linger: Duration::from_secs(30),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 15020)),
            fetch_timeout: Duration::from_secs(30),
            root_namespace: "istio-system".to_owned(),
            reissue_window: crate::manager::DEFAULT_REISSUE_WINDOW,
            kubernetes: None,
        }
    }

    /// The name to verify the CA's certificate against.
    fn server_name(&self) -> anyhow::Result<String> {
        match &self.ca_server_name {
            Some(n) => Ok(n.clone()),
            None => host_of(&self.ca_address)
                .with_context(|| format!("--ca {:?} is not host:port", self.ca_address)),
        }
    }
}

/// Why the agent did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Nothing to authenticate to the CA with: the operator must create a
    /// join token (exit code 2).
    #[error(transparent)]
    NeedsJoinToken(#[from] NeedsJoinToken),
    /// Anything else: bad configuration, a refused token, a busy socket.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

/// A started agent. Dropping it does not stop it; call [`Self::shutdown`].
pub struct RunningAgent {
    /// The socket it serves on.
    pub socket_path: PathBuf,
    /// Where `/metrics` and the health endpoints are.
    pub http_addr: SocketAddr,
    /// The node's identity (off Kubernetes; on Kubernetes the agent has no
    /// node certificate: it authenticates with its token).
    pub node_id: Option<SpiffeId>,
    manager: CertManager,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    /// Renews every held certificate now (SIGUSR1).
    pub fn rotate_all(&self) {
        self.manager.rotate_all();
    }

    /// The certificate manager (to rotate from a signal handler, or to
    /// inspect in tests).
    pub fn manager(&self) -> CertManager {
        self.manager.clone()
    }

    /// Runs until `stop` resolves or the server fails, then shuts down.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            () = stop => self.shutdown().await,
            result = &mut self.server => {
                self.stop_tasks();
                match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(anyhow!(e).context("agent server")),
                    Err(e) => Err(anyhow!(e).context("agent server task")),
                }
            }
        }
    }

    /// Ends open streams, stops serving (waiting up to [`SHUTDOWN_GRACE`]),
    /// stops every background task and removes the socket.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        tracing::info!("shutting down");
        self.shutdown.send_replace(true);
        let result = match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.server).await {
            Ok(Ok(r)) => r.context("agent server"),
            Ok(Err(e)) => Err(anyhow!(e).context("agent server task")),
            Err(_) => {
                tracing::warn!("connections still open after the grace period; closing them");
                self.server.abort();
                Ok(())
            }
        };
        self.stop_tasks();
        result
    }

    fn stop_tasks(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

/// Starts the agent: off Kubernetes it reads the entries and settles the
/// node identity (saved, or through the join token); on Kubernetes it
/// starts the node's pod watch and authenticates with the token file. Then
/// it binds the HTTP endpoint and the socket, and spawns the trust-bundle
/// and policy followers, node renewal (off Kubernetes) and the server.
pub async fn start(config: AgentConfig) -> Result<RunningAgent, StartError> {
    let server_name = config.server_name()?;
    let roots_pem = trusted_roots(&config.ca_bundle, &config.data_dir)?;
    tracing::info!(?config, "starting the agent");
    let metrics = AgentMetrics::new();
    let endpoint = CaEndpoint {
        address: config.ca_address.clone(),
        server_name,
        roots_pem: roots_pem.clone(),
    };
    let mut tasks = Vec::new();
    // Every change that may change attestation answers (an entries reload,
    // a pod event) bumps the attestation epoch; open streams re-attest
    // their caller on it, so a deleted pod's streams end.
    let (epoch_tx, epoch_rx) = watch::channel(0u64);
    let (ca, node_identity, attestor): (
        Arc<GrpcCa>,
        Option<NodeIdentity>,
        Arc<dyn WorkloadAttestor>,
    ) = match &config.kubernetes {
        Some(k8s) => {
            let (ca, attestor) =
                crate::k8s::mode::start(k8s, endpoint, &mut tasks, epoch_tx).await?;
            (ca, None, attestor)
        }
        None => {
            let m = metrics.clone();
            let entries =
                watch_entries_file(config.entries.clone(), config.entries_poll, move || {
                    m.entries_reload_error()
                })
                .await?;
            let node_identity = settle_node_identity(&config, endpoint.clone(), &roots_pem).await?;
            let ca = Arc::new(
                GrpcCa::new(endpoint, node_identity.credential()).map_err(|e| anyhow!("{e}"))?,
            );
            let mut entries_changes = entries.clone();
            tasks.push(tokio::spawn(async move {
                while entries_changes.changed().await.is_ok() {
                    epoch_tx.send_modify(|n| *n += 1);
                }
            }));
            (
                ca,
                Some(node_identity),
                Arc::new(EntriesAttestor::new(entries)),
            )
        }
    };
    let node_id = node_identity.as_ref().map(|n| n.spiffe_id().clone());

    let (bundle_tx, bundle_rx) = watch::channel(None);
    let propagation = Propagation::new();
    tasks.push(tokio::spawn(follow_ca_bundle(
        ca.clone(),
        bundle_tx,
        metrics.clone(),
        config.data_dir.clone(),
        propagation.clone(),
    )));
    if let Some(node_identity) = node_identity {
        tasks.push(tokio::spawn(node::keep_renewed(
            ca.clone(),
            node_identity,
            config.data_dir.clone(),
            bundle_rx.clone(),
            config.node_ttl,
            config.reissue_window,
        )));
    }

    let mesh = citadel_policy::MeshConfig {
        root_namespace: config.root_namespace.clone(),
    };
    let (policy_tx, policy_rx) = watch::channel(None);
    tasks.push(tokio::spawn(follow_ca_policies(
        ca.clone(),
        policy_tx,
        metrics.clone(),
        mesh.clone(),
    )));

    let manager = CertManager::new(
        ca.clone(),
        bundle_rx.clone(),
        ManagerConfig {
            workload_ttl: config.workload_ttl,
            idle_linger: config.idle_linger,
            reissue_window: config.reissue_window,
            ..ManagerConfig::default()
        },
        metrics.clone(),
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = Arc::new(AgentState {
        attestor,
        manager: manager.clone(),
        bundle: bundle_rx.clone(),
        propagation,
        policies: policy_rx,
        mesh,
        metrics: metrics.clone(),
        fetch_timeout: config.fetch_timeout,
        attestation_changed: epoch_rx,
        shutdown: shutdown_rx.clone(),
    });

    let http_listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("--http-listen {}", config.http_listen))?;
    let http_addr = http_listener
        .local_addr()
        .context("--http-listen address")?;
    let router = http::router(http::HttpState {
        metrics,
        manager: manager.clone(),
        bundle: bundle_rx,
    });
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, router).await {
            tracing::error!(error = %e, "HTTP endpoint failed");
        }
    }));

    let listener = socket::bind(&config.socket).await.map_err(|e| anyhow!(e))?;
    tracing::info!(socket = %config.socket.display(), http = %http_addr, "serving SDS and the Workload API");
    let mut stopping = shutdown_rx;
    let server = tokio::spawn(server::serve(listener, state, async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    }));
    Ok(RunningAgent {
        socket_path: config.socket,
        http_addr,
        node_id,
        manager,
        shutdown: shutdown_tx,
        server,
        tasks,
    })
}

/// Off Kubernetes: the saved node identity, or a new one through the join
/// token.
async fn settle_node_identity(
    config: &AgentConfig,
    endpoint: CaEndpoint,
    roots_pem: &str,
) -> Result<NodeIdentity, StartError> {
    let saved = node::load(&config.data_dir, roots_pem, unix_now())
        .with_context(|| format!("--data-dir {}", config.data_dir.display()))?;
    let token = config.join_token.as_ref().map(|t| t.0.as_str());
    let node_identity = match node::decide_startup(saved, token, &config.data_dir)? {
        Startup::UseSaved(n) => {
            if token.is_some() {
                tracing::info!(
                    "the saved node identity came from this join token; the token is not used again"
                );
            }
            *n
        }
        Startup::Join { replacing } => {
            let token = token.ok_or_else(|| anyhow!("a join was decided without a token"))?;
            if let Some(why) = &replacing {
                tracing::warn!(reason = %why, "replacing the saved node identity by joining with the given token");
            }
            let joining = GrpcCa::new(endpoint, NodeCredential::JoinToken(token.into()))
                .map_err(|e| anyhow!("{e}"))?;
            let n = join_when_ca_answers(
                &joining,
                node::token_hash(token),
                roots_pem,
                config.node_ttl,
            )
            .await?;
            node::save(&config.data_dir, &n)?;
            tracing::info!(spiffe_id = %n.spiffe_id(), "joined with the join token");
            n
        }
    };
    tracing::info!(spiffe_id = %node_identity.spiffe_id(), not_after = node_identity.svid.not_after, "node identity");
    Ok(node_identity)
}

/// The roots trusted for the CA's certificate and the saved node identity:
/// `--ca-bundle` and the last bundle the agent applied, if it saved one.
fn trusted_roots(ca_bundle: &Path, data_dir: &Path) -> anyhow::Result<String> {
    let mut roots = std::fs::read_to_string(ca_bundle)
        .with_context(|| format!("--ca-bundle {}", ca_bundle.display()))?;
    if !roots.contains("-----BEGIN CERTIFICATE-----") {
        bail!(
            "--ca-bundle {}: no PEM certificate in it",
            ca_bundle.display()
        );
    }
    if let Some(saved) = load_saved_roots(data_dir) {
        if !roots.ends_with('\n') {
            roots.push('\n');
        }
        roots.push_str(&saved);
    }
    Ok(roots)
}

/// Whether a failed exchange is worth retrying: the CA was not reached or
/// did not answer in time. A refusal is final.
pub fn is_transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
    )
}

/// Exchanges the join token, waiting (with backoff) while the CA cannot be
/// reached or does not answer in time: on a fresh node the agent may well
/// start before the CA, and the token is spent only once its certificate
/// is recorded. A refusal (bad, used or expired token) ends the agent at
/// once, with the CA's reason.
async fn join_when_ca_answers(
    ca: &GrpcCa,
    joined_with: [u8; 32],
    roots_pem: &str,
    ttl: Duration,
) -> anyhow::Result<NodeIdentity> {
    let backoff = citadel_identity::Backoff::default();
    let mut failures = 0u32;
    loop {
        match node::join(ca, joined_with, roots_pem, ttl).await {
            Ok(n) => return Ok(n),
            Err(e)
                if e.downcast_ref::<CaError>()
                    .is_some_and(|c| is_transient(c.code)) =>
            {
                failures = failures.saturating_add(1);
                let delay = backoff.delay(failures, random_unit());
                tracing::warn!(error = %Escaped(format!("{e:#}")), retry_in_ms = delay.as_millis() as u64, "CA unreachable; will retry joining");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn host_of(addr: &str) -> Option<String> {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h.to_owned());
    }
    addr.rsplit_once(':')
        .map(|(h, _)| h.to_owned())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_joining_only_when_the_ca_was_not_reached_in_time() {
        assert!(is_transient(tonic::Code::Unavailable));
        assert!(is_transient(tonic::Code::DeadlineExceeded));
        for final_code in [
            tonic::Code::Unauthenticated,
            tonic::Code::PermissionDenied,
            tonic::Code::InvalidArgument,
            tonic::Code::Internal,
        ] {
            assert!(!is_transient(final_code), "{final_code:?}");
        }
    }

    #[test]
    fn server_name_defaults_to_the_host_of_the_ca_address() {
        let cfg = |addr: &str| AgentConfig::new(addr, "b".into(), "e".into());
        assert_eq!(cfg("ca.example:15012").server_name().unwrap(), "ca.example");
        assert_eq!(cfg("[::1]:15012").server_name().unwrap(), "::1");
        assert!(cfg("nohost").server_name().is_err());
        let mut named = cfg("10.0.0.1:15012");
        named.ca_server_name = Some("citadel.citadel-system.svc".into());
        assert_eq!(named.server_name().unwrap(), "citadel.citadel-system.svc");
    }

    #[test]
    fn join_token_is_redacted_in_debug_output() {
        let mut cfg = AgentConfig::new("ca:1", "b".into(), "e".into());
        cfg.join_token = Some(JoinToken("citadel-join.secret".into()));
        assert!(!format!("{cfg:?}").contains("secret"));
    }

    #[test]
    fn saved_bundle_is_trusted_beside_the_ca_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let given = dir.path().join("ca.pem");
        std::fs::write(
            &given,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
        )
        .unwrap();
        let data = dir.path().join("data");
        assert!(!trusted_roots(&given, &data).unwrap().contains("BBBB"));
        std::fs::create_dir(&data).unwrap();
        std::fs::write(
            data.join(crate::bundle::SAVED_BUNDLE_FILE),
            "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let roots = trusted_roots(&given, &data).unwrap();
        assert!(roots.contains("AAAA") && roots.contains("BBBB"));
        assert_eq!(roots.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    }
}
