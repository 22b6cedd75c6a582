//! Typed configuration: each flag can also be set by the environment variable
//! named in `--help`. Durations take `ms`, `s`, `m`, `h` or `d` (a bare number is seconds).

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use recheck::{ProducerConfig, ReserveConfig, SecretUrl, Topology, topology::parse_duration};

/// Settings of `upstream-demo serve` (the default command).
#[derive(Debug, Clone, Parser)]
#[command(mut_arg("ops_addr", |a| a.default_value("127.0.0.1:9061")))]
pub struct Config {
    #[command(flatten)]
    pub broker: recheck::service::BrokerArgs,

    /// Order store: `sqlite://…` (embedded) or `postgres://…`.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://upstream-demo.db?mode=rwc"
    )]
    pub database_url: SecretUrl,

    /// Address of the gRPC listener (`Orders`, `ResendHook`, health); port 0 picks a free port.
    #[arg(long, env = "RECHECK_GRPC_ADDR", default_value = "127.0.0.1:50061")]
    pub grpc_addr: SocketAddr,

    /// TLS of the gRPC listener (the callback service then calls `https://…`).
    #[command(flatten)]
    pub tls: recheck::tls::ServerTlsArgs,

    #[command(flatten)]
    pub ops: recheck::ops::OpsArgs,

    /// This producer's name, as registered in the callback service (`--producers NAME=URL`).
    #[arg(long, env = "RECHECK_PRODUCER", default_value = "orders")]
    pub producer_name: String,

    /// The consumers every order expects, comma-separated: a message counts as confirmed once
    /// each of them confirmed it (the CHECK's `expect`).
    #[arg(long, env = "RECHECK_EXPECT", value_delimiter = ',', default_value = "points", value_parser = parse_consumer_name)]
    pub expect: Vec<String>,

    /// Delay of each order's first CHECK (rounded up to a delay tier).
    #[arg(long, env = "RECHECK_CHECK_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub check_delay: Duration,

    /// How long an order's transaction may take from `prepare` to its commit. A resend asked
    /// for an order not in the store yet, younger than this, answers RETRY_LATER; older,
    /// NOT_FOUND (→ `void`, or `unused` for a reserved id). A transaction past it is refused
    /// and rolled back before its commit.
    #[arg(long, env = "RECHECK_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Reserved CHECKs: `prepare` takes an id whose CHECK is already durable, with no broker
    /// round trip (`--reserve false` publishes each CHECK before the commit instead).
    #[arg(long, env = "RECHECK_RESERVE", default_value_t = true, action = clap::ArgAction::Set)]
    pub reserve: bool,

    /// A reservation older than this is never handed out; max age + grace must not exceed the
    /// check delay.
    #[arg(long, env = "RECHECK_RESERVE_MAX_AGE", default_value = "15s", value_parser = parse_duration)]
    pub reserve_max_age: Duration,

    /// The pool holds about this long's orders at the recent rate.
    #[arg(long, env = "RECHECK_RESERVE_AHEAD", default_value = "1s", value_parser = parse_duration)]
    pub reserve_ahead: Duration,

    /// Most reservations held at once.
    #[arg(long, env = "RECHECK_RESERVE_MAX_POOL", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub reserve_max_pool: u32,

    /// Bearer tokens accepted on `ResendHook`, comma-separated (several while rotating); the
    /// callback service sends one (its `NAME=URL TOKEN` producer entry). Unset: no authentication.
    #[arg(long, env = "RECHECK_HOOK_TOKENS", hide_env_values = true, value_parser = recheck::auth::parse_auth)]
    pub hook_tokens: Option<recheck::BearerAuth>,

    /// Log filter (tracing `EnvFilter` syntax); when unset, `RUST_LOG`, else `info`.
    #[arg(long, env = "RECHECK_LOG")]
    pub log: Option<String>,

    /// Log format (`RECHECK_LOG_FORMAT`) and OTLP span export (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[command(flatten)]
    pub trace: recheck::trace::TraceArgs,
}

impl Config {
    /// The SDK producer's configuration; refused at start-up if reservations could be handed
    /// out too late ([`ProducerConfig::validate`]).
    pub fn producer(&self) -> Result<ProducerConfig, String> {
        let reserve = self.reserve.then_some(ReserveConfig {
            max_age: self.reserve_max_age,
            ahead: self.reserve_ahead,
            max_pool: self.reserve_max_pool as usize,
        });
        let config = ProducerConfig {
            check_delay: self.check_delay,
            grace: self.grace,
            reserve,
            ..ProducerConfig::new(&self.producer_name)
        };
        config.validate()?;
        Ok(config)
    }

    /// The broker topology this installation uses.
    pub fn topology(&self) -> Topology {
        self.broker.topology()
    }

    /// `expect` without repeats (a name twice is a typo, not a stronger expectation).
    pub fn expected_consumers(&self) -> Result<Vec<String>, String> {
        let mut seen = std::collections::HashSet::new();
        match self.expect.iter().find(|name| !seen.insert(name.as_str())) {
            Some(name) => Err(format!("--expect names {name:?} twice")),
            None => Ok(self.expect.clone()),
        }
    }
}

/// One consumer name of `--expect`: what a consumer writes into its CONFIRMs (`--consumer`).
/// Letters, digits, `.`, `_`, `-`: names also sit in comma lists and `NAME=…` pairs (the load's
/// `--consumer-database-url`, the callback service's `RECHECK_CONSUMER_QUEUES`).
pub fn parse_consumer_name(s: &str) -> Result<String, String> {
    let name = s.trim();
    if name.is_empty() {
        return Err("a consumer name must not be empty".into());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("{name:?} is not a consumer name (letters, digits, '.', '_', '-')"));
    }
    Ok(name.to_owned())
}
