//! `citadel`: the Citadel CA server and operator CLI.
#![forbid(unsafe_code)]

mod policy_cmd;

use clap::{Parser, Subcommand};

/// Citadel certificate authority and operator CLI.
#[derive(Parser, Debug)]
#[command(name = "citadel", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate and explain Istio PeerAuthentication and AuthorizationPolicy files.
    Policy(policy_cmd::PolicyArgs),
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(args) => policy_cmd::run(args),
    }
}
