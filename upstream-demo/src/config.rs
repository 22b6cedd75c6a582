//! Typed configuration: each flag can also be set by the environment variable
//! named in `--help`. Durations take `ms`, `s`, `m`, `h` or `d` (a bare number is seconds).

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use recheck::{SecretUrl, Topology, topology::parse_duration};

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

    /// Delay of each order's first CHECK (rounded up to a delay tier).
    #[arg(long, env = "RECHECK_CHECK_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub check_delay: Duration,

    /// A resend asked for an order that is not in the store yet, younger than this, answers
    /// RETRY_LATER (its transaction may still be committing); older, NOT_FOUND (→ `void`).
    #[arg(long, env = "RECHECK_GRACE", default_value = "1m", value_parser = parse_duration)]
    pub grace: Duration,

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
    /// The broker topology this installation uses.
    pub fn topology(&self) -> Topology {
        self.broker.topology()
    }
}
