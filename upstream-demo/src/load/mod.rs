//! `upstream-demo load`: a client of a running order service. It creates orders
//! (some with injected faults), waits until the callback service has settled
//! every message, reads each consumer's effects and reports what is lost.
//!
//! - [`create`]: the orders, at a target rate and concurrency, with latencies;
//! - [`settle`]: polls `Admin.GetMessage` until each message is terminal;
//! - [`consumers`]: the consumers' stores, read-only;
//! - [`report`]: the counts and the `lost` arithmetic.

pub mod consumers;
pub mod create;
pub mod report;
pub mod settle;

use std::{io::IsTerminal, time::Duration};

use anyhow::{Context, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use recheck::topology::parse_duration;
use recheck_proto::{demo::v1::orders_client::OrdersClient, v1::admin_client::AdminClient};

use consumers::{ConsumerDb, ConsumerStore};
pub use report::Report;

#[derive(Debug, Clone, Args)]
pub struct LoadConfig {
    /// The order service's gRPC address.
    #[arg(long, env = "RECHECK_ORDERS_ADDR", default_value = "http://127.0.0.1:50061")]
    pub addr: String,

    /// Orders to create.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,

    /// Target orders per second; 0 = as fast as `--concurrency` allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

    /// `CreateOrder` calls in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub concurrency: u64,

    /// Fraction (0.0–1.0) of orders committed but never published (fault `SKIP_PUBLISH`).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub skip_publish_rate: f64,

    /// Fraction (0.0–1.0) of orders rolled back after their CHECK (fault `ABORT_AFTER_CHECK`).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub abort_after_check_rate: f64,

    /// Seed of the fault (and amount) choice, so a run can be repeated.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// The callback service's gRPC address (`Admin` API).
    #[arg(long, env = "RECHECK_ADMIN_ADDR", default_value = "http://127.0.0.1:50051")]
    pub admin_addr: String,

    /// Bearer token for the Admin API.
    #[arg(long, env = "RECHECK_ADMIN_TOKEN", hide_env_values = true, value_parser = recheck::auth::parse_attach)]
    pub admin_token: Option<recheck::auth::AttachToken>,

    /// TLS for `https://` addresses (`--addr`, `--admin-addr`).
    #[command(flatten)]
    pub tls: recheck::tls::ClientTlsArgs,

    /// A consumer's store as `NAME=URL` (repeat it, or comma-separate in the variable, one per
    /// expected consumer): its `points` ledger is read to count, per consumer, effects done,
    /// missing and doubled. Without any, `lost` is judged from the callback service's status.
    #[arg(
        long = "consumer-database-url",
        env = "RECHECK_CONSUMER_DATABASE_URLS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub consumer_database_urls: Vec<ConsumerDb>,

    /// The `points` consumer's store: short for `--consumer-database-url points=URL`.
    #[arg(long, env = "RECHECK_POINTS_DATABASE_URL", hide_env_values = true)]
    pub points_database_url: Option<recheck::SecretUrl>,

    /// How long to wait for every message to be terminal (`ms`, `s`, `m`, `h`).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub wait: Duration,

    /// Print the report as one JSON object on stdout (and no progress bars).
    #[arg(long)]
    pub json: bool,
}

/// Runs the load and prints the report (stdout; warnings and progress go to stderr,
/// so `--json` output stays one parsable object). An error means the run could not be set up
/// (or the consumer store could not be read); what the run found is never an error.
pub async fn run(config: LoadConfig) -> anyhow::Result<()> {
    let report = load(&config).await?;
    if config.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

/// The whole run, returning the report instead of printing it.
pub async fn load(config: &LoadConfig) -> anyhow::Result<Report> {
    ensure!(
        config.skip_publish_rate + config.abort_after_check_rate <= 1.0,
        "--skip-publish-rate plus --abort-after-check-rate must not exceed 1.0"
    );
    ensure!(config.rate >= 0.0 && config.rate.is_finite(), "--rate must be ≥ 0");
    let tls = config.tls.load()?;
    let orders = tls
        .endpoint(&config.addr)?
        .connect()
        .await
        .with_context(|| format!("connecting to the order service at {}", config.addr))?;
    let orders = OrdersClient::new(orders);
    // Lazy: the callback service may still be starting (or restarting) while orders are created.
    let admin = tls
        .endpoint(&config.admin_addr)
        .with_context(|| format!("--admin-addr {:?}", config.admin_addr))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let admin = AdminClient::with_interceptor(admin, config.admin_token.clone().unwrap_or_default());
    let mut stores = Vec::new();
    for db in config.consumer_stores()? {
        let store = ConsumerStore::connect(&db).await;
        stores.push(store.with_context(|| format!("opening the {} consumer's store", db.consumer))?);
    }

    let requests = create::plan(config);
    let bar = progress(requests.len() as u64, "created");
    let created =
        create::create_orders(orders, requests, config.rate, config.concurrency as usize, bar).await;
    if let Some(e) = &created.first_error {
        eprintln!("warning: {} CreateOrder calls failed; the first: {e}", created.errors);
    }

    let ids: Vec<String> = created.orders.iter().map(|o| o.message_id.clone()).collect();
    let bar = progress(ids.len() as u64, "settled");
    let settled = settle::settle(admin, ids, config.wait, bar).await;
    let mut effects = Vec::with_capacity(stores.len());
    for store in &stores {
        let read = store.effects().await;
        effects.push((
            store.consumer.clone(),
            read.with_context(|| format!("reading {}'s effects", store.consumer))?,
        ));
    }

    let mut report =
        Report::tally(config.count, &created.orders, created.errors, &settled.statuses, &effects);
    report.throughput_per_s = created.throughput_per_s();
    report.latency_us = created.latency();
    report.admin_error = settled.last_error.map(|e| format!("{}: {e}", config.admin_addr));
    Ok(report)
}

impl LoadConfig {
    /// Every consumer store to read, `--points-database-url` included; a name given twice is an error.
    pub fn consumer_stores(&self) -> anyhow::Result<Vec<ConsumerDb>> {
        let mut stores = self.consumer_database_urls.clone();
        if let Some(url) = &self.points_database_url {
            stores.push(ConsumerDb { consumer: "points".into(), url: url.clone() });
        }
        let mut names = std::collections::HashSet::new();
        if let Some(db) = stores.iter().find(|db| !names.insert(db.consumer.as_str())) {
            anyhow::bail!("two stores given for the consumer {:?}", db.consumer);
        }
        Ok(stores)
    }
}

/// A bar on stderr, shown when a person watches stderr: the report on stdout
/// (human or `--json`) stays clean either way.
fn progress(len: u64, what: &'static str) -> ProgressBar {
    let target = if !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let style =
        ProgressStyle::with_template("{msg:>8} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::with_draw_target(Some(len), target).with_style(style).with_message(what)
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0.0 and 1.0")),
    }
}
