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

    #[test]
    fn expect_lists_consumer_names() {
        let cli = Cli::try_parse_from(["upstream-demo"]).unwrap();
        assert_eq!(cli.config.expect, ["points"]);
        let cli = Cli::try_parse_from(["upstream-demo", "--expect", "points, shipping"]).unwrap();
        assert_eq!(cli.config.expected_consumers().unwrap(), ["points", "shipping"]);
        let cli = Cli::try_parse_from(["upstream-demo", "serve", "--expect", "a", "--expect", "b"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(c)) if c.expect == ["a", "b"]));
        for bad in ["", "points,,shipping", "points,", "two words"] {
            assert!(Cli::try_parse_from(["upstream-demo", "--expect", bad]).is_err(), "{bad:?} accepted");
        }
        let twice = Cli::try_parse_from(["upstream-demo", "--expect", "points,points"]).unwrap();
        assert!(twice.config.expected_consumers().is_err());
    }

    #[test]
    fn load_reads_one_store_per_consumer() {
        let load = |args: &[&str]| match Cli::try_parse_from([&["upstream-demo", "load"], args].concat()) {
            Ok(Cli { command: Some(Command::Load(l)), .. }) => l.consumer_stores().map_err(|e| e.to_string()),
            other => Err(format!("{other:?}")),
        };
        let names = |args: &[&str]| -> Vec<String> {
            load(args).unwrap().into_iter().map(|db| format!("{}={}", db.consumer, db.url.expose())).collect()
        };
        assert!(names(&[]).is_empty());
        assert_eq!(
            names(&[
                "--consumer-database-url",
                "shipping=sqlite://s.db",
                "--points-database-url",
                "sqlite://p.db"
            ]),
            ["shipping=sqlite://s.db", "points=sqlite://p.db"]
        );
        let both = [
            "--consumer-database-url",
            "points=sqlite://a.db",
            "--consumer-database-url",
            "points=sqlite://b.db",
        ];
        assert!(load(&both).is_err());
    }
}
