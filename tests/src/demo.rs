//! The demo flow, once: the three real binaries as processes on one broker
//! (SQLite stores in a directory), `upstream-demo load` with faults, then the
//! combined report. `scripts/demo` runs it big from release binaries (through
//! `bin/demo.rs`); the `demo_flow` suite runs it small from debug binaries.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use tokio::process::Command;

use crate::Rabbit;
use crate::deploy::{ConsumerFaults, DeployOptions, Deployment, LoadOptions};

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
    /// Fraction of messages the consumer processes but never confirms.
    #[arg(long, default_value_t = 0.03)]
    pub drop_confirm_rate: f64,
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

/// The combined report: the load generator's, the consumer's, and the verdict.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub load: Value,
    pub consumer: Value,
    pub lost: u64,
    pub points_equal_confirmed: bool,
}

impl DemoReport {
    pub fn field(&self, name: &str) -> u64 {
        self.load.get(name).and_then(Value::as_u64).unwrap_or(0)
    }
}

/// Runs the whole flow against `rabbit` with the binaries in `bin_dir`.
pub async fn run(rabbit: &Rabbit, bin_dir: &Path, opts: &DemoOptions) -> Result<DemoReport> {
    let vhost = rabbit.fresh_vhost().await?;
    let deploy = DeployOptions {
        tiers: opts.tiers.clone(),
        check_delay: opts.check_delay.clone(),
        callback_database_url: opts.callback_database_url.clone(),
        deferral: !opts.no_deferral,
        consumer_faults: ConsumerFaults {
            drop_confirm_rate: opts.drop_confirm_rate,
            fail_rate: opts.fail_rate,
            reject_rate: opts.reject_rate,
            slow_ms: opts.slow_ms,
        },
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

    let stats = Command::new(bin_dir.join("downstream-demo"))
        .args(["stats", "--json"])
        .env("DATABASE_URL", &deployment.points_db)
        .output()
        .await
        .context("running downstream-demo stats")?;
    anyhow::ensure!(stats.status.success(), "downstream-demo stats failed");
    let consumer: Value = serde_json::from_slice(&stats.stdout).context("reading the consumer stats")?;
    let verdict = deployment.verdict().await?;
    deployment.stop().await?;

    let lost = load.get("lost").and_then(Value::as_u64).context("the load report has no `lost`")?;
    let confirmed = load.get("confirmed").and_then(Value::as_u64).unwrap_or(u64::MAX);
    let points = load.get("points").and_then(Value::as_u64).unwrap_or(0);
    Ok(DemoReport {
        lost: lost.max(verdict.lost),
        points_equal_confirmed: points == confirmed && verdict.points == verdict.confirmed,
        load,
        consumer,
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

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "== orders (upstream-demo load) ==")?;
        for (key, value) in self.load.as_object().into_iter().flatten() {
            writeln!(f, "{key:>24}: {value}")?;
        }
        writeln!(f, "== points (downstream-demo stats) ==")?;
        for (key, value) in self.consumer.as_object().into_iter().flatten() {
            writeln!(f, "{key:>24}: {value}")?;
        }
        writeln!(f, "== verdict ==")?;
        writeln!(f, "{:>24}: {}", "lost", self.lost)?;
        write!(f, "{:>24}: {}", "points == confirmed", self.points_equal_confirmed)
    }
}
