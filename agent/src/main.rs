//! `citadel-agent`: the node agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use citadel_agent::attest::{EntriesAttestor, watch_entries_file};
use citadel_agent::bundle::follow_ca_bundle;
use citadel_agent::ca_client::{CaEndpoint, GrpcCa, NodeCredential};
use citadel_agent::manager::{CertManager, ManagerConfig};
use citadel_agent::metrics::AgentMetrics;
use citadel_agent::server::AgentState;
use citadel_agent::{http, node, server, socket, unix_now};
use clap::{Parser, Subcommand};
use tokio::sync::watch;

/// The Citadel node agent: attests workloads on a Unix socket and serves
/// their certificates over Envoy SDS v3 and the SPIFFE Workload API.
#[derive(Parser)]
#[command(name = "citadel-agent", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "CITADEL_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the agent until SIGTERM or SIGINT. SIGUSR1 renews every held
    /// certificate at once.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The CA's gRPC address, host:port.
    #[arg(long, env = "CITADEL_CA_ADDR")]
    ca: String,
    /// PEM file of the roots the CA's serving certificate chains to (the
    /// CA's bundle.pem).
    #[arg(long, env = "CITADEL_CA_BUNDLE")]
    ca_bundle: PathBuf,
    /// The name to verify the CA's certificate against (default: the host
    /// part of --ca).
    #[arg(long, env = "CITADEL_CA_SERVER_NAME")]
    ca_server_name: Option<String>,
    /// The Unix socket serving SDS and the Workload API.
    #[arg(
        long,
        env = "CITADEL_AGENT_SOCKET",
        default_value = "/var/run/citadel/agent.sock"
    )]
    socket: PathBuf,
    /// Workload entries (YAML): which uid/gid/executable gets which SPIFFE
    /// ID. Re-read when it changes.
    #[arg(long, env = "CITADEL_AGENT_ENTRIES")]
    entries: PathBuf,
    /// How often the entries file is checked for changes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    entries_poll: Duration,
    /// A join token from `citadel token create`, exchanged once for this
    /// node's identity (prefer the environment variable: command lines are
    /// visible to every local user).
    #[arg(long, env = "CITADEL_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Where the node's certificate and key are kept (0700; key 0600).
    #[arg(
        long,
        env = "CITADEL_AGENT_DATA_DIR",
        default_value = "/var/lib/citadel-agent"
    )]
    data_dir: PathBuf,
    /// Lifetime requested for workload certificates.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    workload_ttl: Duration,
    /// Lifetime requested for the node certificate.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    node_ttl: Duration,
    /// How long an identity nobody asks for any more is kept.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    idle_linger: Duration,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "CITADEL_AGENT_HTTP_LISTEN",
        default_value = "0.0.0.0:15020"
    )]
    http_listen: SocketAddr,
}

/// Parses `90s`, `15m`, `24h`, `7d` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 15m, 24h, 7d)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 10.0 * 365.0 * 86_400.0 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
    }
}

fn init_logging(format: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let roots_pem = std::fs::read_to_string(&args.ca_bundle)
        .with_context(|| format!("--ca-bundle {}", args.ca_bundle.display()))?;
    if !roots_pem.contains("-----BEGIN CERTIFICATE-----") {
        bail!(
            "--ca-bundle {}: no PEM certificate in it",
            args.ca_bundle.display()
        );
    }
    let server_name = match &args.ca_server_name {
        Some(n) => n.clone(),
        None => {
            host_of(&args.ca).with_context(|| format!("--ca {:?} is not host:port", args.ca))?
        }
    };
    let metrics = AgentMetrics::new();
    let m = metrics.clone();
    let entries = watch_entries_file(args.entries.clone(), args.entries_poll, move || {
        m.entries_reload_error()
    })
    .await?;

    // The node identity: saved from an earlier run, or obtained now with the
    // join token.
    let endpoint = CaEndpoint {
        address: args.ca.clone(),
        server_name,
        roots_pem: roots_pem.clone(),
    };
    let saved = node::load(&args.data_dir, &roots_pem, unix_now())
        .with_context(|| format!("--data-dir {}", args.data_dir.display()))?;
    let node_identity = match (saved, &args.join_token) {
        (Some(n), token) => {
            if token.is_some() {
                tracing::info!(
                    "a node certificate is saved; the join token is not needed and was not used"
                );
            }
            n
        }
        (None, Some(token)) => {
            let joining = GrpcCa::new(endpoint.clone(), NodeCredential::JoinToken(token.clone()))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let n = join_when_ca_answers(&joining, &roots_pem, args.node_ttl).await?;
            node::save(&args.data_dir, &n)?;
            tracing::info!(spiffe_id = %n.spiffe_id(), "joined with the join token");
            n
        }
        (None, None) => bail!(
            "no node identity in {} and no --join-token: create one with `citadel token create --node NAME --allow SPIFFE_ID…` beside the CA",
            args.data_dir.display()
        ),
    };
    tracing::info!(spiffe_id = %node_identity.spiffe_id(), not_after = node_identity.svid.not_after, "node identity");
    let ca = Arc::new(
        GrpcCa::new(endpoint, node_identity.credential()).map_err(|e| anyhow::anyhow!("{e}"))?,
    );

    let (bundle_tx, bundle_rx) = watch::channel(None);
    tokio::spawn(follow_ca_bundle(ca.clone(), bundle_tx, metrics.clone()));
    tokio::spawn(node::keep_renewed(
        ca.clone(),
        node_identity,
        args.data_dir.clone(),
        bundle_rx.clone(),
        args.node_ttl,
    ));

    let manager = CertManager::new(
        ca.clone(),
        bundle_rx.clone(),
        ManagerConfig {
            workload_ttl: args.workload_ttl,
            idle_linger: args.idle_linger,
            ..ManagerConfig::default()
        },
        metrics.clone(),
    );
    // Every entries reload bumps the attestation epoch; open streams
    // re-attest their caller on it.
    let (epoch_tx, epoch_rx) = watch::channel(0u64);
    let mut entries_changes = entries.clone();
    tokio::spawn(async move {
        while entries_changes.changed().await.is_ok() {
            epoch_tx.send_modify(|n| *n += 1);
        }
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = Arc::new(AgentState {
        attestor: Arc::new(EntriesAttestor::new(entries)),
        manager: manager.clone(),
        bundle: bundle_rx.clone(),
        metrics: metrics.clone(),
        fetch_timeout: Duration::from_secs(30),
        attestation_changed: epoch_rx,
        shutdown: shutdown_rx,
    });

    let http_listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("--http-listen {}", args.http_listen))?;
    let router = http::router(http::HttpState {
        metrics,
        manager: manager.clone(),
        bundle: bundle_rx,
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, router).await {
            tracing::error!(error = %e, "HTTP endpoint failed");
        }
    });

    let listener = socket::bind(&args.socket).await?;
    tracing::info!(socket = %args.socket.display(), http = %args.http_listen, "serving SDS and the Workload API");

    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("installing SIGUSR1 handler")?;
    let rotating = manager.clone();
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            tracing::info!("SIGUSR1: renewing every certificate now");
            rotating.rotate_all();
        }
    });

    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        shutdown_tx.send_replace(true);
    };
    let socket_path = args.socket.clone();
    let result = server::serve(listener, state, shutdown).await;
    let _ = std::fs::remove_file(&socket_path);
    result.context("agent server")
}

/// Exchanges the join token, waiting (with backoff) while the CA cannot be
/// reached: on a fresh node the agent may well start before the CA. A
/// refusal (bad, used or expired token) ends the agent at once, with the
/// CA's reason.
async fn join_when_ca_answers(
    ca: &GrpcCa,
    roots_pem: &str,
    ttl: Duration,
) -> anyhow::Result<node::NodeIdentity> {
    let backoff = citadel_identity::Backoff::default();
    let mut failures = 0u32;
    loop {
        match node::join(ca, roots_pem, ttl).await {
            Ok(n) => return Ok(n),
            Err(e)
                if e.downcast_ref::<citadel_agent::ca_client::CaError>()
                    .is_some_and(|c| c.code == tonic::Code::Unavailable) =>
            {
                failures = failures.saturating_add(1);
                let delay = backoff.delay(failures, citadel_agent::random_unit());
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "CA unreachable; will retry joining");
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
