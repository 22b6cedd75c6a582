//! The load of a deployment: `upstream-demo load --json` against its services, every consumer's
//! store given to it, and the producer's commit count while it runs.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

use super::{Deployment, open};

impl Deployment {
    /// `upstream-demo load --json`, started; [`finish_load`] reads its report.
    pub fn spawn_load(&self, load: &LoadOptions) -> Result<Child> {
        let mut command = Command::new(self.bin_dir.join("upstream-demo"));
        command.args(["load", "--json"]);
        for c in &self.consumers {
            command.args(["--consumer-database-url", &format!("{}={}", c.name, c.db)]);
        }
        command
            .args(["--count", &load.orders.to_string(), "--rate", &load.rate.to_string()])
            .args(["--concurrency", &load.concurrency.to_string()])
            .args(["--skip-publish-rate", &load.skip_publish_rate.to_string()])
            .args(["--abort-after-check-rate", &load.abort_after_check_rate.to_string()])
            .args(["--seed", &load.seed.to_string()])
            .args(["--addr", &format!("http://127.0.0.1:{}", self.orders_port)])
            .args(["--admin-addr", &format!("http://127.0.0.1:{}", self.callback_ports[0])])
            .args(["--wait", &load.wait])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting upstream-demo load")
    }

    /// The whole load, start to report.
    pub async fn load(&self, load: &LoadOptions) -> Result<Value> {
        finish_load(self.spawn_load(load)?).await
    }

    /// Waits until the producer has committed `n` orders (or `within` passed: an error); returns
    /// the count seen.
    pub async fn wait_committed(&self, n: u64, within: Duration) -> Result<u64> {
        let orders = open(&self.orders_db).await?;
        let deadline = Instant::now() + within;
        let result = loop {
            let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders").fetch_one(&orders).await?;
            if count as u64 >= n {
                break Ok(count as u64);
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!("only {count} of {n} orders committed after {within:?}"));
            }
            sleep(Duration::from_millis(50)).await;
        };
        orders.close().await;
        result
    }
}

/// What `upstream-demo load` is asked to do.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub orders: u64,
    /// Orders per second (0 = as fast as the service answers).
    pub rate: u64,
    pub concurrency: u64,
    pub skip_publish_rate: f64,
    pub abort_after_check_rate: f64,
    pub seed: u64,
    /// How long the load waits for every message to settle.
    pub wait: String,
}

impl LoadOptions {
    pub fn new(orders: u64) -> Self {
        Self {
            orders,
            rate: 0,
            concurrency: 32,
            skip_publish_rate: 0.0,
            abort_after_check_rate: 0.0,
            seed: 1,
            wait: "5m".into(),
        }
    }
}

/// Waits for a started load and parses its JSON report.
pub async fn finish_load(load: Child) -> Result<Value> {
    let output = load.wait_with_output().await.context("running upstream-demo load")?;
    anyhow::ensure!(
        output.status.success(),
        "upstream-demo load failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
    serde_json::from_slice(&output.stdout).context("reading the load report")
}
