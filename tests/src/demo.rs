//! The demo flow, once: the real binaries as processes on one broker (SQLite
//! stores in a directory) — the callback service, upstream-demo and two consumers,
//! `points` and `shipping`, every order expecting both — `upstream-demo load` with
//! faults, then the combined report ([`report`]). `scripts/demo` runs it big from
//! release binaries (through `bin/demo.rs`, which can also keep the services running
//! afterwards: [`keep`]); the `demo_flow` suite runs it small from debug binaries.

pub mod keep;
pub mod progress;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use tokio::process::Command;

use crate::Rabbit;
use crate::deploy::{ConsumerFaults, ConsumerSpec, DeployOptions, Deployment, LoadOptions, Role, Verdict};
use crate::faults::{POINTS, SHIPPING};
pub use keep::KeepInfo;
pub use progress::Progress;

/// Everything the demo can be asked to do.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Orders to create.
    #[arg(long, default_value_t = 20_000)]
    pub orders: u64,
    /// Target create rate, orders/s (0 = as fast as the service takes them).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    #[arg(long, default_value_t = 64)]
    pub concurrency: u64,
    /// Fraction of orders committed but never published (a crash after commit).
    #[arg(long, default_value_t = 0.03)]
    pub skip_publish_rate: f64,
    /// Fraction of orders whose transaction rolls back after the CHECK.
    #[arg(long, default_value_t = 0.03)]
    pub abort_after_check_rate: f64,
    /// Fraction of messages each consumer processes but never confirms.
    #[arg(long, default_value_t = 0.03)]
    pub drop_confirm_rate: f64,
    /// Fraction of business messages lost on their way to `shipping` only (`points` gets them).
    #[arg(long, default_value_t = 0.03)]
    pub drop_message_rate: f64,
    /// Fraction of deliveries failing transiently before commit (redelivered).
    #[arg(long, default_value_t = 0.03)]
    pub fail_rate: f64,
    /// Fraction of orders the consumer rejects for business reasons.
    #[arg(long, default_value_t = 0.02)]
    pub reject_rate: f64,
    /// Pause per message inside the consumer's transaction, ms.
    #[arg(long, default_value_t = 1)]
    pub slow_ms: u64,
    /// Resend into a lagging consumer instead of deferring its checks (to compare).
    #[arg(long)]
    pub no_deferral: bool,
    /// Delay of the first check: short, so the demo ends in minutes (at least the reserved
    /// CHECKs' max age, 3 s, + the grace, 2 s).
    #[arg(long, default_value = "5s")]
    pub check_delay: String,
    /// Delay tiers of the re-checks.
    #[arg(long, default_value = "1s,3s,5s")]
    pub tiers: String,
    /// Longest wait for every message to reach a terminal state.
    #[arg(long, default_value = "10m")]
    pub wait: String,
    /// The callback service's store (default: SQLite next to the others).
    #[arg(long)]
    pub callback_database_url: Option<String>,
    /// Where the SQLite stores and the service logs go (emptied first).
    #[arg(long, default_value = "target/demo")]
    pub dir: PathBuf,
}

/// The combined report: what was injected, the load generator's report, each consumer's
/// `stats`, what the services counted, and the verdict from the stores. `--json` prints it as
/// is; [`std::fmt::Display`] is the table a person reads.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub orders: u64,
    /// Wall-clock seconds from starting the services to the verdict.
    pub seconds: f64,
    pub faults: Injected,
    /// Checks of a lagging consumer were deferred (not `--no-deferral`).
    pub deferral: bool,
    /// `upstream-demo load --json`.
    pub load: Value,
    /// `downstream-demo stats --json` of each consumer, in deployment order.
    pub consumers: Vec<Value>,
    /// What the services' `/metrics` counted; `None` when a scrape failed
    /// (`observed_error` says why).
    pub observed: Option<Observed>,
    pub observed_error: Option<String>,
    pub verdict: Verdict,
    /// The larger of the load's and the verdict's counts: both must be 0.
    pub lost: u64,
    /// Every consumer applied every confirmed order exactly once (ledger and balances).
    pub exactly_once: bool,
    /// Why not, when not.
    pub exactly_once_error: Option<String>,
}

/// The fault rates the run used.
#[derive(Debug, Clone, Serialize)]
pub struct Injected {
    pub skip_publish_rate: f64,
    pub abort_after_check_rate: f64,
    pub fail_rate: f64,
    pub reject_rate: f64,
    pub drop_confirm_rate: f64,
    pub drop_message_rate: f64,
    pub slow_ms: u64,
}

/// The services' own counts over the run, from their `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Observed {
    /// Due checks by decision (`recheck_checks_total{result}`), zeros left out.
    pub checks: BTreeMap<String, u64>,
    /// Checks re-checked later without a resend, by reason (`recheck_checks_deferred_total`).
    pub checks_deferred: BTreeMap<String, u64>,
    /// Per consumer, in deployment order: deliveries whose transaction failed and that were
    /// nacked for redelivery (`recheck_consumer_messages_total{outcome="retried"}`).
    pub retried: Vec<ConsumerCount>,
}

/// One number of one consumer.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerCount {
    pub consumer: String,
    pub count: u64,
}

/// `recheck_checks_total`'s and `recheck_checks_deferred_total`'s label values (docs/operations.md).
const CHECK_RESULTS: [&str; 9] =
    ["done", "confirmed", "resent", "retry", "void", "failed", "deferred", "watch", "takeover"];
const DEFER_REASONS: [&str; 2] = ["backlog", "circuit"];

impl Observed {
    /// Scrapes the first callback instance and every consumer.
    async fn scrape(deployment: &Deployment) -> Result<Self> {
        let callback = deployment.scrape(Role::Callback(0)).await?;
        let by = |name: &str, label: &str, values: &[&str]| -> BTreeMap<String, u64> {
            values
                .iter()
                .map(|v| (v.to_string(), callback.sum(name, &[(label, v)]) as u64))
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        let mut retried = Vec::new();
        for (i, c) in deployment.consumers.iter().enumerate() {
            let metrics = deployment.scrape(Role::Consumer(i)).await?;
            let count = metrics.sum("recheck_consumer_messages_total", &[("outcome", "retried")]);
            retried.push(ConsumerCount { consumer: c.name.clone(), count: count as u64 });
        }
        Ok(Self {
            checks: by("recheck_checks_total", "result", &CHECK_RESULTS),
            checks_deferred: by("recheck_checks_deferred_total", "reason", &DEFER_REASONS),
            retried,
        })
    }
}

impl DemoReport {
    /// A number from the load generator's report (0 if absent).
    pub fn field(&self, name: &str) -> u64 {
        self.load.get(name).and_then(Value::as_u64).unwrap_or(0)
    }

    /// Nothing lost, and each consumer's effect exactly once.
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.exactly_once
    }
}

/// Runs the whole flow against `rabbit` with the binaries in `bin_dir`, and stops the services.
pub async fn run(rabbit: &Rabbit, bin_dir: &Path, opts: &DemoOptions) -> Result<DemoReport> {
    let finished = run_and_keep(rabbit, bin_dir, opts, &Progress::hidden()).await?;
    finished.deployment.stop().await?;
    Ok(finished.report)
}

/// A run whose services are still up: the report, and the deployment to look at or stop.
pub struct Finished {
    pub report: DemoReport,
    pub deployment: Deployment,
    /// The vhost the services use.
    pub amqp_url: String,
}

/// The whole flow, reporting each step to `progress`; the services are left running (the
/// caller stops them: [`Deployment::stop`]).
pub async fn run_and_keep(
    rabbit: &Rabbit,
    bin_dir: &Path,
    opts: &DemoOptions,
    progress: &Progress,
) -> Result<Finished> {
    let started = Instant::now();
    let names = format!("{POINTS} and {SHIPPING}");
    progress.start(format!("starting callback-service, upstream-demo and the consumers {names}"));
    let vhost = rabbit.fresh_vhost().await?;
    // Rejections are decided by message id, so both consumers reject the same orders.
    let faults = ConsumerFaults {
        drop_confirm_rate: opts.drop_confirm_rate,
        drop_message_rate: 0.0,
        fail_rate: opts.fail_rate,
        reject_rate: opts.reject_rate,
        slow_ms: opts.slow_ms,
    };
    let shipping = ConsumerFaults { drop_message_rate: opts.drop_message_rate, ..faults.clone() };
    let deploy = DeployOptions {
        tiers: opts.tiers.clone(),
        check_delay: opts.check_delay.clone(),
        callback_database_url: opts.callback_database_url.clone(),
        deferral: !opts.no_deferral,
        consumers: vec![
            ConsumerSpec { faults, ..ConsumerSpec::new(POINTS) },
            ConsumerSpec { faults: shipping, ..ConsumerSpec::new(SHIPPING) },
        ],
        ..DeployOptions::new(&opts.dir, vhost.url.clone())
    };
    let deployment = Deployment::start(bin_dir, &deploy).await?;
    let load = LoadOptions {
        rate: opts.rate,
        concurrency: opts.concurrency,
        skip_publish_rate: opts.skip_publish_rate,
        abort_after_check_rate: opts.abort_after_check_rate,
        wait: opts.wait.clone(),
        ..LoadOptions::new(opts.orders)
    };
    // upstream-demo draws its own bars (orders created, messages settled) on a terminal.
    progress.hand_over(format!(
        "upstream-demo load: {} orders with faults, then every message settled",
        crate::bench::report::count(opts.orders as f64)
    ));
    let load = deployment.load(&load).await?;

    progress.start("reading the stores and the services' metrics");
    let mut consumers = Vec::new();
    for c in &deployment.consumers {
        let stats = Command::new(bin_dir.join("downstream-demo"))
            .args(["stats", "--json", "--consumer", &c.name])
            .env("DATABASE_URL", &c.db)
            .output()
            .await
            .context("running downstream-demo stats")?;
        anyhow::ensure!(stats.status.success(), "downstream-demo stats failed for {}", c.name);
        consumers.push(serde_json::from_slice(&stats.stdout).context("reading the consumer stats")?);
    }
    let (observed, observed_error) = match Observed::scrape(&deployment).await {
        Ok(observed) => (Some(observed), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let verdict = deployment.verdict().await?;
    progress.done();

    let lost = load.get("lost").and_then(Value::as_u64).context("the load report has no `lost`")?;
    let exactly_once = verdict.exactly_once().err().map(|e| format!("{e:#}"));
    let report = DemoReport {
        orders: opts.orders,
        seconds: started.elapsed().as_secs_f64(),
        faults: Injected {
            skip_publish_rate: opts.skip_publish_rate,
            abort_after_check_rate: opts.abort_after_check_rate,
            fail_rate: opts.fail_rate,
            reject_rate: opts.reject_rate,
            drop_confirm_rate: opts.drop_confirm_rate,
            drop_message_rate: opts.drop_message_rate,
            slow_ms: opts.slow_ms,
        },
        deferral: !opts.no_deferral,
        lost: lost.max(verdict.lost),
        exactly_once: exactly_once.is_none(),
        exactly_once_error: exactly_once,
        load,
        consumers,
        observed,
        observed_error,
        verdict,
    };
    Ok(Finished { report, deployment, amqp_url: vhost.url.clone() })
}

/// Where the workspace binaries are, seen from a running test or tool binary
/// (`target/<profile>/deps/x` or `target/<profile>/x`).
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("no parent")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}
