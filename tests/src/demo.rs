//! The demo flow, once: the real binaries as processes on one broker (SQLite
//! stores in a directory) — the callback service, upstream-demo and two consumers,
//! `points` and `shipping`, every order expecting both — `upstream-demo load` with
//! faults, then the combined report ([`report`]). `scripts/demo` runs it big from
//! release binaries (through `bin/demo.rs`); the `demo_flow` suite runs it small
//! from debug binaries.

mod report;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use tokio::process::Command;

use crate::Rabbit;
use crate::deploy::{ConsumerFaults, ConsumerSpec, DeployOptions, Deployment, LoadOptions, Verdict};
use crate::faults::{POINTS, SHIPPING};

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
    /// Delay of the first check: short, so the demo ends in minutes.
    #[arg(long, default_value = "3s")]
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
/// `stats`, and the verdict from the stores.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub orders: u64,
    pub faults: Injected,
    pub load: Value,
    /// `downstream-demo stats --json` of each consumer, in deployment order.
    pub consumers: Vec<Value>,
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

/// Runs the whole flow against `rabbit` with the binaries in `bin_dir`.
pub async fn run(rabbit: &Rabbit, bin_dir: &Path, opts: &DemoOptions) -> Result<DemoReport> {
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
    let load = deployment.load(&load).await?;

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
    let verdict = deployment.verdict().await?;
    deployment.stop().await?;

    let lost = load.get("lost").and_then(Value::as_u64).context("the load report has no `lost`")?;
    let exactly_once = verdict.exactly_once().err().map(|e| format!("{e:#}"));
    Ok(DemoReport {
        orders: opts.orders,
        faults: Injected {
            skip_publish_rate: opts.skip_publish_rate,
            abort_after_check_rate: opts.abort_after_check_rate,
            fail_rate: opts.fail_rate,
            reject_rate: opts.reject_rate,
            drop_confirm_rate: opts.drop_confirm_rate,
            drop_message_rate: opts.drop_message_rate,
            slow_ms: opts.slow_ms,
        },
        lost: lost.max(verdict.lost),
        exactly_once: exactly_once.is_none(),
        exactly_once_error: exactly_once,
        load,
        consumers,
        verdict,
    })
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
