//! What a bench run measures and how big: the parts, and the options (`scripts/bench --help`).

use std::{path::PathBuf, time::Duration};

use recheck::topology::parse_duration;

/// The parts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Raw,
    Naive,
    RecheckSqlite,
    RecheckPostgres,
    /// Recheck's own cost: the bench process produces through the SDK, no order service.
    RecheckSdk,
    Outbox,
    /// Recheck (SQLite) with every connection to the broker through the test kit's proxy, which
    /// adds `--broker-latency` each way: a broker on another host.
    RecheckRemote,
    /// The outbox behind the same proxy.
    OutboxRemote,
    /// The callback service's ingest and check rates.
    Callback,
    /// The callback service's memory with a backlog.
    Backlog,
    /// Drain after a hook outage: `ResendBatch` against one `Resend` per message.
    Drain,
    /// The callback rates with `--size-rows` rows stored, and ingest while the purge runs. Only
    /// when named: pre-filling 10 M rows takes minutes.
    Size,
}

/// What to run and how big.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Business messages per end-to-end scenario (the saturated, measured phase).
    #[arg(long, default_value_t = 50_000)]
    pub messages: u64,
    /// `CreateOrder` calls in flight (Recheck and outbox).
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Producer calls in flight for raw and naive (each a publish, or CHECK + publish).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Fixed offered load (orders/s) at which Recheck's and the outbox's create latency compare.
    #[arg(long, default_value_t = 1000)]
    pub offered_rate: u64,
    /// Orders sent at the offered load.
    #[arg(long, default_value_t = 5000)]
    pub offered_orders: u64,
    /// Delay of each message's check (naive's TTL, Recheck's first check). With reservations,
    /// at least their max age (3 s) + the grace (2 s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub check_delay: Duration,
    /// Recheck's reserved CHECKs (upstream-demo's default); `--reserve false` publishes every
    /// CHECK before the commit, by the group commit.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub reserve: bool,
    /// Recheck's delay tiers.
    #[arg(long, default_value = "1s,3s,5s")]
    pub tiers: String,
    /// Latency the remote-broker rows add to every broker connection, each way.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub broker_latency: Duration,
    /// Confirms, then checks, pre-filled for the callback service alone.
    #[arg(long, default_value_t = 100_000)]
    pub callback_messages: u64,
    /// Backlogs of pending checks (store + queue) the callback service's memory is measured with.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub backlog: Vec<u64>,
    /// How long the callback service works on each backlog.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub backlog_window: Duration,
    /// Messages waiting for a resend when the hook comes back (the drain figure).
    #[arg(long, default_value_t = 50_000)]
    pub drain_messages: u64,
    /// How long the hook stays down once every waiting message is recorded: longer than the
    /// largest tier, so the checks that failed before the circuit opened are deferred too.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_outage: Duration,
    /// Rows already in the callback store when the size part measures its rates.
    #[arg(long, value_delimiter = ',', default_value = "100000,10000000")]
    pub size_rows: Vec<u64>,
    /// Old terminal rows the size part's purge deletes while confirms are ingested.
    #[arg(long, default_value_t = 1_000_000)]
    pub purge_rows: u64,
    /// Ids per CHECK / CONFIRM message in the pre-filled queues.
    #[arg(long, default_value_t = 100)]
    pub ids_per_message: usize,
    /// Run only these parts (comma-separated); default all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Part>,
    /// Longest wait for any one phase.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Where the report (report.json, report.md), stores and service logs go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// A smoke run: a few thousand messages, small backlogs (sizes above are ignored).
    #[arg(long)]
    pub quick: bool,
}

impl BenchOptions {
    /// The sizes of a `--quick` run: every scenario completes, no figure means anything.
    pub fn quick(mut self) -> Self {
        self.quick = true;
        self.messages = 2_000;
        self.offered_orders = 200;
        self.offered_rate = 200;
        self.callback_messages = 2_000;
        self.backlog = vec![1_000, 5_000];
        self.backlog_window = Duration::from_secs(2);
        self.drain_messages = 500;
        // Just past the largest default tier (5 s).
        self.drain_outage = Duration::from_secs(6);
        self.size_rows = vec![1_000, 5_000];
        self.purge_rows = 5_000;
        self.deadline = self.deadline.min(Duration::from_secs(120));
        self
    }

    pub(super) fn runs(&self, part: Part) -> bool {
        if self.only.is_empty() { part != Part::Size } else { self.only.contains(&part) }
    }

    pub(super) fn check_delay_text(&self) -> String {
        format!("{}ms", self.check_delay.as_millis())
    }
}
