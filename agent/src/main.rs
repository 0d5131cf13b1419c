//! `citadel-agent`: the node agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use citadel_agent::app::{self, AgentConfig, JoinToken, KubernetesMode, StartError};
use citadel_identity::TrustDomain;
use clap::{Parser, Subcommand};

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
    /// ID. Re-read when it changes. A `path` selector needs a `uid` or `gid`
    /// beside it and does not separate processes of the same uid: such a
    /// process can exec the named binary and hand the socket to a child, so
    /// give workloads that must not share an identity distinct uids.
    /// Required off Kubernetes.
    #[arg(
        long,
        env = "CITADEL_AGENT_ENTRIES",
        required_unless_present = "kubernetes"
    )]
    entries: Option<PathBuf>,
    /// How often the entries file is checked for changes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    entries_poll: Duration,
    /// A join token from `citadel token create`, exchanged for this node's
    /// identity when none is saved, when the saved one no longer verifies,
    /// or when it is not the token the saved identity came from (re-join,
    /// e.g. after `citadel node evict`). Prefer the environment variable:
    /// command lines are visible to every local user.
    #[arg(long, env = "CITADEL_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Where the node's identity (key and certificate, one 0600 file) and
    /// the last trust bundle applied are kept (0700).
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
    /// The mesh root namespace: its policies without a selector (and its
    /// AuthorizationPolicies whose selector matches) apply to every
    /// workload; use the CA's --root-namespace.
    #[arg(long, env = "CITADEL_ROOT_NAMESPACE", default_value = "istio-system")]
    root_namespace: String,
    /// When the CA activates a new authority (root rotation), every certificate this agent
    /// holds that another authority signed is re-issued at a random moment within this
    /// window, and pushed to its workloads.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    reissue_window: Duration,
    /// Kubernetes mode: a caller is attested by its pod (pid -> /proc/<pid>/cgroup ->
    /// pod UID and container -> the pod from a watch of this node's pods, through the
    /// in-cluster API configuration or KUBECONFIG) and gets
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>; the agent
    /// authenticates to the CA with --token-file. No entries file, no join token.
    #[arg(
        long,
        requires_all = ["node_name", "token_file"],
        conflicts_with_all = ["entries", "join_token"]
    )]
    kubernetes: bool,
    /// This node's name (Kubernetes mode; the pod's spec.nodeName from the downward API).
    #[arg(long, env = "CITADEL_NODE_NAME", requires = "kubernetes")]
    node_name: Option<String>,
    /// The projected service-account token file (Kubernetes mode; audience istio-ca),
    /// read again for every request to the CA and never logged.
    #[arg(long, env = "CITADEL_AGENT_TOKEN_FILE", requires = "kubernetes")]
    token_file: Option<PathBuf>,
    /// Where the node's processes are (Kubernetes mode; the agent runs with hostPID).
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
    /// Trust domain of the pods' SPIFFE IDs (Kubernetes mode); use the CA's.
    #[arg(long, env = "CITADEL_TRUST_DOMAIN", default_value = "cluster.local", value_parser = parse_trust_domain)]
    trust_domain: TrustDomain,
}

fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("citadel-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Command::Run(args) = cli.command;
    match runtime.block_on(run(args.into_config())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace: what is wrong and what to do.
            eprintln!("citadel-agent: {e}");
            match e {
                StartError::NeedsJoinToken(_) => ExitCode::from(2),
                StartError::Failed(_) => ExitCode::FAILURE,
            }
        }
    }
}

impl RunArgs {
    fn into_config(self) -> AgentConfig {
        AgentConfig {
            ca_address: self.ca,
            ca_server_name: self.ca_server_name,
            ca_bundle: self.ca_bundle,
            socket: self.socket,
            entries: self.entries.unwrap_or_default(),
            entries_poll: self.entries_poll,
            join_token: self.join_token.map(JoinToken),
            data_dir: self.data_dir,
            workload_ttl: self.workload_ttl,
            node_ttl: self.node_ttl,
            idle_linger: self.idle_linger,
            http_listen: self.http_listen,
            fetch_timeout: Duration::from_secs(30),
            root_namespace: self.root_namespace,
            reissue_window: self.reissue_window,
            kubernetes: match (self.kubernetes, self.node_name, self.token_file) {
                (true, Some(node), Some(token_file)) => {
                    let mut mode = KubernetesMode::new(node, token_file, self.trust_domain);
                    mode.proc_root = self.proc_root;
                    Some(mode)
                }
                _ => None,
            },
        }
    }
}

async fn run(config: AgentConfig) -> Result<(), StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut usr1 = signal(SignalKind::user_defined1())
        .map_err(|e| anyhow::anyhow!("installing the SIGUSR1 handler: {e}"))?;
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("installing the SIGTERM handler: {e}"))?;
    let agent = app::start(config).await?;
    let rotating = agent.manager();
    let stop = async move {
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
                Some(()) = usr1.recv() => {
                    tracing::info!("SIGUSR1: renewing every certificate now");
                    rotating.rotate_all();
                }
            }
        }
    };
    agent.run_until(stop).await.map_err(StartError::Failed)
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(extra: &[&str]) -> Result<AgentConfig, clap::Error> {
        let mut args = vec![
            "citadel-agent",
            "run",
            "--ca",
            "ca:15012",
            "--ca-bundle",
            "b.pem",
        ];
        args.extend_from_slice(extra);
        let cli = Cli::try_parse_from(args)?;
        let Command::Run(run) = cli.command;
        Ok(run.into_config())
    }

    #[test]
    fn flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kubernetes_mode_needs_node_name_and_token_file_and_no_entries() {
        let k8s = [
            "--kubernetes",
            "--node-name",
            "node-a",
            "--token-file",
            "/t",
        ];
        let cfg = parse(&k8s).unwrap();
        let mode = cfg.kubernetes.expect("Kubernetes mode");
        assert_eq!(mode.node_name, "node-a");
        assert_eq!(mode.token_file, PathBuf::from("/t"));
        assert_eq!(mode.proc_root, PathBuf::from("/proc"));
        assert_eq!(mode.trust_domain.as_str(), "cluster.local");
        assert!(parse(&["--kubernetes", "--node-name", "n"]).is_err());
        assert!(parse(&["--kubernetes", "--token-file", "/t"]).is_err());
        let mut with_entries = k8s.to_vec();
        with_entries.extend(["--entries", "e.yaml"]);
        assert!(parse(&with_entries).is_err());
        // Off Kubernetes the entries file stays required, and the Kubernetes flags need the mode.
        assert!(parse(&[]).is_err());
        assert!(
            parse(&["--entries", "e.yaml"])
                .unwrap()
                .kubernetes
                .is_none()
        );
        assert!(parse(&["--entries", "e.yaml", "--token-file", "/t"]).is_err());
    }
}
