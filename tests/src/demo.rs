//! The demo flow, once: the three real binaries as processes on one broker
//! (SQLite stores in a directory), `upstream-demo load` with faults, then the
//! combined report. `scripts/demo` runs it big from release binaries (through
//! `bin/demo.rs`); the `demo_flow` suite runs it small from debug binaries.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

use crate::{Rabbit, free_port};

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
    /// Where the three SQLite stores and the service logs go (emptied first).
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

/// A started service; stopped with SIGTERM (then SIGKILL) when dropped via [`Service::stop`].
struct Service {
    name: &'static str,
    child: Child,
}

impl Service {
    fn start(
        bin_dir: &Path,
        name: &'static str,
        args: &[&str],
        env: &[(&str, String)],
        log: &Path,
    ) -> Result<Self> {
        let binary = bin_dir.join(name);
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: build the workspace binaries first",
            binary.display()
        );
        let log = std::fs::File::create(log)?;
        let child = Command::new(&binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RECHECK_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child })
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                anyhow::ensure!(status.success(), "{} exited with {status}", self.name);
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("{} did not stop within 20 s of SIGTERM", self.name);
            }
        }
        Ok(())
    }
}

/// Runs the whole flow against `rabbit` with the binaries in `bin_dir`.
pub async fn run(rabbit: &Rabbit, bin_dir: &Path, opts: &DemoOptions) -> Result<DemoReport> {
    let dir = &opts.dir;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let vhost = rabbit.fresh_vhost().await?;
    let (callback_port, orders_port) = (free_port()?, free_port()?);
    let sqlite = |name: &str| format!("sqlite://{}/{name}.db?mode=rwc", dir.display());
    let common = |db: String| {
        vec![
            ("RECHECK_AMQP_URL", vhost.url.clone()),
            ("RECHECK_DELAY_TIERS", opts.tiers.clone()),
            ("DATABASE_URL", db),
        ]
    };

    let mut callback_env = common(sqlite("callback"));
    callback_env.push(("RECHECK_GRPC_ADDR", format!("127.0.0.1:{callback_port}")));
    callback_env.push(("RECHECK_PRODUCERS", format!("orders=http://127.0.0.1:{orders_port}")));
    if !opts.no_deferral {
        callback_env.push(("RECHECK_CONSUMER_QUEUES", "points=points.order-created".into()));
    }
    let mut upstream_env = common(sqlite("orders"));
    upstream_env.push(("RECHECK_GRPC_ADDR", format!("127.0.0.1:{orders_port}")));
    upstream_env.push(("RECHECK_CHECK_DELAY", opts.check_delay.clone()));
    // Aborted orders are declared void once their check is older than this.
    upstream_env.push(("RECHECK_GRACE", "5s".into()));
    let mut downstream_env = common(sqlite("points"));
    downstream_env.push(("RECHECK_DROP_CONFIRM_RATE", opts.drop_confirm_rate.to_string()));
    downstream_env.push(("RECHECK_FAIL_RATE", opts.fail_rate.to_string()));
    downstream_env.push(("RECHECK_REJECT_RATE", opts.reject_rate.to_string()));
    downstream_env.push(("RECHECK_SLOW_MS", opts.slow_ms.to_string()));

    let callback =
        Service::start(bin_dir, "callback-service", &[], &callback_env, &dir.join("callback.log"))?;
    let upstream =
        Service::start(bin_dir, "upstream-demo", &["serve"], &upstream_env, &dir.join("upstream.log"))?;
    let downstream =
        Service::start(bin_dir, "downstream-demo", &["serve"], &downstream_env, &dir.join("downstream.log"))?;
    wait_for_port(callback_port, &dir.join("callback.log")).await?;
    wait_for_port(orders_port, &dir.join("upstream.log")).await?;
    wait_for_consumer(rabbit, &vhost.name, &dir.join("downstream.log")).await?;

    let load = Command::new(bin_dir.join("upstream-demo"))
        .args(["load", "--json"])
        .args(["--count", &opts.orders.to_string(), "--rate", &opts.rate.to_string()])
        .args(["--concurrency", &opts.concurrency.to_string()])
        .args(["--skip-publish-rate", &opts.skip_publish_rate.to_string()])
        .args(["--abort-after-check-rate", &opts.abort_after_check_rate.to_string()])
        .args(["--addr", &format!("http://127.0.0.1:{orders_port}")])
        .args(["--admin-addr", &format!("http://127.0.0.1:{callback_port}")])
        .args(["--points-database-url", &sqlite("points")])
        .args(["--wait", &opts.wait])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("running upstream-demo load")?;
    anyhow::ensure!(
        load.status.success(),
        "upstream-demo load failed: {}",
        String::from_utf8_lossy(&load.stdout)
    );
    let load: Value = serde_json::from_slice(&load.stdout).context("reading the load report")?;

    let stats = Command::new(bin_dir.join("downstream-demo"))
        .args(["stats", "--json"])
        .env("DATABASE_URL", sqlite("points"))
        .output()
        .await
        .context("running downstream-demo stats")?;
    anyhow::ensure!(stats.status.success(), "downstream-demo stats failed");
    let consumer: Value = serde_json::from_slice(&stats.stdout).context("reading the consumer stats")?;

    for service in [upstream, downstream, callback] {
        service.stop().await?;
    }
    let lost = load.get("lost").and_then(Value::as_u64).context("the load report has no `lost`")?;
    let confirmed = load.get("confirmed").and_then(Value::as_u64).unwrap_or(u64::MAX);
    let points = load.get("points").and_then(Value::as_u64).unwrap_or(0);
    Ok(DemoReport { lost, points_equal_confirmed: points == confirmed, load, consumer })
}

async fn wait_for_port(port: u16, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port} after 60 s; log:\n{}", crate::watchdog::tail(log, 20));
        }
        sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The consumer is up once its queue has a consumer.
async fn wait_for_consumer(rabbit: &Rabbit, vhost: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = rabbit
            .ctl(&["list_queues", "-q", "--no-table-headers", "-p", vhost, "name", "consumers"])
            .await?;
        let consuming = listed
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .any(|(name, n)| name.starts_with("points") && n.trim() != "0");
        if consuming {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("downstream-demo is not consuming after 60 s; log:\n{}", crate::watchdog::tail(log, 20));
        }
        sleep(Duration::from_millis(300)).await;
    }
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
