//! `citadel-proxy`: parses flags, starts the proxy, waits for a signal.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use citadel_proxy::app;
use citadel_proxy::cidr::Cidr;
use citadel_proxy::config::{
    InboundSpec, OutboundSpec, ProxyConfig, TransparentConfig, parse_inbound, parse_outbound,
    parse_peers,
};
use citadel_proxy::iptables::{self, Family, Include, RuleSpec};
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
    /// Prints, applies or removes the nat rules that redirect a pod's TCP to the
    /// capture listeners of `run --transparent` (run in the pod's network namespace).
    Iptables(IptablesArgs),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["print", "apply", "clean"])))]
struct IptablesArgs {
    /// Prints the iptables-restore input.
    #[arg(long)]
    print: bool,
    /// Replaces our chains with the rules (idempotent).
    #[arg(long)]
    apply: bool,
    /// Removes our chains and the jumps into them.
    #[arg(long)]
    clean: bool,
    /// The uid the proxy runs as: its traffic is never captured.
    #[arg(long, required_unless_present = "clean")]
    proxy_uid: Option<u32>,
    /// The gid the proxy runs as: its traffic is never captured either.
    #[arg(long)]
    proxy_gid: Option<u32>,
    /// The inbound capture port.
    #[arg(long, default_value_t = 15006)]
    inbound_capture_port: u16,
    /// The outbound capture port.
    #[arg(long, default_value_t = 15001)]
    outbound_capture_port: u16,
    /// The proxy's admin port (never captured inbound).
    #[arg(long, default_value_t = 15021)]
    admin_port: u16,
    /// Inbound ports to capture: `*` or a comma-separated list.
    #[arg(long, default_value = "*")]
    include_inbound_ports: String,
    /// Inbound ports never captured (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destinations to capture: `*` or comma-separated ranges.
    #[arg(long, default_value = "*")]
    include_outbound_cidrs: String,
    /// Outbound destinations never captured (comma-separated ranges).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<Cidr>,
    /// Outbound destination ports never captured (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Also IPv6 (ip6tables, and `::6` on `lo`).
    #[arg(long)]
    ipv6: bool,
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
    /// Transparent capture: listen on the capture ports that `citadel-proxy
    /// iptables` redirects the pod's TCP to.
    #[arg(long)]
    transparent: bool,
    /// The inbound capture port.
    #[arg(long, default_value_t = 15006, requires = "transparent")]
    inbound_capture_port: u16,
    /// The outbound capture port.
    #[arg(long, default_value_t = 15001, requires = "transparent")]
    outbound_capture_port: u16,
    /// A range of mesh addresses (repeatable; on Kubernetes the pod CIDR):
    /// outbound connections there get mTLS, others pass through unchanged.
    #[arg(long, requires = "transparent")]
    mesh_cidr: Vec<Cidr>,
    /// Application ports served as opaque TCP, never sniffed for HTTP (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "transparent")]
    tcp_ports: Vec<u16>,
    /// Secure naming: a file of `IP SPIFFE_ID` lines; a mesh peer at IP must present SPIFFE_ID.
    #[arg(long, requires = "transparent")]
    peers: Option<PathBuf>,
}

fn include<T: std::str::FromStr>(flag: &str, text: &str) -> anyhow::Result<Include<T>>
where
    T::Err: std::fmt::Display,
{
    if text.trim() == "*" {
        return Ok(Include::All);
    }
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        out.push(
            item.parse::<T>()
                .map_err(|e| anyhow::anyhow!("{flag} {item:?}: {e}"))?,
        );
    }
    Ok(Include::Only(out))
}

fn iptables_command(args: IptablesArgs) -> anyhow::Result<()> {
    let families: &[Family] = if args.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    if args.clean {
        for f in families {
            iptables::clean(*f)?;
        }
        return Ok(());
    }
    let uid = args
        .proxy_uid
        .context("--proxy-uid is required to print or apply rules")?;
    let spec = RuleSpec {
        inbound_port: args.inbound_capture_port,
        outbound_port: args.outbound_capture_port,
        proxy_uid: uid,
        proxy_gid: args.proxy_gid,
        admin_port: args.admin_port,
        include_inbound_ports: include("--include-inbound-ports", &args.include_inbound_ports)?,
        exclude_inbound_ports: args.exclude_inbound_ports,
        include_outbound_cidrs: include("--include-outbound-cidrs", &args.include_outbound_cidrs)?,
        exclude_outbound_cidrs: args.exclude_outbound_cidrs,
        exclude_outbound_ports: args.exclude_outbound_ports,
    };
    for f in families {
        if args.print {
            print!("{}", iptables::rules(&spec, *f));
        } else {
            iptables::apply(&spec, *f)?;
        }
    }
    Ok(())
}

fn transparent_config(args: &RunArgs) -> anyhow::Result<Option<TransparentConfig>> {
    if !args.transparent {
        return Ok(None);
    }
    let peers = match &args.peers {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --peers {}", path.display()))?;
            parse_peers(&text)?
        }
        None => Vec::new(),
    };
    Ok(Some(TransparentConfig {
        inbound_port: args.inbound_capture_port,
        outbound_port: args.outbound_capture_port,
        mesh_cidrs: args.mesh_cidr.clone(),
        tcp_ports: args.tcp_ports.clone(),
        peers,
        ..TransparentConfig::default()
    }))
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
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Iptables(args) => {
            return match iptables_command(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("citadel-proxy iptables: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let transparent = match transparent_config(&args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("citadel-proxy: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = ProxyConfig::new(args.agent_socket);
    config.transparent = transparent;
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
