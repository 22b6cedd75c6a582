//! A deployment of the three real binaries as processes — callback service(s), upstream-demo,
//! downstream-demo — on one broker, with SQLite stores in a directory (the callback store may be
//! PostgreSQL). Each service can be killed with SIGKILL and started again with the same settings;
//! the load runs as `upstream-demo load`; the [`Verdict`] is computed from the three stores.
//! Shared by the demo, the fault matrix and the benchmark.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;
use sqlx::AnyPool;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

use crate::free_port;

/// The consumer's queue (downstream-demo's default) and name.
pub const CONSUMER_QUEUE: &str = "points.order-created";
pub const CONSUMER: &str = "points";

/// How the services are set up.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// Stores and logs go here (emptied first).
    pub dir: PathBuf,
    /// Given to every service as `RECHECK_AMQP_URL` (one URL, a comma-separated list, or a proxy's).
    pub amqp_url: String,
    /// Delay tiers of the re-checks.
    pub tiers: String,
    /// Delay of the first check.
    pub check_delay: String,
    /// Uncommitted messages are declared void once their check is older than this.
    pub grace: String,
    /// The callback store; `None` = SQLite in `dir`.
    pub callback_database_url: Option<String>,
    /// Callback service instances sharing that store.
    pub callbacks: usize,
    /// Defer checks while the consumer's queue has a backlog.
    pub deferral: bool,
    pub consumer_faults: ConsumerFaults,
    /// Extra environment for the callback service(s) and for upstream-demo (they win over the
    /// deployment's own settings).
    pub callback_env: Vec<(String, String)>,
    pub upstream_env: Vec<(String, String)>,
    pub downstream_env: Vec<(String, String)>,
    /// What the callback service calls as the producer hook (e.g. a fault proxy in front of
    /// upstream-demo); `None` = upstream-demo directly.
    pub hook_addr: Option<String>,
    /// upstream-demo's gRPC port; `None` = a free one (set it to put a proxy in front first).
    pub orders_port: Option<u16>,
}

/// downstream-demo's injected faults.
#[derive(Debug, Clone, Default)]
pub struct ConsumerFaults {
    pub drop_confirm_rate: f64,
    pub fail_rate: f64,
    pub reject_rate: f64,
    pub slow_ms: u64,
}

impl DeployOptions {
    pub fn new(dir: impl Into<PathBuf>, amqp_url: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            amqp_url: amqp_url.into(),
            tiers: "1s,3s,5s".into(),
            check_delay: "3s".into(),
            grace: "5s".into(),
            callback_database_url: None,
            callbacks: 1,
            deferral: true,
            consumer_faults: ConsumerFaults::default(),
            callback_env: Vec::new(),
            upstream_env: Vec::new(),
            downstream_env: Vec::new(),
            hook_addr: None,
            orders_port: None,
        }
    }
}

/// One of the services of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Role {
    /// The n-th callback service instance (0-based).
    Callback(usize),
    Upstream,
    Downstream,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Callback(0) => f.write_str("callback-service"),
            Role::Callback(n) => write!(f, "callback-service-{n}"),
            Role::Upstream => f.write_str("upstream-demo"),
            Role::Downstream => f.write_str("downstream-demo"),
        }
    }
}

/// CPU and memory one service used over all its incarnations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
}

/// A service's command line and environment, and its current process if running.
struct Service {
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    usage: Usage,
}

impl Service {
    fn spawn(&mut self) -> Result<()> {
        anyhow::ensure!(
            self.binary.exists(),
            "{} is missing: build the workspace binaries first",
            self.binary.display()
        );
        // Appended: a restarted service's log follows its previous incarnation's.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Adds the running process's CPU time and peak RSS to the totals (read just before it ends).
    fn sample(&mut self) {
        if let Some(usage) = self.child.as_ref().and_then(Child::id).and_then(proc_usage) {
            self.usage.cpu_seconds += usage.cpu_seconds;
            self.usage.peak_rss_bytes = self.usage.peak_rss_bytes.max(usage.peak_rss_bytes);
        }
    }

    async fn kill(&mut self) -> Result<()> {
        self.sample();
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL and an error after `bound`).
    async fn terminate(&mut self, bound: Duration) -> Result<()> {
        self.sample();
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        match tokio::time::timeout(bound, child.wait()).await {
            Ok(status) => {
                let status = status?;
                anyhow::ensure!(status.success(), "{} exited with {status}", self.binary.display());
                Ok(())
            }
            Err(_) => {
                child.kill().await?;
                bail!("{} did not stop within {bound:?} of SIGTERM", self.binary.display())
            }
        }
    }
}

/// The running services and where their stores are.
pub struct Deployment {
    pub dir: PathBuf,
    bin_dir: PathBuf,
    amqp_url: String,
    /// gRPC ports of the callback instances (Admin API), and of upstream-demo (Orders + hook).
    pub callback_ports: Vec<u16>,
    pub orders_port: u16,
    pub orders_db: String,
    pub points_db: String,
    pub callback_db: String,
    /// Each service's ops HTTP port (`/metrics`, `/healthz`, `/readyz`).
    pub ops_ports: HashMap<Role, u16>,
    services: HashMap<Role, Service>,
}

/// Outcome counts from the stores: what the producer committed against what the consumer did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Orders in the producer's store.
    pub committed: u64,
    /// Of those, the callback service's status.
    pub confirmed: u64,
    pub rejected: u64,
    pub failed: u64,
    pub void_committed: u64,
    /// Not terminal (or unknown) in the callback store.
    pub pending: u64,
    /// Rows in the consumer's `points` table.
    pub points: u64,
    /// Extra deliveries the consumer's inbox absorbed.
    pub duplicates_absorbed: u64,
    /// Sum of `resend_count` over committed messages, and messages resent at least once.
    pub resends: u64,
    pub resent_messages: u64,
    /// `ResendHook` calls the producer answered, and calls beyond the first per (message, attempt).
    pub hook_calls: u64,
    pub repeated_hook_calls: u64,
    /// Committed, not in the consumer's effects and not failed / rejected (void counts as lost).
    pub lost: u64,
    /// A few lost ids, to start looking.
    pub lost_sample: Vec<String>,
}

impl Verdict {
    /// Every committed message reached a terminal state.
    pub fn settled(&self) -> bool {
        self.pending == 0
    }
}

impl Deployment {
    /// Starts every service and waits until each is ready (gRPC listening, consumer attached).
    pub async fn start(bin_dir: &Path, opts: &DeployOptions) -> Result<Self> {
        let _ = std::fs::remove_dir_all(&opts.dir);
        std::fs::create_dir_all(&opts.dir)?;
        let dir = opts.dir.canonicalize()?;
        let sqlite = |name: &str| format!("sqlite://{}/{name}.db?mode=rwc", dir.display());
        let callback_db = opts.callback_database_url.clone().unwrap_or_else(|| sqlite("callback"));
        let callback_ports = (0..opts.callbacks.max(1)).map(|_| free_port()).collect::<Result<Vec<_>>>()?;
        let orders_port = match opts.orders_port {
            Some(port) => port,
            None => free_port()?,
        };
        let hook = opts.hook_addr.clone().unwrap_or_else(|| format!("http://127.0.0.1:{orders_port}"));

        let common = |db: &str| {
            vec![
                ("RECHECK_AMQP_URL".to_owned(), opts.amqp_url.clone()),
                ("RECHECK_DELAY_TIERS".to_owned(), opts.tiers.clone()),
                ("DATABASE_URL".to_owned(), db.to_owned()),
                ("RECHECK_LOG".to_owned(), "warn".to_owned()),
            ]
        };
        let mut services = HashMap::new();
        let mut add = |role: Role, binary: &str, args: &[&str], env: Vec<(String, String)>| {
            let service = Service {
                binary: bin_dir.join(binary),
                args: args.iter().map(|s| s.to_string()).collect(),
                env,
                log: dir.join(format!("{role}.log")),
                child: None,
                usage: Usage::default(),
            };
            services.insert(role, service);
        };
        for (i, port) in callback_ports.iter().enumerate() {
            let mut env = common(&callback_db);
            env.push(("RECHECK_GRPC_ADDR".into(), format!("127.0.0.1:{port}")));
            env.push(("RECHECK_PRODUCERS".into(), format!("orders={hook}")));
            if opts.deferral {
                env.push(("RECHECK_CONSUMER_QUEUES".into(), format!("{CONSUMER}={CONSUMER_QUEUE}")));
            }
            env.extend(opts.callback_env.iter().cloned());
            add(Role::Callback(i), "callback-service", &[], env);
        }
        let mut env = common(&sqlite("orders"));
        env.push(("RECHECK_GRPC_ADDR".into(), format!("127.0.0.1:{orders_port}")));
        env.push(("RECHECK_CHECK_DELAY".into(), opts.check_delay.clone()));
        env.push(("RECHECK_GRACE".into(), opts.grace.clone()));
        env.extend(opts.upstream_env.iter().cloned());
        add(Role::Upstream, "upstream-demo", &["serve"], env);
        let faults = &opts.consumer_faults;
        let mut env = common(&sqlite("points"));
        env.push(("RECHECK_DROP_CONFIRM_RATE".into(), faults.drop_confirm_rate.to_string()));
        env.push(("RECHECK_FAIL_RATE".into(), faults.fail_rate.to_string()));
        env.push(("RECHECK_REJECT_RATE".into(), faults.reject_rate.to_string()));
        env.push(("RECHECK_SLOW_MS".into(), faults.slow_ms.to_string()));
        env.extend(opts.downstream_env.iter().cloned());
        add(Role::Downstream, "downstream-demo", &["serve"], env);
        let mut ops_ports = HashMap::new();
        for (role, service) in services.iter_mut() {
            let port = free_port()?;
            service.env.push(("RECHECK_OPS_ADDR".into(), format!("127.0.0.1:{port}")));
            ops_ports.insert(*role, port);
        }

        let mut deployment = Self {
            dir: dir.clone(),
            bin_dir: bin_dir.to_owned(),
            amqp_url: opts.amqp_url.clone(),
            callback_ports,
            orders_port,
            orders_db: sqlite("orders"),
            points_db: sqlite("points"),
            callback_db,
            ops_ports,
            services,
        };
        // The callback service first: it migrates its store, and the second instance waits for that.
        for role in deployment.roles() {
            deployment.start_service(role).await?;
        }
        Ok(deployment)
    }

    /// Every role, callback instances first.
    pub fn roles(&self) -> Vec<Role> {
        let mut roles: Vec<Role> = self.services.keys().copied().collect();
        roles.sort();
        roles
    }

    /// (Re)starts `role` and waits until it is ready.
    pub async fn start_service(&mut self, role: Role) -> Result<()> {
        let service =
            self.services.get_mut(&role).with_context(|| format!("no {role} in this deployment"))?;
        anyhow::ensure!(service.child.is_none(), "{role} is already running");
        service.spawn()?;
        let log = service.log.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        match role {
            Role::Callback(i) => wait_for_port(self.callback_ports[i], deadline, &log).await,
            Role::Upstream => wait_for_port(self.orders_port, deadline, &log).await,
            Role::Downstream => wait_for_consumer(&self.amqp_url, CONSUMER_QUEUE, Duration::from_secs(60))
                .await
                .with_context(|| format!("downstream-demo log:\n{}", crate::watchdog::tail(&log, 20))),
        }
    }

    /// Sets (or replaces) one environment variable of `role`, for its next start.
    pub fn set_env(&mut self, role: Role, key: &str, value: &str) -> Result<()> {
        let service = self.services.get_mut(&role).with_context(|| format!("no {role}"))?;
        service.env.retain(|(k, _)| k != key);
        service.env.push((key.to_owned(), value.to_owned()));
        Ok(())
    }

    /// `kill -9`: no shutdown, no flush, connections dropped by the kernel.
    pub async fn kill(&mut self, role: Role) -> Result<()> {
        self.services.get_mut(&role).with_context(|| format!("no {role}"))?.kill().await
    }

    /// SIGTERM and a clean exit within `bound`.
    pub async fn terminate(&mut self, role: Role, bound: Duration) -> Result<()> {
        self.services.get_mut(&role).with_context(|| format!("no {role}"))?.terminate(bound).await
    }

    /// The process id of a running service.
    pub fn pid(&self, role: Role) -> Option<u32> {
        self.services.get(&role)?.child.as_ref()?.id()
    }

    pub fn log(&self, role: Role) -> PathBuf {
        self.dir.join(format!("{role}.log"))
    }

    /// `upstream-demo load --json`, started; [`finish_load`] reads its report.
    pub fn spawn_load(&self, load: &LoadOptions) -> Result<Child> {
        Command::new(self.bin_dir.join("upstream-demo"))
            .args(["load", "--json"])
            .args(["--count", &load.orders.to_string(), "--rate", &load.rate.to_string()])
            .args(["--concurrency", &load.concurrency.to_string()])
            .args(["--skip-publish-rate", &load.skip_publish_rate.to_string()])
            .args(["--abort-after-check-rate", &load.abort_after_check_rate.to_string()])
            .args(["--seed", &load.seed.to_string()])
            .args(["--addr", &format!("http://127.0.0.1:{}", self.orders_port)])
            .args(["--admin-addr", &format!("http://127.0.0.1:{}", self.callback_ports[0])])
            .args(["--points-database-url", &self.points_db])
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

    /// What the stores say now.
    pub async fn verdict(&self) -> Result<Verdict> {
        let orders = open(&self.orders_db).await?;
        let points = open(&self.points_db).await?;
        let callback = open(&self.callback_db).await?;
        let committed: Vec<(String,)> =
            sqlx::query_as("SELECT message_id FROM orders").fetch_all(&orders).await?;
        let statuses: HashMap<String, (String, i64)> = sqlx::query_as::<_, (String, String, i64)>(
            "SELECT message_id, status, resend_count FROM messages",
        )
        .fetch_all(&callback)
        .await?
        .into_iter()
        .map(|(id, status, resends)| (id, (status, resends)))
        .collect();
        let awarded: HashSet<String> = sqlx::query_as::<_, (String,)>("SELECT message_id FROM points")
            .fetch_all(&points)
            .await?
            .into_iter()
            .map(|(id,)| id)
            .collect();
        let (duplicates,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(seen - 1), 0) AS BIGINT) FROM recheck_inbox WHERE consumer = $1",
        )
        .bind(CONSUMER)
        .fetch_one(&points)
        .await?;
        let (hook_calls, repeated): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT), CAST(COALESCE(SUM(n - 1), 0) AS BIGINT)
             FROM (SELECT COUNT(*) AS n FROM hook_calls GROUP BY message_id, attempt) AS calls",
        )
        .fetch_one(&orders)
        .await?;
        for pool in [orders, points, callback] {
            pool.close().await;
        }

        let mut v = Verdict {
            committed: committed.len() as u64,
            points: awarded.len() as u64,
            duplicates_absorbed: duplicates as u64,
            hook_calls: hook_calls as u64,
            repeated_hook_calls: repeated as u64,
            ..Verdict::default()
        };
        for (id,) in &committed {
            let (status, resends) = statuses.get(id).map_or(("unknown", 0), |(s, n)| (s.as_str(), *n));
            let delivered = awarded.contains(id);
            match status {
                "confirmed" => v.confirmed += 1,
                "rejected" => v.rejected += 1,
                "failed" => v.failed += 1,
                "void" => v.void_committed += 1,
                _ => v.pending += 1,
            }
            v.resends += resends as u64;
            v.resent_messages += u64::from(resends > 0);
            let accounted = delivered || matches!(status, "rejected" | "failed");
            if !accounted || status == "void" {
                v.lost += 1;
                if v.lost_sample.len() < 5 {
                    v.lost_sample.push(format!("{id} ({status})"));
                }
            }
        }
        Ok(v)
    }

    /// Polls the stores until every committed message is terminal, or `within` passed; returns the
    /// last verdict either way (the caller asserts on it).
    pub async fn wait_settled(&self, within: Duration) -> Result<Verdict> {
        let deadline = Instant::now() + within;
        loop {
            let verdict = self.verdict().await?;
            if verdict.settled() || Instant::now() >= deadline {
                return Ok(verdict);
            }
            sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stops every running service with SIGTERM (each must exit cleanly) and returns what each
    /// used over the run.
    pub async fn stop(mut self) -> Result<HashMap<Role, Usage>> {
        let mut first_error = None;
        // The producer and consumer first, so the callback service sees no half-sent confirm.
        let mut roles = self.roles();
        roles.reverse();
        for role in roles {
            let service = self.services.get_mut(&role).expect("role listed");
            if let Err(e) = service.terminate(Duration::from_secs(20)).await {
                first_error.get_or_insert(e.context(format!("stopping {role}")));
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(self.services.iter().map(|(role, s)| (*role, s.usage)).collect()),
        }
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

async fn open(url: &str) -> Result<AnyPool> {
    let (pool, _) = recheck::db::connect(url).await.with_context(|| format!("opening {url}"))?;
    Ok(pool)
}

async fn wait_for_port(port: u16, deadline: Instant, log: &Path) -> Result<()> {
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}; log:\n{}", crate::watchdog::tail(log, 20));
        }
        sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits until `queue` has a consumer (asked over AMQP, so it works on any broker; with several
/// URLs, the first). Also how the benchmark knows its consumer is up.
pub async fn wait_for_consumer(amqp_url: &str, queue: &str, within: Duration) -> Result<()> {
    let url = amqp_url.split(',').next().unwrap_or(amqp_url).trim();
    let deadline = Instant::now() + within;
    let connection = recheck::publisher::connect(url, "deploy-probe").await?;
    let result = async {
        loop {
            let channel = connection.create_channel().await?;
            let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
            // Passive declare of a missing queue closes the channel: a fresh one per round.
            if let Ok(q) = channel.queue_declare(queue.into(), options, Default::default()).await
                && q.consumer_count() > 0
            {
                return Ok(());
            }
            let _ = channel.close(200, "probe".into()).await;
            anyhow::ensure!(Instant::now() < deadline, "nothing consumes {queue} after {within:?}");
            sleep(Duration::from_millis(100)).await;
        }
    }
    .await;
    let _ = connection.close(200, "probe done".into()).await;
    result
}

/// CPU seconds (user + system) and peak RSS of a live process (the bench's `/proc` reader).
fn proc_usage(pid: u32) -> Option<Usage> {
    use crate::bench::procfs;
    Some(Usage {
        cpu_seconds: procfs::cpu_seconds(procfs::Target::Fresh(pid))?,
        peak_rss_bytes: procfs::peak_rss_bytes(pid)?,
    })
}
