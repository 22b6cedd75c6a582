//! The callback service alone (its release binary, as a process), against pre-filled queues:
//! - **rates**: confirm ingest (CONFIRMs of unknown ids: each creates its row, which waits for
//!   its CHECK), then the checks of those messages (the usual order: each CHECK message finds its
//!   confirms and confirms its rows in one transaction), then the same checks again (confirmed
//!   rows: a read, no write);
//! - **backlog**: memory with N pending messages in the store and N due checks in the queue,
//!   whose producer hook is down (each check: claim, a failing RPC, the next check published
//!   into the 1 h tier) — what a producer outage looks like. Memory must not follow N.

use std::{future::Future, time::Duration};

use anyhow::{Context, Result};
use lapin::BasicProperties;
use recheck::{
    Publisher, Topology,
    message::{CONTENT_TYPE_JSON, Check, CheckBatch, ConfirmBatch, now_ms},
    topology::parse_tiers,
};
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    Env, broker,
    process::Process,
    procfs::{self, Meter, Target},
    recheck_flow::CallbackStore,
    report::{Backlog, CallbackRates},
    wait_rows,
};

/// Prefetch of the service's checks consumer (its default, `--check-prefetch`): deliveries it takes at once.
const CHECK_PREFETCH: u64 = 32;

/// A fresh vhost and store, the topology declared, and a publisher to fill queues with.
pub(super) struct Stage {
    vhost: String,
    amqp_url: String,
    pub(super) database_url: String,
    topology: Topology,
    pub(super) publisher: Publisher,
    pub(super) dir: std::path::PathBuf,
    tiers: String,
    /// More settings for the service (`size.rs`: retention and purge).
    pub(super) service_env: Vec<(&'static str, String)>,
}

impl Stage {
    pub(super) async fn new(env: &Env<'_>, store: CallbackStore, name: &str, tiers: &str) -> Result<Self> {
        let vhost = env.fresh_vhost().await?;
        let dir = env.options.out.join(format!("callback-{name}-{}", store.label().to_lowercase()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let dir = dir.canonicalize()?;
        let database_url = match store {
            CallbackStore::Sqlite => format!("sqlite://{}/callback.db?mode=rwc", dir.display()),
            CallbackStore::Postgres => env.postgres.fresh_database().await?.url,
        };
        let topology = Topology::new("recheck", parse_tiers(tiers).map_err(anyhow::Error::msg)?);
        let publisher = broker::publisher(&vhost.url, "bench-fill").await?;
        topology.declare(&publisher.create_channel().await?).await?;
        Ok(Self {
            vhost: vhost.name,
            amqp_url: vhost.url,
            database_url,
            topology,
            publisher,
            dir,
            tiers: tiers.into(),
            service_env: Vec::new(),
        })
    }

    /// Starts the callback service binary and waits until it has built (store migrated, gRPC bound).
    pub(super) async fn start_service(&self, env: &Env<'_>, log: &str) -> Result<Process> {
        let port = crate::free_port()?;
        // Nothing listens there: the backlog run's hook is down (the rates run never calls it).
        let hook = crate::free_port()?;
        let mut settings = vec![
            ("RECHECK_AMQP_URL", self.amqp_url.clone()),
            ("DATABASE_URL", self.database_url.clone()),
            ("RECHECK_GRPC_ADDR", format!("127.0.0.1:{port}")),
            ("RECHECK_PRODUCERS", format!("orders=http://127.0.0.1:{hook}")),
            ("RECHECK_DELAY_TIERS", self.tiers.clone()),
            ("RECHECK_LOG", "error".into()),
            // Any free port for the ops listener (/metrics): others may run beside it.
            ("RECHECK_OPS_ADDR", "127.0.0.1:0".into()),
        ];
        settings.extend(self.service_env.iter().cloned());
        let mut service =
            Process::spawn(&env.bin_dir.join("callback-service"), &[], &settings, self.dir.join(log))?;
        service.wait_for_port(port, Duration::from_secs(120)).await?;
        Ok(service)
    }

    pub(super) async fn fill_confirms(&self, ids: &[Uuid], per_message: usize) -> Result<()> {
        let bodies = ids
            .chunks(per_message)
            .map(|chunk| {
                let confirms = chunk.iter().copied().map(crate::processed).collect();
                serde_json::to_vec(&ConfirmBatch::new("points", confirms))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let exchange = self.topology.confirms_exchange();
        broker::fill(&self.publisher, &exchange, "", &bodies, json(), 256).await
    }

    async fn fill_checks(&self, ids: impl Iterator<Item = Uuid>, n: usize, per_message: usize) -> Result<()> {
        let mut bodies = Vec::with_capacity(n.div_ceil(per_message));
        let mut chunk = Vec::with_capacity(per_message);
        for id in ids {
            chunk.push(Check {
                message_id: id,
                routing_key: "order.created".into(),
                business_key: "bench".into(),
                attempt: 0,
                published_at: now_ms(),
                expect: Some(vec!["points".into()]),
                traceparent: None,
                reserved: false,
            });
            if chunk.len() == per_message {
                bodies.push(serde_json::to_vec(&CheckBatch::new("orders", std::mem::take(&mut chunk)))?);
            }
        }
        if !chunk.is_empty() {
            bodies.push(serde_json::to_vec(&CheckBatch::new("orders", chunk))?);
        }
        let exchange = self.topology.checks_exchange();
        broker::fill(&self.publisher, &exchange, "", &bodies, json(), 256).await
    }
}

fn json() -> BasicProperties {
    BasicProperties::default().with_content_type(CONTENT_TYPE_JSON.into())
}

/// Confirm ingest rate, then check rate, each from a pre-filled queue.
pub async fn rates(env: &Env<'_>, store: CallbackStore) -> Result<CallbackRates> {
    let o = &env.options;
    let n = o.callback_messages;
    let per_message = o.ids_per_message;
    let stage = Stage::new(env, store, "rates", "1s").await?;
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();

    // Confirms: the service drains the queue from the moment it has built.
    stage.fill_confirms(&ids, per_message).await?;
    let service = stage.start_service(env, "ingest.log").await?;
    let started_ms = now_ms();
    let meter = Meter::start(vec![("callback-service".into(), Target::Fresh(service.pid()?))]);
    let (pool, _) = recheck::db::connect(&stage.database_url).await?;
    // `received_at` is stamped when a transaction starts, and one may hold every confirm: the
    // end is when the count shows them committed (looked at every 20 ms).
    let confirms = "SELECT COUNT(*) FROM confirms";
    let last_ms = wait_rows(&pool, confirms, n, Duration::from_millis(20), o.deadline)
        .await
        .context("confirm ingest")?;
    let ingest = meter.finish(n).await.remove(0);
    service.terminate(Duration::from_secs(30)).await?;
    let pool = &pool;
    let confirms_per_s = n as f64 * 1000.0 / (last_ms - started_ms).max(1) as f64;

    // The checks of those messages: one read and one transaction per CHECK message (the CHECK
    // weighs the stored confirms and confirms the rows), then the ack. The end is an empty queue,
    // unacked deliveries included (`rabbitmqctl`, coarse).
    let stage = &stage;
    let first = check_pass(env, stage, &ids, "checks.log", |deadline| async move {
        queue_empty(env, stage, deadline).await
    })
    .await
    .context("checks")?;
    // Again, with every row confirmed and warm: a read and the ack.
    let again = check_pass(env, stage, &ids, "checks-again.log", |deadline| async move {
        queue_empty(env, stage, deadline).await
    })
    .await
    .context("checks again")?;
    pool.close().await;
    stage.publisher.close().await;

    Ok(CallbackRates {
        store: store.label().into(),
        confirms: n,
        confirms_per_s,
        checks: n,
        checks_per_s: first.per_s,
        checks_timing: first.timing,
        checks_again_per_s: again.per_s,
        checks_again_timing: again.timing,
        ingest_cpu_s_per_1k: ingest.cpu_s_per_1k,
        checks_cpu_s_per_1k: first.cpu_s_per_1k,
        checks_again_cpu_s_per_1k: again.cpu_s_per_1k,
        peak_rss_bytes: [ingest.peak_rss_bytes.unwrap_or(0), first.peak_rss_bytes, again.peak_rss_bytes]
            .into_iter()
            .max()
            .unwrap_or(0),
    })
}

/// One timed run of the callback service over a pre-filled checks queue.
pub(super) struct CheckPass {
    pub(super) per_s: f64,
    pub(super) timing: String,
    cpu_s_per_1k: f64,
    peak_rss_bytes: u64,
}

/// Fills the checks queue with a check per id, starts the service and times it until `done`.
pub(super) async fn check_pass<F, Fut>(
    env: &Env<'_>,
    stage: &Stage,
    ids: &[Uuid],
    log: &str,
    done: F,
) -> Result<CheckPass>
where
    F: FnOnce(Instant) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let (n, per_message) = (ids.len() as u64, env.options.ids_per_message);
    stage.fill_checks(ids.iter().copied(), ids.len(), per_message).await?;
    let channel = stage.publisher.create_channel().await?;
    let queue = stage.topology.checks_queue();
    let messages = broker::ready(&channel, &queue).await?;
    let mut service = stage.start_service(env, log).await?;
    let started = Instant::now();
    let meter = Meter::start(vec![("callback-service".into(), Target::Fresh(service.pid()?))]);
    // Timed by the queue depth while the prefetch window is full: from then on a delivery leaves
    // the queue exactly when an earlier one was acked.
    let mut slope_from: Option<(Instant, u64)> = None;
    let deadline = started + env.options.deadline;
    let emptied = loop {
        let left = broker::ready(&channel, &queue).await?;
        if slope_from.is_none() && left + CHECK_PREFETCH < messages && left > 0 {
            slope_from = Some((Instant::now(), left));
        }
        if left == 0 {
            break Instant::now();
        }
        service.ensure_running()?;
        anyhow::ensure!(Instant::now() < deadline, "{left} CHECK messages left at the deadline");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    done(deadline).await?;
    let elapsed = started.elapsed();
    let cost = meter.finish(n).await.remove(0);
    let peak_rss_bytes = procfs::peak_rss_bytes(service.pid()?).unwrap_or(0);
    service.terminate(Duration::from_secs(30)).await?;
    let (per_s, timing) = match slope_from {
        Some((from, left)) if left * per_message as u64 >= n / 4 => (
            (left * per_message as u64) as f64 / (emptied - from).as_secs_f64().max(1e-3),
            "queue-depth slope".to_owned(),
        ),
        _ => (n as f64 / elapsed.as_secs_f64().max(1e-3), "start to end".to_owned()),
    };
    Ok(CheckPass { per_s, timing, cpu_s_per_1k: cost.cpu_s_per_1k, peak_rss_bytes })
}

/// Waits until the checks queue holds nothing, delivered-but-unacked included.
pub(super) async fn queue_empty(env: &Env<'_>, stage: &Stage, deadline: Instant) -> Result<()> {
    let queue = stage.topology.checks_queue();
    loop {
        let listed = env
            .rabbit
            .ctl(&["list_queues", "-q", "--no-table-headers", "-p", &stage.vhost, "name", "messages"])
            .await?;
        let left = listed
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{queue}\t"))?.trim().parse::<u64>().ok())
            .context("the checks queue is not listed")?;
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{left} CHECK messages left at the deadline");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A message id the backlog's rows and checks share (valid UUID text, easy to generate in SQL).
fn backlog_id(i: u64) -> Uuid {
    Uuid::from_u128(0x0000_0000_0000_7000_8000_0000_0000_0000 | u128::from(i))
}

const SQLITE_PENDING: &str =
    "WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < $1)
    INSERT INTO messages (message_id, producer, routing_key, business_key, expect, status, attempt,
        scheduled_attempt, published_at, created_at, updated_at)
    SELECT printf('00000000-0000-7000-8000-%012x', i), 'orders', 'order.created', 'bench', 'points',
        'pending', 0, 0, $2, $2, $2 FROM seq";

const POSTGRES_PENDING: &str =
    "INSERT INTO messages (message_id, producer, routing_key, business_key, expect,
        status, attempt, scheduled_attempt, published_at, created_at, updated_at)
    SELECT '00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'), 'orders', 'order.created', 'bench',
        'points', 'pending', 0, 0, $2, $2, $2 FROM generate_series(0, $1 - 1) AS i";

/// RSS with `pending` unconfirmed messages in the store and their due checks in the queue.
pub async fn backlog(env: &Env<'_>, store: CallbackStore, pending: u64) -> Result<Backlog> {
    let o = &env.options;
    let stage = Stage::new(env, store, &format!("backlog-{pending}"), "1h").await?;
    // The service's own migrations, then the rows in one statement.
    let migrated = callback_service::store::Store::connect(&stage.database_url).await?;
    let sql = match store {
        CallbackStore::Sqlite => SQLITE_PENDING,
        CallbackStore::Postgres => POSTGRES_PENDING,
    };
    sqlx::query(sql).bind(pending as i64).bind(now_ms()).execute(migrated.pool()).await?;
    migrated.pool().close().await;
    stage.fill_checks((0..pending).map(backlog_id), pending as usize, o.ids_per_message).await?;
    let channel = stage.publisher.create_channel().await?;
    let queue = stage.topology.checks_queue();
    let before = broker::ready(&channel, &queue).await?;

    let mut service = stage.start_service(env, "backlog.log").await?;
    let pid = service.pid()?;
    let started = Instant::now();
    // A fixed window: small backlogs are done early and sit idle, large ones are still draining.
    while started.elapsed() < o.backlog_window {
        tokio::time::sleep(Duration::from_millis(250)).await;
        service.ensure_running()?;
    }
    let window = started.elapsed();
    let end_rss = procfs::rss_bytes(pid).unwrap_or(0);
    let peak = procfs::peak_rss_bytes(pid).unwrap_or(0);
    // Taken = left the queue: handled, or in the prefetch window. (A check's row does not show
    // it: while the hook is down the circuit breaker defers checks without touching the row.)
    let left = broker::ready(&channel, &queue).await?;
    service.terminate(Duration::from_secs(60)).await?;
    stage.publisher.close().await;
    Ok(Backlog {
        store: store.label().into(),
        pending,
        peak_rss_bytes: peak,
        end_rss_bytes: end_rss,
        taken: before.saturating_sub(left) * o.ids_per_message as u64,
        window_s: window.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn backlog_ids_match_the_sql_ones() {
        assert_eq!(super::backlog_id(0x2a).to_string(), "00000000-0000-7000-8000-00000000002a");
    }
}
