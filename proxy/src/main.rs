//! `citadel-proxy`: parses flags, starts the proxy, waits for a signal.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use citadel_proxy::app;
use citadel_proxy::config::{
    InboundSpec, OutboundSpec, ProxyConfig, parse_inbound, parse_outbound,
};
use clap::{Parser, Subcommand};

/// The Citadel proxy: mutual TLS between workloads with certificates from the
/// node agent, Istio PeerAuthentication and AuthorizationPolicy enforced.
#[derive(Parser)]
#[command(name = "citadel-proxy", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "CITADEL_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the proxy until SIGTERM or SIGINT.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The node agent's Unix socket (SDS and the workload policy stream).
    #[arg(long, env = "CITADEL_AGENT_SOCKET")]
    agent_socket: PathBuf,
    /// An inbound listener: PORT:APP_PORT[:tcp|:http] listens on 0.0.0.0:PORT and
    /// forwards to 127.0.0.1:APP_PORT (tcp by default; http decides each request).
    #[arg(long, value_parser = parse_inbound)]
    inbound: Vec<InboundSpec>,
    /// An outbound listener: LOCAL_PORT=HOST:PORT,SPIFFE_ID listens on
    /// 127.0.0.1:LOCAL_PORT and originates mTLS to HOST:PORT, which must present SPIFFE_ID.
    #[arg(long, value_parser = parse_outbound)]
    outbound: Vec<OutboundSpec>,
    /// Address of /healthz/ready and /metrics.
    #[arg(long, default_value = "127.0.0.1:15021")]
    admin: SocketAddr,
    /// Time a peer has for its first bytes and the TLS handshake, in seconds.
    #[arg(long, default_value_t = 10)]
    handshake_timeout_secs: u64,
    /// Time to connect to the application or an upstream, in seconds.
    #[arg(long, default_value_t = 5)]
    connect_timeout_secs: u64,
    /// Time an HTTP client has to send a whole request head, in seconds.
    #[arg(long, default_value_t = 10)]
    header_read_timeout_secs: u64,
    /// The mesh's root namespace (its namespace-wide policies apply everywhere).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
}

fn init_tracing(format: &str) {
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

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    let Command::Run(args) = cli.command;
    let mut config = ProxyConfig::new(args.agent_socket);
    config.inbound = args.inbound;
    config.outbound = args.outbound;
    config.admin = args.admin;
    config.handshake_timeout = Duration::from_secs(args.handshake_timeout_secs);
    config.connect_timeout = Duration::from_secs(args.connect_timeout_secs);
    config.header_read_timeout = Duration::from_secs(args.header_read_timeout_secs);
    config.mesh.root_namespace = args.root_namespace;
    match app::start(config).await {
        Ok(running) => {
            stop_signal().await;
            tracing::info!("shutting down");
            running.shutdown();
            ExitCode::SUCCESS
        }
        Err(e) => {
            let e = anyhow::Error::from(e);
            eprintln!("citadel-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
