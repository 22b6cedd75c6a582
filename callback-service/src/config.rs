//! Typed configuration: each flag can also be set by the environment variable
//! named in `--help`. Durations take `ms`, `s`, `m`, `h` or `d` (a bare number is seconds).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use recheck::{SecretUrl, Topology, message::Limits, topology::parse_duration};

use crate::{breaker::BreakerConfig, registry::ProducerEntry};

/// The service's settings. The binary wraps it in [`crate::cli::Cli`]; tests build it
/// with [`Config::for_tests`] and then change fields.
#[derive(Debug, Clone, Parser)]
#[command(mut_arg("ops_addr", |a| a.default_value("127.0.0.1:9051")))]
pub struct Config {
    #[command(flatten)]
    pub broker: recheck::service::BrokerArgs,

    /// Store: `sqlite://…` (embedded) or `postgres://…`.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://callback-service.db?mode=rwc"
    )]
    pub database_url: SecretUrl,

    /// Address of the gRPC listener (`Admin`, health); port 0 picks a free port.
    #[arg(long, env = "RECHECK_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// TLS of the gRPC listener.
    #[command(flatten)]
    pub tls: recheck::tls::ServerTlsArgs,

    /// TLS of the calls to producers' `https://` hooks.
    #[command(flatten)]
    pub hook_tls: recheck::tls::ClientTlsArgs,

    #[command(flatten)]
    pub ops: recheck::ops::OpsArgs,

    /// Log filter (tracing `EnvFilter` syntax); when unset, `RUST_LOG`, else `info`.
    #[arg(long, env = "RECHECK_LOG")]
    pub log: Option<String>,

    /// Log format (`RECHECK_LOG_FORMAT`) and OTLP span export (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[command(flatten)]
    pub trace: recheck::trace::TraceArgs,

    /// Producers' resend hooks, comma-separated `NAME=URL` or `NAME=URL TOKEN` entries
    /// (e.g. `orders=http://127.0.0.1:50061,billing=http://billing:50061 s3cr3t`); a TOKEN is
    /// sent as `authorization: Bearer TOKEN`. Prefer `--producers-file` for tokens.
    #[arg(long, env = "RECHECK_PRODUCERS", hide_env_values = true, value_delimiter = ',', value_parser = parse_producer)]
    pub producers: Vec<ProducerEntry>,

    /// File of producer entries, same `NAME=URL [TOKEN]` syntax, one per line; blank lines and
    /// lines starting with `#` are skipped. Merged with `--producers`; a name may appear once.
    #[arg(long, env = "RECHECK_PRODUCERS_FILE")]
    pub producers_file: Option<PathBuf>,

    /// Bearer tokens accepted by the Admin API, comma-separated (several while rotating).
    /// Unset: no authentication (keep the listener on a private address then).
    #[arg(long, env = "RECHECK_ADMIN_TOKENS", hide_env_values = true, value_parser = recheck::auth::parse_auth)]
    pub admin_tokens: Option<recheck::BearerAuth>,

    /// Consumers' CONFIRM signing keys, comma-separated `CONSUMER=KEY` (≥ 16 bytes each). When
    /// set, a CONFIRM that is unsigned, badly signed or from a consumer without a key is parked
    /// and never marks a message confirmed.
    #[arg(long, env = "RECHECK_CONFIRM_KEYS", hide_env_values = true, value_parser = recheck::signing::ConfirmKeys::parse)]
    pub confirm_keys: Option<recheck::signing::ConfirmKeys>,

    /// Resends of one message before it is marked `failed`.
    #[arg(long, env = "RECHECK_MAX_RESENDS", default_value_t = 5)]
    pub max_resends: u32,

    /// How long a producer's hook may keep failing for one message before it is marked `failed`
    /// ("producer unreachable").
    #[arg(long, env = "RECHECK_UNREACHABLE_DEADLINE", default_value = "1h", value_parser = parse_duration)]
    pub unreachable_deadline: Duration,

    /// Deadline of one `Resend` RPC (also the connect timeout).
    #[arg(long, env = "RECHECK_RPC_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub rpc_timeout: Duration,

    /// Concurrent `Resend` RPCs to one producer; more wait for a slot.
    #[arg(long, env = "RECHECK_MAX_RPCS_PER_PRODUCER", default_value_t = 32, value_parser = at_least_one)]
    pub max_rpcs_per_producer: usize,

    /// Unacked CHECK deliveries in flight (AMQP prefetch of the checks consumer).
    #[arg(long, env = "RECHECK_CHECK_PREFETCH", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub check_prefetch: u16,

    /// Checks decided at once over all CHECK deliveries (each holds a few KB while decided);
    /// a delivery with more ids takes them all and goes alone.
    #[arg(long, env = "RECHECK_MAX_CHECKS_IN_FLIGHT", default_value_t = 1000, value_parser = at_least_one)]
    pub max_checks_in_flight: usize,

    /// Send the unconfirmed checks of one CHECK delivery to their producer in one `ResendBatch`
    /// call (a hook answering UNIMPLEMENTED is called with `Resend` per id, re-asked every
    /// 10 min); `false`: one `Resend` per check, always.
    #[arg(long, env = "RECHECK_RESEND_BATCH", default_value_t = true, action = clap::ArgAction::Set,
        num_args = 0..=1, default_missing_value = "true")]
    pub resend_batch: bool,

    /// Unacked CONFIRM deliveries in flight (AMQP prefetch of the confirms consumer).
    #[arg(long, env = "RECHECK_CONFIRM_PREFETCH", default_value_t = 2000, value_parser = clap::value_parser!(u16).range(1..))]
    pub confirm_prefetch: u16,

    /// Most CONFIRM messages (each up to `--max-ids` confirms) written in one store transaction.
    #[arg(long, env = "RECHECK_CONFIRM_BATCH", default_value_t = 1000, value_parser = at_least_one)]
    pub confirm_batch: usize,

    /// How long the confirm ingester waits for more deliveries before writing a batch.
    #[arg(long, env = "RECHECK_CONFIRM_LINGER", default_value = "5ms", value_parser = parse_duration)]
    pub confirm_linger: Duration,

    /// How long terminal rows (confirmed, void, rejected, failed) are kept before the purge.
    #[arg(long, env = "RECHECK_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub retention: Duration,

    /// How long `unused` rows (reserved ids nobody used) are kept: long enough to absorb a
    /// redelivered reserved CHECK, short enough that they never pile up.
    #[arg(long, env = "RECHECK_UNUSED_RETENTION", default_value = "1h", value_parser = parse_duration)]
    pub unused_retention: Duration,

    /// Interval between purges of expired terminal rows.
    #[arg(long, env = "RECHECK_PURGE_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub purge_interval: Duration,

    /// How long past its due time a pending or resent message may go without its check being
    /// handled before the sweeper republishes that CHECK (it was lost, or parked). Larger than
    /// any backlog the checks queue should hold; the sweeper also waits while that queue is behind.
    #[arg(long, env = "RECHECK_SWEEP_AFTER", default_value = "10m", value_parser = parse_duration)]
    pub sweep_after: Duration,

    /// Interval between sweeps for overdue checks.
    #[arg(long, env = "RECHECK_SWEEP_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// Largest CHECK or CONFIRM body accepted, in bytes; larger ones are parked.
    #[arg(long, env = "RECHECK_MAX_BODY_BYTES", default_value_t = 1_048_576, value_parser = at_least_one)]
    pub max_body_bytes: usize,

    /// Most message ids in one CHECK or CONFIRM; larger batches are parked.
    #[arg(long, env = "RECHECK_MAX_IDS", default_value_t = 5_000, value_parser = at_least_one)]
    pub max_ids: usize,

    /// Consumers' queues, comma-separated `CONSUMER=QUEUE` (e.g. `points=points.order-created`):
    /// a check whose consumer's queue has a backlog is deferred instead of resent.
    #[arg(long, env = "RECHECK_CONSUMER_QUEUES", value_delimiter = ',', value_parser = parse_consumer_queue)]
    pub consumer_queues: Vec<(String, String)>,

    /// Ready messages in a consumer's queue above which it counts as behind.
    #[arg(long, env = "RECHECK_BACKLOG_THRESHOLD", default_value_t = 100)]
    pub backlog_threshold: u32,

    /// Longest a check is deferred for a consumer backlog, counted from when the message was
    /// prepared or, if later, from when the consumer's queue was last seen stalled (no consumer,
    /// or more ready messages than at the probe before); after it, the check resends as usual.
    #[arg(long, env = "RECHECK_MAX_DEFERRAL", default_value = "10m", value_parser = parse_duration)]
    pub max_deferral: Duration,

    /// Consecutive failed hook RPCs (unreachable, timeout) that open a producer's circuit: its
    /// checks are then deferred without a call, one probe per open period. 0 disables.
    #[arg(long, env = "RECHECK_BREAKER_THRESHOLD", default_value_t = 5)]
    pub breaker_threshold: u32,

    /// Longest open period of a producer's circuit (the first is the shortest delay tier,
    /// doubling after each failed probe).
    #[arg(long, env = "RECHECK_BREAKER_MAX_OPEN", default_value = "1m", value_parser = parse_duration)]
    pub breaker_max_open: Duration,
}

impl Config {
    pub fn breaker(&self) -> BreakerConfig {
        // The first open period is one round of the shortest tier: a producer back within it
        // loses nothing; a probe holds its lease for one RPC deadline and then some.
        let min_open = self.broker.delay_tiers.first().copied().unwrap_or(Duration::from_secs(5));
        BreakerConfig {
            threshold: self.breaker_threshold,
            min_open,
            max_open: self.breaker_max_open.max(min_open),
            probe_lease: self.rpc_timeout * 2,
        }
    }

    /// Every default, with the given broker and store. Environment variables still apply
    /// (clap reads them), so a test process should not set `RECHECK_*`.
    pub fn for_tests(amqp_url: impl Into<String>, database_url: impl Into<String>) -> Config {
        let mut config = Config::parse_from(["callback-service"]);
        config.broker.amqp_url = SecretUrl::new(amqp_url);
        config.database_url = SecretUrl::new(database_url);
        config.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.ops.ops_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config
    }

    /// The broker topology this installation uses.
    pub fn topology(&self) -> Topology {
        self.broker.topology()
    }

    /// Bounds on the CHECK and CONFIRM bodies this service decodes.
    pub fn limits(&self) -> Limits {
        Limits { max_body_bytes: self.max_body_bytes, max_ids: self.max_ids }
    }
}

fn parse_consumer_queue(s: &str) -> Result<(String, String), String> {
    match s.trim().split_once('=') {
        Some((consumer, queue)) if !consumer.trim().is_empty() && !queue.trim().is_empty() => {
            Ok((consumer.trim().to_owned(), queue.trim().to_owned()))
        }
        _ => Err(format!("expected CONSUMER=QUEUE, got {s:?}")),
    }
}

fn parse_producer(s: &str) -> Result<ProducerEntry, String> {
    s.parse().map_err(|e| format!("{e}"))
}

/// A count that must be at least 1: 0 would hang (a semaphore of no permits), remove a bound
/// (AMQP reads a prefetch of 0 as unlimited) or refuse every message.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a count: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let c = Config::for_tests("amqp://x", "sqlite::memory:");
        assert_eq!(c.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.unreachable_deadline, Duration::from_secs(3_600));
        assert_eq!(c.confirm_linger, Duration::from_millis(5));
        assert_eq!(c.limits().max_ids, 5_000);
        assert_eq!((c.check_prefetch, c.max_checks_in_flight), (32, 1_000));
        assert_eq!(c.grpc_addr.port(), 0);
        assert_eq!(c.ops.ops_addr.port(), 0);
        assert_eq!(Config::parse_from(["callback-service"]).ops.ops_addr.port(), 9051);
    }

    /// Every count with a bound refuses 0 (and nonsense) with a message naming the flag.
    #[test]
    fn counts_refuse_zero() {
        for flag in [
            "--max-rpcs-per-producer",
            "--check-prefetch",
            "--max-checks-in-flight",
            "--confirm-prefetch",
            "--confirm-batch",
            "--max-body-bytes",
            "--max-ids",
        ] {
            for bad in ["0", "-1", "lots"] {
                let arg = format!("{flag}={bad}");
                let err = Config::try_parse_from(["callback-service", &arg]).unwrap_err();
                assert!(err.to_string().contains(flag), "{arg}: {err}");
            }
            assert!(Config::try_parse_from(["callback-service", flag, "7"]).is_ok(), "{flag} 7");
        }
    }

    #[test]
    fn producers_flag_splits_on_commas() {
        let c = Config::parse_from([
            "callback-service",
            "--producers",
            "orders=http://127.0.0.1:50061, billing=http://h:1 tok",
        ]);
        let names: Vec<_> = c.producers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["orders", "billing"]);
        assert_eq!(c.producers[1].token.as_deref(), Some("tok"));
    }
}
