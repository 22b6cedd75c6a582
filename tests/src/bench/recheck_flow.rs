//! **recheck**: the three real binaries (upstream-demo, downstream-demo, callback-service) on one
//! broker, driven through `Orders/CreateOrder`; the callback store on SQLite or PostgreSQL. A
//! message is reconciled when the callback store says `confirmed`.

use anyhow::{Context, Result};
use recheck::Topology;
use tokio::time::Instant;

use super::{
    Env, POLL, broker, count_rows,
    load::{self, Latency},
    procfs::{Meter, Target},
    report::{Offered, Scenario},
    wait_rows,
};
use crate::deploy::{DeployOptions, Deployment, Role};

/// Where the callback service keeps its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackStore {
    Sqlite,
    Postgres,
}

impl CallbackStore {
    pub fn label(self) -> &'static str {
        match self {
            CallbackStore::Sqlite => "SQLite",
            CallbackStore::Postgres => "Postgres",
        }
    }
}

const CONFIRMED: &str = "SELECT COUNT(*) FROM messages WHERE status = 'confirmed'";

pub async fn run(env: &Env<'_>, store: CallbackStore) -> Result<Scenario> {
    let o = &env.options;
    let vhost = env.fresh_vhost().await?;
    let callback_database_url = match store {
        CallbackStore::Sqlite => None,
        CallbackStore::Postgres => Some(env.postgres.fresh_database().await?.url),
    };
    let dir = o.out.join(format!("recheck-{}", store.label().to_lowercase()));
    let deploy = DeployOptions {
        tiers: o.tiers.clone(),
        check_delay: o.check_delay_text(),
        callback_database_url,
        ..DeployOptions::new(dir, vhost.url.clone())
    };
    let deployment = Deployment::start(&env.bin_dir, &deploy).await?;
    let result = measure(env, &deployment, store, &vhost.url).await;
    let stopped = deployment.stop().await;
    let scenario = result?;
    stopped?;
    Ok(scenario)
}

async fn measure(
    env: &Env<'_>,
    deployment: &Deployment,
    store: CallbackStore,
    amqp_url: &str,
) -> Result<Scenario> {
    let o = &env.options;
    let addr = format!("http://127.0.0.1:{}", deployment.orders_port);
    let (callback_db, _) = recheck::db::connect(&deployment.callback_db).await?;

    // The offered load first (it also warms the services up), settled before the saturated run.
    let offered = load::create_orders(&addr, o.offered_orders, o.offered_rate, o.concurrency).await?;
    offered.ensure_ok("recheck: CreateOrder at the offered load")?;
    wait_rows(&callback_db, CONFIRMED, offered.done, POLL, o.deadline)
        .await
        .context("recheck: offered load")?;

    let pid = |role| deployment.pid(role).with_context(|| format!("{role} is not running"));
    let mut targets = vec![
        ("upstream-demo (producer)".to_owned(), Target::Fresh(pid(Role::Upstream)?)),
        ("downstream-demo (consumer)".to_owned(), Target::Fresh(pid(Role::Downstream)?)),
        ("callback-service".to_owned(), Target::Fresh(pid(Role::Callback(0))?)),
    ];
    targets.extend(env.server_targets(store == CallbackStore::Postgres));
    let meter = Meter::start(targets);
    let created = load::create_orders(&addr, o.messages, 0, o.concurrency).await?;
    created.ensure_ok("recheck: CreateOrder")?;
    let total = offered.done + created.done;
    wait_rows(&callback_db, CONFIRMED, total, POLL, o.deadline).await.context("recheck: saturated load")?;
    let last_confirmed_ms = count_rows(&callback_db, "SELECT MAX(updated_at) FROM messages").await?;
    // The checks of the last messages are part of their cost: let them come due and be handled.
    let topology =
        Topology::new("recheck", recheck::topology::parse_tiers(&o.tiers).map_err(anyhow::Error::msg)?);
    let mut queues: Vec<String> = topology.tiers.iter().map(|t| topology.tier_queue(*t)).collect();
    queues.push(topology.checks_queue());
    let link = broker::publisher(amqp_url, "bench-probe").await?;
    broker::wait_drained(&link.create_channel().await?, &queues, Instant::now() + o.deadline).await?;
    link.close().await;
    let processes = meter.finish(created.done).await;
    callback_db.close().await;

    let verdict = deployment.verdict().await?;
    let batches = super::batch_sizes(deployment).await;
    let elapsed_s = (last_confirmed_ms - created.started_ms) as f64 / 1000.0;
    Ok(Scenario {
        name: format!("recheck ({})", store.label()),
        messages: created.done,
        lost: verdict.lost,
        elapsed_s,
        per_s: created.done as f64 / elapsed_s.max(1e-3),
        latency_us: Latency::of(&created.latency),
        offered: Some(Offered {
            rate_per_s: o.offered_rate,
            orders: offered.done,
            latency_us: Latency::of(&offered.latency),
        }),
        extra_producer_db_writes_per_msg: verdict.hook_calls as f64 / verdict.committed.max(1) as f64,
        processes,
        notes: vec![
            batches,
            format!(
                "create = CreateOrder over gRPC (CHECK group commit → order insert + commit → answer; the \
                 business message is published after the answer), \
                 {} in flight; check delay {}",
                o.concurrency,
                o.check_delay_text()
            ),
            format!(
                "{} resends ({} messages), {} duplicates absorbed by the inbox, {} pending at the end; \
                 extra producer-DB writes are upstream-demo's audit rows of resend-hook calls",
                verdict.resends, verdict.resent_messages, verdict.duplicates_absorbed, verdict.pending
            ),
        ],
    })
}
