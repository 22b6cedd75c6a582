//! **outbox**: the transactional-outbox baseline on the same order workload — the bench's outbox
//! service (order row + outbox row in one transaction, a relay publishing with confirms and
//! marking rows sent, [`super::outbox_service`]) and downstream-demo as the consumer (inbox +
//! points, its CONFIRMs switched off: an outbox needs none). A message is reconciled when the
//! consumer has committed its effect.

use std::{collections::HashSet, time::Duration};

use anyhow::{Context, Result};

use super::{
    Env, POLL, count_rows,
    load::{self, Latency},
    process::Process,
    procfs::{Meter, Target},
    report::{Offered, Scenario},
    wait_rows,
};
use crate::deploy::CONSUMER_QUEUE;

const POINTS: &str = "SELECT COUNT(*) FROM points";

pub async fn run(env: &Env<'_>, remote: bool) -> Result<Scenario> {
    let o = &env.options;
    let vhost = env.fresh_vhost().await?;
    let (amqp_url, _proxy) = env.broker_url(&vhost.url, remote)?;
    let name = if remote { env.remote_name("outbox") } else { "outbox".to_owned() };
    let dir = o.out.join(if remote { "outbox-remote" } else { "outbox" });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let orders_db = format!("sqlite://{}/orders.db?mode=rwc", dir.display());
    let points_db = format!("sqlite://{}/points.db?mode=rwc", dir.display());
    let port = crate::free_port()?;

    let mut producer = Process::spawn(
        &env.bench_exe,
        &[
            "outbox-service",
            "--amqp-url",
            &amqp_url,
            "--database-url",
            &orders_db,
            "--grpc-addr",
            &format!("127.0.0.1:{port}"),
        ],
        &[("RUST_LOG", "warn".into())],
        dir.join("outbox-service.log"),
    )?;
    producer.wait_for_port(port, Duration::from_secs(60)).await?;
    let consumer = Process::spawn(
        &env.bin_dir.join("downstream-demo"),
        &["serve"],
        &[
            ("RECHECK_AMQP_URL", amqp_url.clone()),
            ("DATABASE_URL", points_db.clone()),
            ("RECHECK_LOG", "warn".into()),
            // An outbox consumer sends no CONFIRM; the inbox + effect are the same as Recheck's.
            ("RECHECK_DROP_CONFIRM_RATE", "1".into()),
            // Any free port for the ops listener (/metrics): others may run beside it.
            ("RECHECK_OPS_ADDR", "127.0.0.1:0".into()),
        ],
        dir.join("downstream-demo.log"),
    )?;
    crate::deploy::wait_for_consumer(&vhost.url, CONSUMER_QUEUE, Duration::from_secs(60)).await?;

    let result = measure(env, &producer, &consumer, &orders_db, &points_db, port, name).await;
    let stopped_producer = producer.terminate(Duration::from_secs(20)).await;
    let stopped_consumer = consumer.terminate(Duration::from_secs(20)).await;
    let scenario = result?;
    stopped_producer?;
    stopped_consumer?;
    Ok(scenario)
}

async fn measure(
    env: &Env<'_>,
    producer: &Process,
    consumer: &Process,
    orders_db: &str,
    points_db: &str,
    port: u16,
    name: String,
) -> Result<Scenario> {
    let o = &env.options;
    let addr = format!("http://127.0.0.1:{port}");
    let (points, _) = recheck::db::connect(points_db).await?;
    // The consumer creates its table at start; wait_for_consumer saw it subscribed, so it exists.
    let offered = load::create_orders(&addr, o.offered_orders, o.offered_rate, o.concurrency).await?;
    offered.ensure_ok("outbox: CreateOrder at the offered load")?;
    wait_rows(&points, POINTS, offered.done, POLL, o.deadline).await.context("outbox: offered load")?;

    let mut targets = vec![
        ("outbox-service (producer + relay)".to_owned(), Target::Fresh(producer.pid()?)),
        ("downstream-demo (consumer)".to_owned(), Target::Fresh(consumer.pid()?)),
    ];
    targets.extend(env.server_targets(false));
    let meter = Meter::start(targets);
    let created = load::create_orders(&addr, o.messages, 0, o.concurrency).await?;
    created.ensure_ok("outbox: CreateOrder")?;
    let total = offered.done + created.done;
    wait_rows(&points, POINTS, total, POLL, o.deadline).await.context("outbox: saturated load")?;
    let last_awarded_ms = count_rows(&points, "SELECT MAX(awarded_at) FROM points").await?;
    let processes = meter.finish(created.done).await;

    let (orders, _) = recheck::db::connect(orders_db).await?;
    let committed: Vec<(String,)> =
        sqlx::query_as("SELECT message_id FROM orders").fetch_all(&orders).await?;
    let awarded: HashSet<String> = sqlx::query_as::<_, (String,)>("SELECT message_id FROM points")
        .fetch_all(&points)
        .await?
        .into_iter()
        .map(|(id,)| id)
        .collect();
    let lost = committed.iter().filter(|(id,)| !awarded.contains(id)).count() as u64;
    let outbox_rows = count_rows(&orders, "SELECT COUNT(*) FROM outbox").await?;
    let marked = count_rows(&orders, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL").await?;
    orders.close().await;
    points.close().await;

    let elapsed_s = (last_awarded_ms - created.started_ms) as f64 / 1000.0;
    Ok(Scenario {
        name,
        messages: created.done,
        lost,
        elapsed_s,
        per_s: created.done as f64 / elapsed_s.max(1e-3),
        latency_us: Latency::of(&created.latency),
        offered: Offered::at(o.offered_rate, &offered),
        extra_producer_db_writes_per_msg: (outbox_rows + marked) as f64 / committed.len().max(1) as f64,
        processes,
        notes: vec![format!(
            "create = CreateOrder over gRPC (order + outbox row, one transaction), {} in flight; \
             relay: unsent rows by id, 500 a round, all published before one UPDATE marks them; \
             {outbox_rows} outbox rows, {marked} marked sent",
            o.concurrency
        )],
    })
}
