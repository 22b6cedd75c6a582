//! The benchmark behind `scripts/bench` (`bin/bench.rs`) and the `bench_smoke` suite: one broker
//! and one PostgreSQL cluster, and in one run the same order workload four ways, then the
//! callback service alone.
//!
//! - [`raw`] — publish → quorum queue → consume: the broker's limit.
//! - [`naive`] — the delayed check without batching: four broker enqueues per message.
//! - [`recheck_flow`] — the three real binaries, callback store on SQLite and on PostgreSQL.
//! - [`outbox`] — the transactional-outbox baseline; its producer is [`outbox_service`]
//!   (`bench outbox-service`, a process of its own).
//! - [`callback`] — the callback service alone: ingest and check rates from pre-filled queues,
//!   memory with a backlog of pending checks; [`size`] — the same rates with millions of rows
//!   stored, and ingest while the retention purge runs.
//! - [`load`] — the `CreateOrder` load client and latency histograms; [`procfs`] — CPU and RSS per
//!   process; [`process`] — processes the bench starts itself; [`broker`] — queue depths, fills.
//! - [`options`] — the parts and the sizes of a run.
//! - [`report`] — the results, as JSON and as the markdown tables of the README.

pub mod broker;
pub mod callback;
pub mod drain;
pub mod load;
pub mod naive;
pub mod options;
pub mod outbox;
pub mod outbox_service;
pub mod process;
pub mod procfs;
pub mod raw;
pub mod recheck_flow;
pub mod report;
pub mod size;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use sqlx::AnyPool;
use tokio::time::Instant;

use crate::{Kit, Postgres, Rabbit, urls};
pub use options::{BenchOptions, Part};
use procfs::Target;
use recheck_flow::{CallbackStore, Source};
use report::{Machine, Ratios, Report};

/// Everything a scenario needs.
pub struct Env<'a> {
    pub rabbit: &'a Rabbit,
    pub postgres: &'a Postgres,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// The `bench` binary (the outbox service runs as `bench outbox-service`).
    pub bench_exe: PathBuf,
    pub options: BenchOptions,
    broker_pid: Option<u32>,
    postgres_pid: Option<u32>,
    /// Vhosts made for the part running now, deleted when it ends.
    vhosts: std::sync::Mutex<Vec<String>>,
}

impl Env<'_> {
    /// A new vhost for the part running now.
    async fn fresh_vhost(&self) -> Result<crate::Vhost> {
        let vhost = self.rabbit.fresh_vhost().await?;
        self.vhosts.lock().expect("vhosts lock").push(vhost.name.clone());
        Ok(vhost)
    }

    /// Deletes the vhosts of the part that ended, so the next part starts on an empty node. Not
    /// for `--quick`: its queues are small, and each `rabbitmqctl` costs a second of CPU.
    async fn release_vhosts(&self) {
        let names = std::mem::take(&mut *self.vhosts.lock().expect("vhosts lock"));
        if self.options.quick {
            return;
        }
        for name in names {
            if let Err(e) = self.rabbit.ctl(&["delete_vhost", &name]).await {
                eprintln!("bench: deleting vhost {name}: {e:#}");
            }
        }
    }

    /// The AMQP URL a scenario's processes use: `url` itself, or for a remote-broker row the same
    /// broker through a proxy adding `--broker-latency` each way (keep the proxy while it runs).
    fn broker_url(&self, url: &str, remote: bool) -> Result<(String, Option<crate::FaultProxy>)> {
        if !remote {
            return Ok((url.to_owned(), None));
        }
        let proxy = crate::FaultProxy::start_for(url)?;
        proxy.set_latency(self.options.broker_latency);
        Ok((proxy.url_for(url), Some(proxy)))
    }

    /// A remote-broker row's name: `name` with the added latency.
    fn remote_name(&self, name: &str) -> String {
        format!("{name}, broker +{:?}", self.options.broker_latency)
    }

    /// The bench process itself (named `me`) and the servers.
    fn targets(&self, me: &str, postgres: bool) -> Vec<(String, Target)> {
        let mut targets = vec![(me.to_owned(), Target::Shared(std::process::id()))];
        targets.extend(self.server_targets(postgres));
        targets
    }

    /// RabbitMQ, and PostgreSQL when the scenario uses it.
    fn server_targets(&self, postgres: bool) -> Vec<(String, Target)> {
        let mut targets = Vec::new();
        if let Some(pid) = self.broker_pid {
            targets.push(("rabbitmq (whole node)".to_owned(), Target::Shared(pid)));
        }
        if let (true, Some(pid)) = (postgres, self.postgres_pid) {
            targets.push(("postgres (all backends)".to_owned(), Target::Forking(pid)));
        }
        targets
    }
}

/// Runs every selected part on `kit`'s servers; a part that fails is reported in `errors` and
/// the others still run.
pub async fn run(
    kit: &Kit,
    bin_dir: &Path,
    bench_exe: &Path,
    options: BenchOptions,
) -> Result<(Report, Vec<String>)> {
    let port = |url: &str, default| {
        urls::host_port(url, default).rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok())
    };
    let env = Env {
        rabbit: &kit.rabbit,
        postgres: &kit.postgres,
        bin_dir: bin_dir.to_owned(),
        bench_exe: bench_exe.to_owned(),
        broker_pid: port(&kit.rabbit.url(""), 5672).and_then(procfs::listener_pid),
        postgres_pid: port(kit.postgres.admin_url(), 5432).and_then(procfs::listener_pid),
        vhosts: Default::default(),
        options,
    };
    std::fs::create_dir_all(&env.options.out)?;
    let machine_start = load_average();
    let mut scenarios = Vec::new();
    let mut errors = Vec::new();
    let mut note = |what: &str, e: anyhow::Error| {
        eprintln!("bench: {what} failed: {e:#}");
        errors.push(format!("{what}: {e:#}"));
    };
    type Step<'e> = (
        Part,
        &'static str,
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<report::Scenario>> + 'e>>,
    );
    let steps: Vec<Step> = vec![
        (Part::Raw, "raw", Box::pin(raw::run(&env))),
        (Part::Naive, "naive", Box::pin(naive::run(&env))),
        (
            Part::RecheckSqlite,
            "recheck (SQLite)",
            Box::pin(recheck_flow::run(&env, CallbackStore::Sqlite, Source::Orders, false)),
        ),
        (
            Part::RecheckPostgres,
            "recheck (Postgres)",
            Box::pin(recheck_flow::run(&env, CallbackStore::Postgres, Source::Orders, false)),
        ),
        (
            Part::RecheckSdk,
            "recheck (SDK, SQLite)",
            Box::pin(recheck_flow::run(&env, CallbackStore::Sqlite, Source::Sdk, false)),
        ),
        (Part::Outbox, "outbox", Box::pin(outbox::run(&env, false))),
        (
            Part::RecheckRemote,
            "recheck (SQLite), remote broker",
            Box::pin(recheck_flow::run(&env, CallbackStore::Sqlite, Source::Orders, true)),
        ),
        (Part::OutboxRemote, "outbox, remote broker", Box::pin(outbox::run(&env, true))),
    ];
    for (part, name, step) in steps {
        if !env.options.runs(part) {
            continue;
        }
        eprintln!("bench: {name}");
        let started = Instant::now();
        let result = step.await;
        env.release_vhosts().await;
        match result {
            Ok(scenario) => {
                eprintln!(
                    "bench: {name}: {:.0} msgs/s, create p99 {:.1} ms, lost {} ({:.0?} in all)",
                    scenario.per_s,
                    scenario.latency_us.p99 as f64 / 1000.0,
                    scenario.lost,
                    started.elapsed()
                );
                scenarios.push(scenario);
            }
            Err(e) => note(name, e),
        }
    }
    let stores = [CallbackStore::Sqlite, CallbackStore::Postgres];
    let mut callback_rates = Vec::new();
    if env.options.runs(Part::Callback) {
        for store in stores {
            eprintln!("bench: callback service alone ({})", store.label());
            let result = callback::rates(&env, store).await;
            env.release_vhosts().await;
            match result {
                Ok(rates) => callback_rates.push(rates),
                Err(e) => note(&format!("callback rates ({})", store.label()), e),
            }
        }
    }
    let mut backlog = Vec::new();
    if env.options.runs(Part::Backlog) {
        for store in stores {
            for &pending in &env.options.backlog {
                eprintln!("bench: callback backlog of {pending} ({})", store.label());
                let result = callback::backlog(&env, store, pending).await;
                env.release_vhosts().await;
                match result {
                    Ok(b) => backlog.push(b),
                    Err(e) => note(&format!("callback backlog {pending} ({})", store.label()), e),
                }
            }
        }
    }
    let mut drain = Vec::new();
    if env.options.runs(Part::Drain) {
        // A smoke run drains on one store: each run waits out its outage (≈ 15 s a run in debug).
        let drain_stores = if env.options.quick { &stores[..1] } else { &stores[..] };
        for &store in drain_stores {
            match drain::run(&env, store).await {
                Ok(rows) => drain.extend(rows),
                Err(e) => note(&format!("drain after a hook outage ({})", store.label()), e),
            }
        }
    }
    let mut size = size::Measured::default();
    if env.options.runs(Part::Size) {
        size = size::run(&env).await;
        for (what, e) in std::mem::take(&mut size.failed) {
            note(&what, e);
        }
    }
    let rabbitmq = kit.rabbit.ctl(&["version"]).await.map(|v| v.trim().to_owned()).unwrap_or_default();
    let report = Report {
        machine: Machine {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            load_average_start: machine_start,
            load_average_end: load_average(),
            rabbitmq,
            quick: env.options.quick,
            release: !cfg!(debug_assertions),
        },
        messages: env.options.messages,
        ratios: Ratios::compute(&scenarios, &callback_rates),
        scenarios,
        callback_rates,
        backlog,
        drain,
        size: size.rates,
        purge: size.purges,
    };
    Ok((report, errors))
}

/// Writes `report.json` and `report.md` into `dir`.
pub fn write(report: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(report)?)?;
    std::fs::write(dir.join("report.md"), format!("{report}\n{}", report::notes(report)))?;
    Ok(())
}

/// `/proc/loadavg`'s 1, 5 and 15 minute averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A single number from `sql` (a `COUNT` or a `MAX`; NULL reads as 0).
async fn count_rows(pool: &AnyPool, sql: &'static str) -> Result<i64> {
    let n: Option<i64> = sqlx::query_scalar(sql).fetch_one(pool).await.with_context(|| sql.to_owned())?;
    Ok(n.unwrap_or(0))
}

/// Polls `sql` every `every` until it says at least `target` (returns the wall-clock ms it first
/// did), or fails after `within`.
async fn wait_rows(
    pool: &AnyPool,
    sql: &'static str,
    target: u64,
    every: Duration,
    within: Duration,
) -> Result<i64> {
    let deadline = Instant::now() + within;
    loop {
        let n = count_rows(pool, sql).await?;
        if n >= 0 && n as u64 >= target {
            return Ok(recheck::message::now_ms());
        }
        anyhow::ensure!(Instant::now() < deadline, "{n} of {target} after {within:?} ({sql})");
        tokio::time::sleep(every).await;
    }
}

/// Mean batch sizes over a deployment's run, from its services' `/metrics`: how much the group
/// commits and micro-batches gathered (what the broker and the stores pay per business message).
async fn batch_sizes(deployment: &crate::deploy::Deployment) -> String {
    use crate::deploy::Role;
    let mut parts = Vec::new();
    for (role, histogram, what) in [
        (Role::Upstream, "recheck_check_batch_size", "ids per CHECK published by upstream-demo"),
        (Role::Consumer(0), "recheck_consumer_batch_size", "deliveries per consumer transaction"),
        (Role::Consumer(0), "recheck_confirm_batch_size", "ids per CONFIRM"),
        (Role::Callback(0), "recheck_reconcile_batch_size", "checks per CHECK delivery"),
        (Role::Callback(0), "recheck_ingest_batch_size", "confirms per callback transaction"),
    ] {
        match deployment.scrape(role).await.map(|m| m.mean(histogram)) {
            Ok(Some(mean)) => parts.push(format!("{what} {mean:.1}")),
            Ok(None) => {}
            Err(e) => parts.push(format!("{what}: {e:#}")),
        }
    }
    format!("mean batch sizes over the run: {}", parts.join(", "))
}

/// How often a scenario looks at a store while waiting for it to settle.
const POLL: Duration = Duration::from_millis(100);
