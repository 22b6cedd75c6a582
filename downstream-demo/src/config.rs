//! Typed configuration: each flag can also be set by the environment variable
//! named in `--help`. [`Cli`] picks the subcommand; bare `downstream-demo`
//! (flags and all) means `serve`.

use clap::{Args, Parser, Subcommand};
use recheck::Topology;

#[derive(Debug, Clone, Parser)]
#[command(name = "downstream-demo", version, about = "Recheck demo consumer: awards points once per order")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve`'s flags, so that `downstream-demo --fail-rate 0.1` works too.
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Consume `order.created` and award points until SIGTERM / SIGINT (the default).
    Serve(Box<Config>),
    /// Print what the store holds: orders with points, inbox counts, rejections.
    Stats(StatsArgs),
}

/// Where the points and the inbox live; shared by `serve` and `stats`.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Points store and inbox: `sqlite://…` (embedded) or `postgres://…`.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://downstream-demo.db?mode=rwc"
    )]
    pub database_url: recheck::SecretUrl,

    /// Consumer name, written into each CONFIRM and matched against a check's `expect`.
    #[arg(long, env = "RECHECK_CONSUMER", default_value = "points")]
    pub consumer: String,
}

/// `serve`: the consumer service.
#[derive(Debug, Clone, Parser)]
#[command(name = "downstream-demo")]
#[command(mut_arg("ops_addr", |a| a.default_value("127.0.0.1:9071")))]
pub struct Config {
    #[command(flatten)]
    pub broker: recheck::service::BrokerArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    /// No gRPC server here: `/healthz` and `/readyz` are this service's health.
    #[command(flatten)]
    pub ops: recheck::ops::OpsArgs,

    /// This consumer's queue, bound to the events exchange by `order.created`.
    #[arg(long, env = "RECHECK_QUEUE", default_value = "points.order-created")]
    pub queue: String,

    /// Unacked deliveries the broker hands out at once.
    #[arg(long, env = "RECHECK_PREFETCH", default_value_t = 256)]
    pub prefetch: u16,

    /// Most deliveries handled in one transaction (and confirmed in one CONFIRM).
    #[arg(long, env = "RECHECK_BATCH_SIZE", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,

    #[command(flatten)]
    pub faults: FaultArgs,

    /// Largest business message body processed, in bytes; larger ones are parked with a reason.
    #[arg(long, env = "RECHECK_MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: usize,

    /// Key this consumer signs its CONFIRMs with (HMAC-SHA256, ≥ 16 bytes): the callback
    /// service's `RECHECK_CONFIRM_KEYS` entry for this consumer. Unset: CONFIRMs are unsigned.
    #[arg(long, env = "RECHECK_CONFIRM_KEY", hide_env_values = true, value_parser = parse_key)]
    pub confirm_key: Option<recheck::signing::SigningKey>,

    /// Log filter (tracing `EnvFilter` syntax); when unset, `RUST_LOG`, else `info`.
    #[arg(long, env = "RECHECK_LOG")]
    pub log: Option<String>,

    /// Log format (`RECHECK_LOG_FORMAT`) and OTLP span export (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[command(flatten)]
    pub trace: recheck::trace::TraceArgs,
}

/// Fault injection, all off by default: the demo shows Recheck repairing them.
#[derive(Debug, Clone, Default, Args)]
pub struct FaultArgs {
    /// Fraction of orders whose effect fails before commit (rolled back, retried in place).
    #[arg(long, env = "RECHECK_FAIL_RATE", default_value_t = 0.0, value_parser = parse_fraction)]
    pub fail_rate: f64,

    /// Fraction of orders refused as "customer blocked" (chosen by message id, so stable).
    #[arg(long, env = "RECHECK_REJECT_RATE", default_value_t = 0.0, value_parser = parse_fraction)]
    pub reject_rate: f64,

    /// Extra time spent on each message inside the transaction, in milliseconds.
    #[arg(long, env = "RECHECK_SLOW_MS", default_value_t = 0)]
    pub slow_ms: u64,

    /// Fraction of CONFIRMs never sent though the points were awarded (the callback resends).
    #[arg(long, env = "RECHECK_DROP_CONFIRM_RATE", default_value_t = 0.0, value_parser = parse_fraction)]
    pub drop_confirm_rate: f64,

    /// Fraction of business messages lost before this consumer sees them (acked unprocessed,
    /// no CONFIRM): originals only, chosen by message id and seed; the callback's resend gets
    /// through.
    #[arg(long, env = "RECHECK_DROP_MESSAGE_RATE", default_value_t = 0.0, value_parser = parse_fraction)]
    pub drop_message_rate: f64,

    /// Seed of the fault dice (fail, drop-confirm, drop-message); random when unset.
    #[arg(long, env = "RECHECK_SEED")]
    pub seed: Option<u64>,
}

/// `stats`: read-only, needs only the store.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Config {
    /// The broker topology this installation uses.
    pub fn topology(&self) -> Topology {
        self.broker.topology()
    }
}

/// A probability: a number from 0 to 1.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.trim().parse().map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=1.0).contains(&f) { Ok(f) } else { Err(format!("{f} is not between 0.0 and 1.0")) }
}

fn parse_key(s: &str) -> Result<recheck::signing::SigningKey, String> {
    recheck::signing::SigningKey::new(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_bounded() {
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert_eq!(parse_fraction("1"), Ok(1.0));
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("-0.1").is_err());
        assert!(parse_fraction("NaN").is_err());
        assert!(parse_fraction("lots").is_err());
    }

    #[test]
    fn bare_flags_mean_serve_and_stats_takes_its_own() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["downstream-demo", "--fail-rate", "0.1", "--seed", "7"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.faults.fail_rate, 0.1);
        assert_eq!(cli.serve.faults.seed, Some(7));

        let cli = Cli::try_parse_from(["downstream-demo", "stats", "--json", "--consumer", "c"]).unwrap();
        match cli.command {
            Some(Command::Stats(args)) => assert!(args.json && args.store.consumer == "c"),
            other => panic!("expected stats, got {other:?}"),
        }

        let cli = Cli::try_parse_from(["downstream-demo", "serve", "--batch-size", "8"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Serve(c)) if c.batch_size == 8));
        assert!(Cli::try_parse_from(["downstream-demo", "serve", "--batch-size", "0"]).is_err());
    }
}
