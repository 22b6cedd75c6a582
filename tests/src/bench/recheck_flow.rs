//! **recheck**: the three real binaries (upstream-demo, downstream-demo, callback-service) on one
//! broker, driven through `Orders/CreateOrder`; the callback store on SQLite or PostgreSQL. A
//! message is reconciled when the callback store says `confirmed`.
//!
//! **recheck (SDK)**: Recheck's own cost, without the order service's. The bench process is the
//! producer — `Producer::prepare` then `Prepared::publish`, as many in flight as raw, no order
//! database and no gRPC — against the same consumer and callback service (upstream-demo only
//! answers the hook). Beside raw it shows what the pattern itself costs; beside `recheck
//! (SQLite)` what the demo's per-order transaction and `CreateOrder` call add.

use std::time::Duration;

use anyhow::{Context, Result};
use recheck::{Event, Producer, ProducerConfig, ReserveConfig, Topology, topology::parse_tiers};
use tokio::time::Instant;

use super::{
    Env, POLL, broker, count_rows,
    load::{self, Driven, Latency},
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

/// Who produces the business messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// upstream-demo, through `CreateOrder` (order row and commit included).
    Orders,
    /// The bench process, through the SDK alone.
    Sdk,
}

const CONFIRMED: &str = "SELECT COUNT(*) FROM messages WHERE status = 'confirmed'";

pub async fn run(env: &Env<'_>, store: CallbackStore, source: Source, remote: bool) -> Result<Scenario> {
    let o = &env.options;
    let vhost = env.fresh_vhost().await?;
    let (amqp_url, _proxy) = env.broker_url(&vhost.url, remote)?;
    let callback_database_url = match store {
        CallbackStore::Sqlite => None,
        CallbackStore::Postgres => Some(env.postgres.fresh_database().await?.url),
    };
    let label = store.label();
    let (mut name, mut dir) = match source {
        Source::Orders => (format!("recheck ({label})"), format!("recheck-{}", label.to_lowercase())),
        Source::Sdk => (format!("recheck (SDK, {label})"), format!("recheck-sdk-{}", label.to_lowercase())),
    };
    if remote {
        name = env.remote_name(&name);
        dir.push_str("-remote");
    }
    let dir = o.out.join(dir);
    let deploy = DeployOptions {
        tiers: o.tiers.clone(),
        check_delay: o.check_delay_text(),
        reserve: o.reserve,
        callback_database_url,
        ..DeployOptions::new(dir, amqp_url.clone())
    };
    let deployment = Deployment::start(&env.bin_dir, &deploy).await?;
    let result = measure(env, &deployment, store, source, name, &amqp_url).await;
    let stopped = deployment.stop().await;
    let scenario = result?;
    stopped?;
    Ok(scenario)
}

async fn measure(
    env: &Env<'_>,
    deployment: &Deployment,
    store: CallbackStore,
    source: Source,
    name: String,
    amqp_url: &str,
) -> Result<Scenario> {
    let o = &env.options;
    let tiers = parse_tiers(&o.tiers).map_err(anyhow::Error::msg)?;
    let link = broker::publisher(amqp_url, "bench-recheck").await?;
    let producer = Producer::new(
        link.clone(),
        Topology::new("recheck", tiers.clone()),
        // The name upstream-demo's hook answers for.
        ProducerConfig {
            check_delay: o.check_delay,
            grace: Duration::from_secs(2),
            reserve: o
                .reserve
                .then(|| ReserveConfig { max_age: Duration::from_secs(3), ..ReserveConfig::default() }),
            ..ProducerConfig::new("orders")
        },
    );
    let orders = format!("http://127.0.0.1:{}", deployment.orders_port);
    // One load phase: `count` creates from index `first`, at `rate` (0 = as fast as they go).
    let phase = |first: u64, count: u64, rate: u64| {
        let (producer, orders) = (&producer, &orders);
        async move {
            Ok::<Driven, anyhow::Error>(match source {
                Source::Orders => load::create_orders(orders, count, rate, o.concurrency).await?,
                Source::Sdk => load::drive(count, rate, o.window, |i| sdk_create(producer, first + i)).await,
            })
        }
    };
    let (callback_db, _) = recheck::db::connect(&deployment.callback_db).await?;

    // The offered load first (it also warms the services up), settled before the saturated run.
    let offered = phase(0, o.offered_orders, o.offered_rate).await?;
    offered.ensure_ok(&format!("{name}: creates at the offered load"))?;
    wait_rows(&callback_db, CONFIRMED, offered.done, POLL, o.deadline)
        .await
        .with_context(|| format!("{name}: offered load"))?;

    let pid = |role| deployment.pid(role).with_context(|| format!("{role} is not running"));
    let producer_target = match source {
        Source::Orders => ("upstream-demo (producer)".to_owned(), Target::Fresh(pid(Role::Upstream)?)),
        Source::Sdk => ("bench (producer)".to_owned(), Target::Shared(std::process::id())),
    };
    let mut targets = vec![
        producer_target,
        ("downstream-demo (consumer)".to_owned(), Target::Fresh(pid(Role::Consumer(0))?)),
        ("callback-service".to_owned(), Target::Fresh(pid(Role::Callback(0))?)),
    ];
    targets.extend(env.server_targets(store == CallbackStore::Postgres));
    let meter = Meter::start(targets);
    let pool_before = Pool::read(deployment, source).await;
    let created = phase(o.offered_orders, o.messages, 0).await?;
    let pool_after = Pool::read(deployment, source).await;
    created.ensure_ok(&format!("{name}: creates"))?;
    // The unused reservations go back now, so their checks cost no hook call.
    producer.close().await;
    let total = offered.done + created.done;
    wait_rows(&callback_db, CONFIRMED, total, POLL, o.deadline)
        .await
        .with_context(|| format!("{name}: saturated load"))?;
    let last_confirmed_ms = count_rows(&callback_db, "SELECT MAX(updated_at) FROM messages").await?;
    // The checks of the last messages are part of their cost: let them come due and be handled.
    let topology = Topology::new("recheck", tiers);
    let mut queues: Vec<String> = topology.tiers.iter().map(|t| topology.tier_queue(*t)).collect();
    queues.push(topology.checks_queue());
    broker::wait_drained(&link.create_channel().await?, &queues, Instant::now() + o.deadline).await?;
    let processes = meter.finish(created.done).await;
    let unused = count_rows(&callback_db, "SELECT COUNT(*) FROM messages WHERE status = 'unused'").await?;
    let reservations = Pool::note(pool_before, pool_after, unused.max(0) as u64, created.done, total);
    link.close().await;
    callback_db.close().await;

    let batches = super::batch_sizes(deployment).await;
    let verdict = deployment.verdict().await?;
    let (lost, create) = match source {
        // Committed orders not in the consumer's effects.
        Source::Orders => (
            verdict.lost,
            format!(
                "create = CreateOrder over gRPC (a reserved CHECK, or the CHECK group commit → order insert + commit → answer; \
                 the business message is published after the answer), {} in flight",
                o.concurrency
            ),
        ),
        // No order store: every prepared message was waited for until `confirmed` above.
        Source::Sdk => (
            0,
            format!(
                "create = `prepare` (a reserved CHECK, or the CHECK group commit) then `publish`, both broker-confirmed, {} in \
                 flight, from the bench process: no order database, no gRPC; lost = prepared and \
                 published but never `confirmed` (the run fails then)",
                o.window
            ),
        ),
    };
    let elapsed_s = (last_confirmed_ms - created.started_ms) as f64 / 1000.0;
    Ok(Scenario {
        name,
        messages: created.done,
        lost,
        elapsed_s,
        per_s: created.done as f64 / elapsed_s.max(1e-3),
        latency_us: Latency::of(&created.latency),
        offered: Offered::at(o.offered_rate, &offered),
        extra_producer_db_writes_per_msg: verdict.hook_calls as f64 / total.max(1) as f64,
        processes,
        notes: vec![
            format!("{create}; check delay {}", o.check_delay_text()),
            batches,
            reservations,
            format!(
                "{} resends ({} messages), {} duplicates absorbed by the inbox, {} pending at the end; \
                 extra producer-DB writes are upstream-demo's audit rows of resend-hook calls",
                verdict.resends, verdict.resent_messages, verdict.duplicates_absorbed, verdict.pending
            ),
        ],
    })
}

/// upstream-demo's reservation counters at one moment (`None`: not read, or the SDK row).
#[derive(Debug, Clone, Copy)]
struct Pool {
    from_pool: f64,
    reserved: f64,
    released: f64,
}

impl Pool {
    async fn read(deployment: &Deployment, source: Source) -> Option<Self> {
        if source == Source::Sdk {
            return None;
        }
        let m = deployment.scrape(Role::Upstream).await.ok()?;
        Some(Self {
            from_pool: m.sum("recheck_prepared_total", &[("path", "reserved")]),
            reserved: m.sum("recheck_reserved_total", &[]),
            released: m.sum("recheck_released_total", &[]),
        })
    }

    /// How the run used reserved CHECKs: prepares served from the pool during the saturated
    /// phase, ids that aged out in the pool *during* it (the steady waste), the pool held when it
    /// ended (given back once idle, as at a shutdown), and every `unused` row of the run.
    fn note(before: Option<Self>, after: Option<Self>, unused: u64, created: u64, total: u64) -> String {
        let share = |n: f64, of: u64| 100.0 * n / of.max(1) as f64;
        let unused = format!(
            "{unused} unused ids over the whole run ({:.2} % of its messages)",
            share(unused as f64, total)
        );
        let (Some(b), Some(a)) = (before, after) else {
            return format!("reservations: {unused}, the pool given back at the end included");
        };
        let from_pool = a.from_pool - b.from_pool;
        let wasted = a.released - b.released;
        let held = a.reserved - a.from_pool - a.released;
        format!(
            "reservations, saturated phase: {from_pool} prepares from the pool ({:.1} %), {wasted} ids aged out \
             in it ({:.2} %), {held} held when it ended; {unused}",
            share(from_pool, created),
            share(wasted, created)
        )
    }
}

/// One order's message through the SDK: CHECK, then the business message (the payload the
/// consumer's effect reads).
async fn sdk_create(producer: &Producer, i: u64) -> Result<()> {
    let order_id = format!("sdk-{i}");
    let payload = serde_json::json!({
        "order_id": order_id, "customer": format!("customer-{}", i % 100), "amount_cents": 100 + i % 900,
    });
    let event = Event {
        routing_key: "order.created".into(),
        business_key: order_id,
        payload: payload.to_string().into_bytes(),
        expect: Some(vec!["points".into()]),
    };
    producer.prepare(event).await?.publish().await?;
    Ok(())
}
