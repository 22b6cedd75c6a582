//! The fault matrix: one [`Fault`] injected into a [`Deployment`] under load, at a chosen moment
//! (when a share of the orders is committed), and the [`Outcome`] computed from the stores. The
//! `faults` suite runs each row small; `scripts/chaos` (`bin/chaos.rs`) runs them big and adds a
//! mixed run with faults at random moments.
//!
//! Every row runs two consumers, `points` and `shipping`, and every order expects both: a fault
//! on one consumer's side (a lost message or confirm, a kill) hits that consumer only, so a
//! message one consumer confirmed must still be resent until the other did.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

mod inject;
pub mod long;
mod mixed;

use inject::{Proxies, inject};
pub use long::LongMeasures;
pub use mixed::run_mixed;

use crate::{
    Rabbit, RabbitCluster,
    deploy::{ConsumerFaults, ConsumerSpec, DeployOptions, Deployment, LoadOptions, Verdict},
    free_port,
    proxy::FaultProxy,
};

/// One row of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// No fault: the baseline.
    None,
    /// 10 % of business messages never published (committed, then a "crash"), and 5 % of the
    /// published ones lost for `shipping` only (`points` gets and confirms them).
    BusinessDropped,
    /// 10 % of `shipping`'s confirms never sent (the effect was applied; `points` confirms).
    ConfirmDropped,
    /// The `points` consumer killed with -9 mid-batch, restarted after a pause.
    ConsumerKilled,
    /// The callback service killed with -9 mid-batch, restarted after a pause.
    CallbackKilled,
    /// upstream-demo killed with -9 mid-load (orders committed, not yet published), restarted.
    ProducerKilled,
    /// The producer's hook unreachable for several check rounds (connections refused).
    HookDown,
    /// The producer's hook accepts connections and never answers (a black hole) for several
    /// check rounds: every call times out until the circuit opens.
    HookHangs,
    /// The callback service's store (PostgreSQL, behind a proxy) down under load: connections
    /// cut and refused. Its check and confirm deliveries wait in place; none is parked.
    StoreDown,
    /// CHECKs parked by the delivery limit before the callback recorded their rows: its store
    /// fails every statement on `messages` (held in hand), and it is killed each time it holds
    /// them, until the broker parks them. The sweeper brings them back from parking.
    ChecksParked,
    /// `rabbitmqctl stop_app`, a pause, `start_app`.
    BrokerRestart,
    /// The broker's memory alarm raised (publishers blocked), then cleared.
    MemoryAlarm,
    /// Every service ↔ broker connection cut at once.
    ConnectionsCut,
    /// Every service ↔ broker connection stalled (a black hole), then flowing again.
    ConnectionsStalled,
    /// A 3-node cluster, every service given all three addresses; the node they are connected to
    /// is killed with -9 mid-load, and started again after the outage.
    NodeKilled,
    /// Two callback service instances on one PostgreSQL store, both reconciling (with dropped
    /// publishes, and `shipping`'s confirms dropped, so there is something to resend).
    TwoCallbacks,
    /// The `shipping` consumer stopped for longer than the check delay, then started (resend
    /// storm test; `points` goes on confirming).
    ConsumerDown,
    /// Background faults on (dropped publishes, `shipping`'s messages and confirms lost, consumer
    /// failures and rejections, aborts), and kills, broker restarts, alarms and cuts at random
    /// moments.
    Mixed,
}

impl Fault {
    /// Whether the row runs the callback on a PostgreSQL store ([`Broker::postgres_url`]).
    pub fn needs_postgres(self) -> bool {
        matches!(self, Fault::TwoCallbacks | Fault::StoreDown | Fault::ChecksParked)
    }
}

/// How big, how fast and when.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub fault: Fault,
    pub orders: u64,
    /// Orders per second offered by the load (the run must last long enough to fault mid-load).
    pub rate: u64,
    /// The fault fires once this share of the orders is committed.
    pub at: f64,
    /// How long the fault lasts (outage, alarm, hook down, consumer down).
    pub outage: Duration,
    /// Defer checks of a lagging consumer (the storm comparison turns it off).
    pub deferral: bool,
    pub dir: PathBuf,
    /// The longest wait for every message to settle after the load.
    pub settle_within: Duration,
    /// Delay tiers of every service (`None`: the deployment's short test tiers).
    pub tiers: Option<String>,
    /// Extra environment of the callback service(s), e.g. `RECHECK_MAX_DEFERRAL`.
    pub callback_env: Vec<(String, String)>,
    /// A long row ([`long`]): also measures hook calls during the outage, `failed` at its end and
    /// the drain after it.
    pub long: bool,
}

impl Scenario {
    /// The row's defaults: the fault fires at 30 % of the orders and lasts 4 s, except where the
    /// fault needs longer to mean something.
    pub fn new(fault: Fault, orders: u64, dir: impl Into<PathBuf>) -> Self {
        let (at, outage) = match fault {
            // Tiers are 1 s, 3 s, 5 s: 12 s down spans several check rounds of every message.
            Fault::HookDown | Fault::HookHangs => (0.3, 12),
            // Longer than sqlx's 30 s acquire timeout, so waits end in errors, not only in delays;
            // `scripts/chaos` runs it for 2 minutes.
            Fault::StoreDown => (0.3, 40),
            // Longer than the 3 s check delay, while the load goes on.
            Fault::ConsumerDown => (0.2, 8),
            // Failover waits out the publisher's recovery timeout (15 s) first.
            Fault::NodeKilled => (0.3, 20),
            // Short and early: CreateOrder fails while it is down, and the load must go on after.
            Fault::ProducerKilled => (0.2, 1),
            _ => (0.3, 4),
        };
        Self {
            fault,
            orders,
            rate: 400,
            at,
            outage: Duration::from_secs(outage),
            deferral: true,
            dir: dir.into(),
            settle_within: Duration::from_secs(300),
            tiers: None,
            callback_env: Vec::new(),
            long: false,
        }
    }

    /// Every row of the matrix, in the order `scripts/chaos` runs them.
    pub fn all() -> &'static [Fault] {
        <Fault as clap::ValueEnum>::value_variants()
    }
}

/// What one row found.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub fault: Fault,
    pub orders: u64,
    pub deferral: bool,
    pub verdict: Verdict,
    /// The load generator's own report.
    pub load: Value,
    /// Orders committed when the fault fired (shows it fired mid-load).
    pub committed_at_fault: u64,
    /// From the end of the fault until every committed message was terminal.
    pub reconcile_s: f64,
    /// Messages in the parking queue at the end (the rows inject no malformed message).
    pub parked: u32,
    pub elapsed_s: f64,
    /// Peak RSS of each process over all its incarnations, in bytes.
    pub peak_rss_bytes: BTreeMap<String, u64>,
    /// A long row's measures around its outage.
    pub long: Option<LongMeasures>,
}

impl Outcome {
    /// Resent messages as a share of committed ones.
    pub fn resent_share(&self) -> f64 {
        self.verdict.resent_messages as f64 / self.verdict.committed.max(1) as f64
    }

    /// The consumer named `name`'s part of the verdict.
    pub fn consumer(&self, name: &str) -> &crate::deploy::ConsumerVerdict {
        let found = self.verdict.consumers.iter().find(|c| c.consumer == name);
        found.unwrap_or_else(|| panic!("no consumer {name} in the verdict"))
    }

    /// The assertions every row must pass; `Err` says which failed.
    pub fn check(&self) -> Result<()> {
        let v = &self.verdict;
        anyhow::ensure!(v.lost == 0, "{:?}: {} lost, e.g. {:?}", self.fault, v.lost, v.lost_sample);
        anyhow::ensure!(v.pending == 0, "{:?}: {} still pending", self.fault, v.pending);
        anyhow::ensure!(
            v.consumers.len() == CONSUMERS.len(),
            "{:?}: consumers {:?}",
            self.fault,
            v.consumers
        );
        // Each consumer's effect exactly once for every confirmed order (ledger and balances).
        v.exactly_once().with_context(|| format!("{:?}", self.fault))?;
        anyhow::ensure!(
            v.repeated_resends == 0,
            "{:?}: {} resends repeated a (message, attempt)",
            self.fault,
            v.repeated_resends
        );
        anyhow::ensure!(
            self.load.get("lost").and_then(Value::as_u64) == Some(0),
            "{:?}: the load counted lost messages",
            self.fault
        );
        Ok(())
    }
}

/// The consumers of every row; every order expects both.
pub const CONSUMERS: [&str; 2] = [POINTS, SHIPPING];
pub const POINTS: &str = "points";
/// The consumer the one-sided faults hit.
pub const SHIPPING: &str = "shipping";

/// The two consumers, `faults` on `shipping` only.
fn consumers(shipping: ConsumerFaults) -> Vec<ConsumerSpec> {
    let points = ConsumerSpec::new(POINTS);
    vec![points, ConsumerSpec { faults: shipping, ..ConsumerSpec::new(SHIPPING) }]
}

/// Where the broker is and how to break it.
pub struct Broker<'a> {
    pub rabbit: &'a Rabbit,
    /// For [`Fault::NodeKilled`].
    pub cluster: Option<&'a RabbitCluster>,
    /// For [`Fault::TwoCallbacks`] and [`Fault::StoreDown`]: a fresh PostgreSQL database URL.
    pub postgres_url: Option<String>,
}

/// Runs one row: deployment, load, fault at the chosen moment, settle, verdict, stop.
pub async fn run(broker: &Broker<'_>, bin_dir: &std::path::Path, scenario: &Scenario) -> Result<Outcome> {
    if scenario.fault == Fault::Mixed {
        return run_mixed(broker, bin_dir, scenario, 1).await;
    }
    let started = Instant::now();
    let fault = scenario.fault;
    let (vhost_url, all_nodes) = match (fault, broker.cluster) {
        (Fault::NodeKilled, Some(cluster)) => {
            let vhost = cluster.fresh_vhost().await?;
            (vhost.url(0).to_owned(), Some(vhost.joined()))
        }
        (Fault::NodeKilled, None) => anyhow::bail!("a node can be killed only in a cluster"),
        _ => (broker.rabbit.fresh_vhost().await?.url, None),
    };
    let mut opts = DeployOptions::new(&scenario.dir, all_nodes.unwrap_or_else(|| vhost_url.clone()));
    opts.deferral = scenario.deferral;
    if let Some(tiers) = &scenario.tiers {
        opts.tiers = tiers.clone();
    }
    opts.callback_env.extend(scenario.callback_env.iter().cloned());
    let mut load = LoadOptions { rate: scenario.rate, ..LoadOptions::new(scenario.orders) };
    if scenario.long {
        load.wait = format!("{}s", scenario.settle_within.as_secs());
    }
    let mut shipping = ConsumerFaults::default();

    // Proxies exist only for the rows that break the network.
    let mut amqp_proxy = None;
    let mut hook_proxy = None;
    let mut store_proxy = None;
    match fault {
        Fault::BusinessDropped => {
            load.skip_publish_rate = 0.1;
            shipping.drop_message_rate = 0.05;
        }
        Fault::ConfirmDropped => shipping.drop_confirm_rate = 0.1,
        Fault::ConnectionsCut | Fault::ConnectionsStalled => {
            let proxy = FaultProxy::start_for(&vhost_url)?;
            opts.amqp_url = proxy.url_for(&vhost_url);
            amqp_proxy = Some(proxy);
        }
        Fault::HookDown | Fault::HookHangs => {
            let port = free_port()?;
            let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port)))?;
            opts.orders_port = Some(port);
            opts.hook_addr = Some(format!("http://{}", proxy.addr()));
            // Let the load create orders whose checks need the hook while it is down.
            load.skip_publish_rate = 0.1;
            hook_proxy = Some(proxy);
        }
        Fault::StoreDown => {
            let url = broker.postgres_url.clone().context("the store row needs a PostgreSQL database")?;
            let proxy = FaultProxy::start_for(&url)?;
            opts.callback_database_url = Some(proxy.url_for(&url));
            // Resends to make while the store is away.
            load.skip_publish_rate = 0.05;
            store_proxy = Some(proxy);
        }
        Fault::ChecksParked => {
            let url = broker.postgres_url.clone().context("the parked row needs a PostgreSQL database")?;
            opts.callback_database_url = Some(url);
            // A sweep round every second, so a pass over parking follows the last restart soon.
            opts.callback_env.push(("RECHECK_SWEEP_INTERVAL".into(), "1s".into()));
        }
        Fault::TwoCallbacks => {
            opts.callbacks = 2;
            opts.callback_database_url =
                Some(broker.postgres_url.clone().context("two callbacks need a PostgreSQL database")?);
            load.skip_publish_rate = 0.05;
            shipping.drop_confirm_rate = 0.05;
        }
        _ => {}
    }
    opts.consumers = consumers(shipping);
    let mut deployment = Deployment::start(bin_dir, &opts).await?;
    let running = deployment.spawn_load(&load)?;

    let target = ((scenario.orders as f64) * scenario.at).ceil() as u64;
    let committed_at_fault = deployment.wait_committed(target, Duration::from_secs(120)).await?;
    tracing::info!(?fault, committed_at_fault, "injecting the fault");
    let proxies =
        Proxies { amqp: amqp_proxy.as_ref(), hook: hook_proxy.as_ref(), store: store_proxy.as_ref() };
    let calls_before = if scenario.long { long::hook_calls(&deployment).await? } else { 0.0 };
    let outage_started = Instant::now();
    inject(&mut deployment, broker, &proxies, fault, scenario.outage).await?;
    let recovered = Instant::now();
    let recovered_ms = recheck::message::now_ms();

    let (load, long) = if scenario.long {
        let mut measures = LongMeasures {
            outage_s: (recovered - outage_started).as_secs_f64(),
            hook_calls_in_outage: (long::hook_calls(&deployment).await? - calls_before) as u64,
            failed_at_outage_end: long::failed_now(&deployment).await?,
            drain_s: None,
        };
        let drain = long::drain(&deployment, recovered, recovered_ms, scenario.settle_within);
        let (load, drain) = tokio::join!(crate::deploy::finish_load(running), drain);
        measures.drain_s = drain?;
        (load?, Some(measures))
    } else {
        (crate::deploy::finish_load(running).await?, None)
    };
    let verdict = deployment.wait_settled(scenario.settle_within).await?;
    let reconcile_s = recovered.elapsed().as_secs_f64();
    let parked = deployment.parked().await?;
    let usage = deployment.stop().await?;
    drop((amqp_proxy, hook_proxy, store_proxy));
    Ok(Outcome {
        fault,
        orders: scenario.orders,
        deferral: scenario.deferral,
        verdict,
        load,
        committed_at_fault,
        reconcile_s,
        parked,
        elapsed_s: started.elapsed().as_secs_f64(),
        peak_rss_bytes: long::peak_rss(&usage),
        long,
    })
}
