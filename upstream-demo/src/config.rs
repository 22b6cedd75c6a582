//! Typed configuration: each flag can also be set by the environment variable
//! named in `--help`. Durations take `ms`, `s`, `m`, `h` or `d` (a bare number is seconds).

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use recheck::{
    Topology,
    topology::{parse_duration, parse_tiers},
};

/// Settings of `upstream-demo serve` (the default command).
#[derive(Debug, Clone, Parser)]
pub struct Config {
    /// RabbitMQ URL (the vhost is the URL-encoded path).
    #[arg(long, env = "RECHECK_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name.
    #[arg(long, env = "RECHECK_PREFIX", default_value = "recheck")]
    pub prefix: String,

    /// Delay tiers of the check delay queues, comma-separated (`ms`, `s`, `m`, `h`).
    #[arg(long, env = "RECHECK_DELAY_TIERS", default_value = "5s,30s,2m,10m,1h", value_parser = parse_tiers)]
    pub delay_tiers: ::std::vec::Vec<Duration>,

    /// Order store: `sqlite://…` (embedded) or `postgres://…`.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://upstream-demo.db?mode=rwc")]
    pub database_url: String,

    /// Address of the gRPC listener (`Orders`, `ResendHook`, health); port 0 picks a free port.
    #[arg(long, env = "RECHECK_GRPC_ADDR", default_value = "127.0.0.1:50061")]
    pub grpc_addr: SocketAddr,

    /// This producer's name, as registered in the callback service (`--producers NAME=URL`).
    #[arg(long, env = "RECHECK_PRODUCER", default_value = "orders")]
    pub producer_name: String,

    /// Delay of each order's first CHECK (rounded up to a delay tier).
    #[arg(long, env = "RECHECK_CHECK_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub check_delay: Duration,

    /// A resend asked for an order that is not in the store yet, younger than this, answers
    /// RETRY_LATER (its transaction may still be committing); older, NOT_FOUND (→ `void`).
    #[arg(long, env = "RECHECK_GRACE", default_value = "1m", value_parser = parse_duration)]
    pub grace: Duration,

    /// Log filter (tracing `EnvFilter` syntax); when unset, `RUST_LOG`, else `info`.
    #[arg(long, env = "RECHECK_LOG")]
    pub log: Option<String>,
}

impl Config {
    /// The broker topology this installation uses.
    pub fn topology(&self) -> Topology {
        Topology::new(self.prefix.clone(), self.delay_tiers.clone())
    }
}
