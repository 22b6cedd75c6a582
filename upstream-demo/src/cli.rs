//! The command line: `upstream-demo [serve]` runs the order service,
//! `upstream-demo load` drives a running one and reports what became of every order.

use clap::{Parser, Subcommand};

use crate::{Config, load::LoadConfig};

#[derive(Debug, Parser)]
#[command(
    name = "upstream-demo",
    version,
    about = "Recheck demo producer: creates orders, publishes `order.created`, serves the resend hook",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Service settings when no subcommand is given.
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the order service (the default).
    Serve(Box<Config>),
    /// Create orders on a running service (with injected faults), wait until the callback
    /// service settles each message, and report delivered / void / failed / lost.
    Load(Box<LoadConfig>),
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn serve_is_the_default_and_load_takes_its_flags() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["upstream-demo", "--grace", "5s"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.config.grace, std::time::Duration::from_secs(5));
        let cli = Cli::try_parse_from(["upstream-demo", "serve", "--producer-name", "billing"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(c)) if c.producer_name == "billing"));
        let cli =
            Cli::try_parse_from(["upstream-demo", "load", "--count", "5", "--skip-publish-rate", "0.25"]);
        assert!(
            matches!(cli.unwrap().command, Some(Command::Load(l)) if l.count == 5 && l.skip_publish_rate == 0.25)
        );
        assert!(Cli::try_parse_from(["upstream-demo", "load", "--abort-after-check-rate", "1.5"]).is_err());
    }
}
