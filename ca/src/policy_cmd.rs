//! `citadel policy …`: placeholder until the policy CLI lands.

/// Arguments of `citadel policy`.
#[derive(clap::Args, Debug)]
pub struct PolicyArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: PolicyCommand,
}

/// The policy subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate policy files.
    Validate,
}

/// Runs `citadel policy …`.
pub fn run(_args: PolicyArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("not built yet")
}
