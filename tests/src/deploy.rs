//! A deployment of the real binaries as processes — callback service(s), upstream-demo, and one
//! downstream-demo per consumer (each its own name, queue, SQLite store, faults and ops port) — on
//! one broker, with SQLite stores in a directory (the callback store may be PostgreSQL). Each
//! service can be killed with SIGKILL and started again with the same settings; the load runs as
//! `upstream-demo load`, its orders expecting every consumer; the [`Verdict`] is computed from the
//! stores ([`verdict`]). Shared by the demo, the fault matrix and the benchmark.

mod load;
mod service;
pub mod verdict;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::AnyPool;
use tokio::time::{Instant, sleep};

use crate::free_port;
pub use load::{LoadOptions, finish_load};
pub use service::Usage;
use service::{Service, wait_for_port};
use verdict::Stores;
pub use verdict::{ConsumerVerdict, Verdict};

/// The default consumer's queue (downstream-demo's default) and name.
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
    /// upstream-demo's reserved CHECKs (`RECHECK_RESERVE`) and their max age; `max age + grace`
    /// must not exceed `check_delay`.
    pub reserve: bool,
    pub reserve_max_age: String,
    /// The callback store; `None` = SQLite in `dir`.
    pub callback_database_url: Option<String>,
    /// Callback service instances sharing that store.
    pub callbacks: usize,
    /// Defer checks while a consumer's queue has a backlog.
    pub deferral: bool,
    /// The consumers, each a downstream-demo process; every order expects all of them.
    pub consumers: Vec<ConsumerSpec>,
    /// Extra environment for the callback service(s) and for upstream-demo (they win over the
    /// deployment's own settings).
    pub callback_env: Vec<(String, String)>,
    pub upstream_env: Vec<(String, String)>,
    /// What the callback service calls as the producer hook (e.g. a fault proxy in front of
    /// upstream-demo); `None` = upstream-demo directly.
    pub hook_addr: Option<String>,
    /// upstream-demo's gRPC port; `None` = a free one (set it to put a proxy in front first).
    pub orders_port: Option<u16>,
}

/// One consumer of a deployment.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Its name in CONFIRMs and in the orders' `expect`.
    pub name: String,
    pub queue: String,
    pub faults: ConsumerFaults,
    /// Extra environment (wins over the deployment's own settings).
    pub env: Vec<(String, String)>,
}

impl ConsumerSpec {
    /// A consumer named `name`, reading `<name>.order-created`, without faults.
    pub fn new(name: &str) -> Self {
        let queue = format!("{name}.order-created");
        Self { name: name.into(), queue, faults: ConsumerFaults::default(), env: Vec::new() }
    }
}

/// downstream-demo's injected faults.
#[derive(Debug, Clone, Default)]
pub struct ConsumerFaults {
    pub drop_confirm_rate: f64,
    /// Business messages lost for this consumer only (originals; resends get through).
    pub drop_message_rate: f64,
    pub fail_rate: f64,
    pub reject_rate: f64,
    pub slow_ms: u64,
}

impl DeployOptions {
    /// One consumer, `points`.
    pub fn new(dir: impl Into<PathBuf>, amqp_url: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            amqp_url: amqp_url.into(),
            tiers: "1s,3s,5s".into(),
            // Reservations on, as upstream-demo ships: max age 3 s + grace 2 s = the check delay.
            check_delay: "5s".into(),
            grace: "2s".into(),
            reserve: true,
            reserve_max_age: "3s".into(),
            callback_database_url: None,
            callbacks: 1,
            deferral: true,
            consumers: vec![ConsumerSpec::new(CONSUMER)],
            callback_env: Vec::new(),
            upstream_env: Vec::new(),
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
    /// The n-th consumer of [`DeployOptions::consumers`] (0-based).
    Consumer(usize),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Callback(0) => f.write_str("callback-service"),
            Role::Callback(n) => write!(f, "callback-service-{n}"),
            Role::Upstream => f.write_str("upstream-demo"),
            Role::Consumer(0) => f.write_str("downstream-demo"),
            Role::Consumer(n) => write!(f, "downstream-demo-{n}"),
        }
    }
}

/// A running consumer: its name, queue and store.
#[derive(Debug, Clone)]
pub struct DeployedConsumer {
    pub name: String,
    pub queue: String,
    /// Its store's URL (SQLite in the deployment's directory).
    pub db: String,
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
    pub callback_db: String,
    /// The consumers, in [`DeployOptions::consumers`]' order (`Role::Consumer(i)` is the i-th).
    pub consumers: Vec<DeployedConsumer>,
    /// Each service's ops HTTP port (`/metrics`, `/healthz`, `/readyz`).
    pub ops_ports: HashMap<Role, u16>,
    services: HashMap<Role, Service>,
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

        // Quiet by default; `RECHECK_SERVICE_LOG` (a `RECHECK_LOG` filter) to diagnose a run.
        let log = std::env::var("RECHECK_SERVICE_LOG").unwrap_or_else(|_| "warn".into());
        let common = |db: &str| {
            vec![
                ("RECHECK_AMQP_URL".to_owned(), opts.amqp_url.clone()),
                ("RECHECK_DELAY_TIERS".to_owned(), opts.tiers.clone()),
                ("DATABASE_URL".to_owned(), db.to_owned()),
                ("RECHECK_LOG".to_owned(), log.clone()),
            ]
        };
        let mut services = HashMap::new();
        let mut add = |role: Role, binary: &str, args: &[&str], env: Vec<(String, String)>| {
            let service = Service::new(bin_dir.join(binary), args, env, dir.join(format!("{role}.log")));
            services.insert(role, service);
        };
        anyhow::ensure!(!opts.consumers.is_empty(), "a deployment needs a consumer");
        let consumers: Vec<DeployedConsumer> = opts
            .consumers
            .iter()
            .map(|c| DeployedConsumer { name: c.name.clone(), queue: c.queue.clone(), db: sqlite(&c.name) })
            .collect();
        let consumer_queues: Vec<String> =
            consumers.iter().map(|c| format!("{}={}", c.name, c.queue)).collect();
        let expect: Vec<&str> = consumers.iter().map(|c| c.name.as_str()).collect();
        for (i, port) in callback_ports.iter().enumerate() {
            let mut env = common(&callback_db);
            env.push(("RECHECK_GRPC_ADDR".into(), format!("127.0.0.1:{port}")));
            env.push(("RECHECK_PRODUCERS".into(), format!("orders={hook}")));
            if opts.deferral {
                env.push(("RECHECK_CONSUMER_QUEUES".into(), consumer_queues.join(",")));
            }
            env.extend(opts.callback_env.iter().cloned());
            add(Role::Callback(i), "callback-service", &[], env);
        }
        let mut env = common(&sqlite("orders"));
        env.push(("RECHECK_GRPC_ADDR".into(), format!("127.0.0.1:{orders_port}")));
        env.push(("RECHECK_CHECK_DELAY".into(), opts.check_delay.clone()));
        env.push(("RECHECK_GRACE".into(), opts.grace.clone()));
        env.push(("RECHECK_RESERVE".into(), opts.reserve.to_string()));
        env.push(("RECHECK_RESERVE_MAX_AGE".into(), opts.reserve_max_age.clone()));
        env.push(("RECHECK_EXPECT".into(), expect.join(",")));
        env.extend(opts.upstream_env.iter().cloned());
        add(Role::Upstream, "upstream-demo", &["serve"], env);
        for (i, (spec, consumer)) in opts.consumers.iter().zip(&consumers).enumerate() {
            let faults = &spec.faults;
            let mut env = common(&consumer.db);
            env.push(("RECHECK_CONSUMER".into(), consumer.name.clone()));
            env.push(("RECHECK_QUEUE".into(), consumer.queue.clone()));
            env.push(("RECHECK_DROP_CONFIRM_RATE".into(), faults.drop_confirm_rate.to_string()));
            env.push(("RECHECK_DROP_MESSAGE_RATE".into(), faults.drop_message_rate.to_string()));
            env.push(("RECHECK_FAIL_RATE".into(), faults.fail_rate.to_string()));
            env.push(("RECHECK_REJECT_RATE".into(), faults.reject_rate.to_string()));
            env.push(("RECHECK_SLOW_MS".into(), faults.slow_ms.to_string()));
            env.extend(spec.env.iter().cloned());
            add(Role::Consumer(i), "downstream-demo", &["serve"], env);
        }
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
            callback_db,
            consumers,
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
            Role::Consumer(i) => {
                let queue = &self.consumers[i].queue;
                wait_for_consumer(&self.amqp_url, queue, Duration::from_secs(60))
                    .await
                    .with_context(|| format!("{role} log:\n{}", crate::watchdog::tail(&log, 20)))
            }
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

    /// The role of the consumer named `name`.
    pub fn consumer_role(&self, name: &str) -> Result<Role> {
        let i = self.consumers.iter().position(|c| c.name == name);
        i.map(Role::Consumer).with_context(|| format!("no consumer {name} in this deployment"))
    }

    /// What the stores say now.
    /// Messages in the parking queue now.
    pub async fn parked(&self) -> Result<u32> {
        queue_depth(&self.amqp_url, "recheck.parking").await
    }

    pub async fn verdict(&self) -> Result<Verdict> {
        let consumers: Vec<(&str, &str)> =
            self.consumers.iter().map(|c| (c.name.as_str(), c.db.as_str())).collect();
        Ok(Stores::read(&self.orders_db, &self.callback_db, &consumers).await?.verdict())
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

async fn open(url: &str) -> Result<AnyPool> {
    let (pool, _) = recheck::db::connect(url).await.with_context(|| format!("opening {url}"))?;
    Ok(pool)
}

/// Ready messages in `queue` (a passive declare over AMQP; with several URLs, the first): how a
/// row counts what was parked.
pub async fn queue_depth(amqp_url: &str, queue: &str) -> Result<u32> {
    let url = amqp_url.split(',').next().unwrap_or(amqp_url).trim();
    let connection = recheck::publisher::connect(url, "deploy-probe").await?;
    let channel = connection.create_channel().await?;
    let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let depth =
        channel.queue_declare(queue.into(), options, Default::default()).await.map(|q| q.message_count());
    let _ = connection.close(200, "probe done".into()).await;
    Ok(depth?)
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
