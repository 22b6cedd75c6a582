//! **recheck (SDK)**: Recheck's own cost, without the order service's. The bench process is the
//! producer — `Producer::prepare` then `Prepared::publish`, as many in flight as raw, no order
//! database and no gRPC — against the real downstream-demo and callback service (SQLite store).
//! Beside raw it shows what the pattern itself costs; beside `recheck (SQLite)` what the demo's
//! per-order transaction and `CreateOrder` call add.

use anyhow::{Context, Result};
use recheck::{Event, Producer, ProducerConfig, Topology, topology::parse_tiers};
use tokio::time::Instant;

use super::{
    Env, POLL, broker,
    load::{self, Latency},
    procfs::{Meter, Target},
    report::{Offered, Scenario},
    wait_rows,
};
use crate::deploy::{DeployOptions, Deployment, Role};

const CONFIRMED: &str = "SELECT COUNT(*) FROM messages WHERE status = 'confirmed'";

pub async fn run(env: &Env<'_>) -> Result<Scenario> {
    let o = &env.options;
    let vhost = env.fresh_vhost().await?;
    let deploy = DeployOptions {
        tiers: o.tiers.clone(),
        check_delay: o.check_delay_text(),
        ..DeployOptions::new(o.out.join("recheck-sdk"), vhost.url.clone())
    };
    // upstream-demo only answers the hook (no resends are expected): the bench produces.
    let deployment = Deployment::start(&env.bin_dir, &deploy).await?;
    let result = measure(env, &deployment, &vhost.url).await;
    let stopped = deployment.stop().await;
    let scenario = result?;
    stopped?;
    Ok(scenario)
}

async fn measure(env: &Env<'_>, deployment: &Deployment, amqp_url: &str) -> Result<Scenario> {
    let o = &env.options;
    let tiers = parse_tiers(&o.tiers).map_err(anyhow::Error::msg)?;
    let publisher = broker::publisher(amqp_url, "bench-sdk-producer").await?;
    // The name upstream-demo's hook answers for, and the consumer it expects: as the demo does.
    let producer = Producer::new(
        publisher.clone(),
        Topology::new("recheck", tiers.clone()),
        ProducerConfig { check_delay: o.check_delay, ..ProducerConfig::new("orders") },
    );
    let create = |i: u64| {
        let producer = &producer;
        async move {
            let order_id = format!("sdk-{i}");
            let payload = serde_json::json!({
                "order_id": order_id, "customer": format!("customer-{}", i % 100), "amount_cents": 100 + i % 900,
            });
            let prepared = producer
                .prepare(Event {
                    routing_key: "order.created".into(),
                    business_key: order_id,
                    payload: payload.to_string().into_bytes(),
                    expect: Some(vec!["points".into()]),
                })
                .await?;
            prepared.publish().await?;
            Ok(())
        }
    };
    let (callback_db, _) = recheck::db::connect(&deployment.callback_db).await?;

    let offered = load::drive(o.offered_orders, o.offered_rate, o.window, create).await;
    offered.ensure_ok("recheck (SDK): prepare + publish at the offered load")?;
    wait_rows(&callback_db, CONFIRMED, offered.done, POLL, o.deadline)
        .await
        .context("recheck (SDK): offered load")?;

    let pid = |role| deployment.pid(role).with_context(|| format!("{role} is not running"));
    let mut targets = vec![
        ("bench (producer)".to_owned(), Target::Shared(std::process::id())),
        ("downstream-demo (consumer)".to_owned(), Target::Fresh(pid(Role::Downstream)?)),
        ("callback-service".to_owned(), Target::Fresh(pid(Role::Callback(0))?)),
    ];
    targets.extend(env.server_targets(false));
    let meter = Meter::start(targets);
    let created = load::drive(o.messages, 0, o.window, |i| create(o.offered_orders + i)).await;
    created.ensure_ok("recheck (SDK): prepare + publish")?;
    let total = offered.done + created.done;
    // Not every message confirmed by the deadline is an error of the run, and is counted as lost.
    let settled = wait_rows(&callback_db, CONFIRMED, total, POLL, o.deadline).await;
    let confirmed = super::count_rows(&callback_db, CONFIRMED).await?;
    let last_confirmed_ms = super::count_rows(&callback_db, "SELECT MAX(updated_at) FROM messages").await?;
    // The last messages' checks are part of their cost: let them come due and be handled.
    let topology = Topology::new("recheck", tiers);
    let mut queues: Vec<String> = topology.tiers.iter().map(|t| topology.tier_queue(*t)).collect();
    queues.push(topology.checks_queue());
    if settled.is_ok() {
        let channel = publisher.create_channel().await?;
        broker::wait_drained(&channel, &queues, Instant::now() + o.deadline).await?;
    }
    let processes = meter.finish(created.done).await;
    let batches = super::batch_sizes(deployment).await;
    publisher.close().await;
    callback_db.close().await;

    let elapsed_s = (last_confirmed_ms - created.started_ms) as f64 / 1000.0;
    Ok(Scenario {
        name: "recheck (SDK, SQLite)".into(),
        messages: created.done,
        lost: total.saturating_sub(u64::try_from(confirmed).unwrap_or(0)),
        elapsed_s,
        per_s: created.done as f64 / elapsed_s.max(1e-3),
        latency_us: Latency::of(&created.latency),
        offered: Some(Offered {
            rate_per_s: o.offered_rate,
            orders: offered.done,
            latency_us: Latency::of(&offered.latency),
        }),
        extra_producer_db_writes_per_msg: 0.0,
        processes,
        notes: vec![
            batches,
            format!(
                "create = `prepare` (CHECK group commit) then `publish`, both \
             broker-confirmed, {} in flight, from the bench process: no order database, no gRPC; \
             downstream-demo and the callback service (SQLite) as in recheck (SQLite); lost = \
             prepared but not `confirmed` in the callback store by the deadline",
                o.window
            ),
        ],
    })
}
