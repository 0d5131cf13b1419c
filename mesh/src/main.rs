//! `citadel-mesh`: parses flags and runs `up`, `down` or a sample application.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use citadel_mesh::sample_app::{self, SampleApp};
use citadel_mesh::{MeshConfig, report};
use clap::{Parser, Subcommand, ValueEnum};

/// A whole Citadel mesh on one machine: the CA, a node agent, and two sample
/// services behind their own citadel-proxy.
#[derive(Parser)]
#[command(name = "citadel-mesh", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the mesh in the background and print how to try it.
    Up {
        /// The data directory it owns: CA, agent, policies, logs, pids.
        #[arg(long, default_value = "./citadel-mesh-data")]
        data_dir: PathBuf,
        /// Where citadel, citadel-agent and citadel-proxy are (default: next
        /// to this executable).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Print the summary as JSON (progress still goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Stop what `up` started (the data directory stays).
    Down {
        /// The data directory of the `up` to stop.
        #[arg(long, default_value = "./citadel-mesh-data")]
        data_dir: PathBuf,
    },
    /// A sample service (run by `up`).
    #[command(hide = true)]
    SampleApp {
        /// Which one.
        service: Which,
        /// Where to listen.
        #[arg(long)]
        listen: SocketAddr,
        /// Frontend only: its proxy's outbound listener to backend.
        #[arg(long, required_if_eq("service", "frontend"))]
        backend: Option<SocketAddr>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    Frontend,
    Backend,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up {
            data_dir,
            bin_dir,
            json,
        } => {
            let mut config = MeshConfig::new(&data_dir)?;
            if let Some(dir) = bin_dir {
                config.bin_dir = std::path::absolute(&dir)
                    .with_context(|| format!("--bin-dir {}", dir.display()))?;
            }
            let mut progress = |line: &str| eprintln!("citadel-mesh: {line}");
            let mesh = citadel_mesh::start(&config, &mut progress).await?;
            if json {
                println!("{}", report::up_json(&mesh));
            } else {
                print!("{}", report::up_text(&mesh));
            }
        }
        Command::Down { data_dir } => {
            let report = citadel_mesh::stop(&data_dir).await?;
            print!("{}", report::down_text(&report));
            let failed = report
                .processes
                .iter()
                .any(|(_, o)| matches!(o, citadel_mesh::down::Outcome::Failed(_)));
            anyhow::ensure!(!failed, "some processes could not be stopped");
        }
        Command::SampleApp {
            service,
            listen,
            backend,
        } => {
            let app = match (service, backend) {
                (Which::Backend, _) => SampleApp::Backend { listen },
                (Which::Frontend, Some(backend)) => SampleApp::Frontend { listen, backend },
                (Which::Frontend, None) => anyhow::bail!("frontend needs --backend"),
            };
            sample_app::run(app).await.context("sample app")?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("citadel-mesh: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("citadel-mesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}
