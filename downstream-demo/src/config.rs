//! Typed configuration: each flag can also be set by the environment variable
//! named in `--help`.

use std::time::Duration;

use clap::Parser;
use recheck::{Topology, topology::parse_tiers};

#[derive(Debug, Clone, Parser)]
#[command(name = "downstream-demo", version, about = "Recheck demo consumer: awards points once per order")]
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

    /// Points store and inbox: `sqlite://…` (embedded) or `postgres://…`.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://downstream-demo.db?mode=rwc")]
    pub database_url: String,

    /// Consumer name, written into each CONFIRM and matched against a check's `expect`.
    #[arg(long, env = "RECHECK_CONSUMER", default_value = "points")]
    pub consumer: String,

    /// This consumer's queue, bound to the events exchange by `order.created`.
    #[arg(long, env = "RECHECK_QUEUE", default_value = "points.order-created")]
    pub queue: String,

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
