//! **raw**: the broker's own limit for this workload — publish (persistent, confirmed, many in
//! flight) → one quorum queue → consume (manual ack, `multiple` per micro-batch). One broker
//! message per business message, no database, no check.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use lapin::{BasicProperties, options::BasicAckOptions};
use recheck::{Outgoing, Publisher, Subscription, SubscriptionConfig, message::now_ms};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Env,
    broker::{self, declare_quorum},
    load::{self, Latency},
    procfs::Meter,
    report::{Offered, Scenario},
};

const QUEUE: &str = "bench.raw";

pub async fn run(env: &Env<'_>) -> Result<Scenario> {
    let o = &env.options;
    let (n, warm) = (o.messages, o.offered_orders);
    let vhost = env.fresh_vhost().await?;
    let producer = broker::publisher(&vhost, "bench-raw-producer").await?;
    let consumer = broker::publisher(&vhost, "bench-raw-consumer").await?;
    declare_quorum(&producer.create_channel().await?, QUEUE).await?;

    let stop = CancellationToken::new();
    let progress = Arc::new(AtomicU64::new(0));
    let consumed = tokio::spawn(consume(consumer.clone(), warm + n, progress.clone(), stop.clone()));
    let publish = |i: u64| {
        let producer = &producer;
        async move {
            let body = i.to_le_bytes();
            let properties = BasicProperties::default();
            producer.publish(Outgoing { exchange: "", routing_key: QUEUE, body: &body, properties }).await?;
            Ok(())
        }
    };
    // The offered load (one publish = one "create"), consumed before the saturated run.
    let offered = load::drive(warm, o.offered_rate, o.window, publish).await;
    offered.ensure_ok("raw: publish at the offered load")?;
    let deadline = Instant::now() + o.deadline;
    while progress.load(Ordering::Relaxed) < warm {
        anyhow::ensure!(Instant::now() < deadline, "raw: the offered load was not consumed in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let meter = Meter::start(env.targets("bench (producer + consumer)", false));
    let created = load::drive(n, 0, o.window, |i| publish(warm + i)).await;
    created.ensure_ok("raw: publish")?;
    let waited = tokio::time::timeout(o.deadline, consumed).await;
    stop.cancel();
    let (unique, last_ack_ms) =
        waited.context("raw: the consumer did not get every message in time")???;
    let processes = meter.finish(n).await;
    producer.close().await;
    consumer.close().await;

    let elapsed_s = (last_ack_ms - created.started_ms) as f64 / 1000.0;
    Ok(Scenario {
        name: "raw".into(),
        messages: n,
        lost: warm + n - unique,
        elapsed_s,
        per_s: n as f64 / elapsed_s.max(1e-3),
        latency_us: Latency::of(&created.latency),
        offered: Offered::at(o.offered_rate, &offered),
        extra_producer_db_writes_per_msg: 0.0,
        processes,
        notes: vec![format!(
            "broker only, no database; create = one publish until its broker confirm, {} in flight; \
             consumer prefetch 256, ack(multiple) per batch",
            o.window
        )],
    })
}

/// Consumes until all `n` distinct messages were acked (counting them in `progress`); returns
/// (distinct, wall ms of the last ack).
async fn consume(
    link: Publisher,
    n: u64,
    progress: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<(u64, i64)> {
    let config = SubscriptionConfig::new(QUEUE, "bench-raw");
    let mut subscription = Subscription::new(link, config).await?;
    let mut seen = vec![false; n as usize];
    let (mut unique, mut last_ack_ms) = (0u64, now_ms());
    while unique < n {
        let Some(batch) = subscription.next_batch(&stop).await? else { break };
        for d in &batch {
            let index = d.data.as_slice().try_into().map(u64::from_le_bytes).unwrap_or(u64::MAX);
            if let Some(slot) = seen.get_mut(index as usize).filter(|s| !**s) {
                *slot = true;
                unique += 1;
            }
        }
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
            last_ack_ms = now_ms();
            progress.store(unique, Ordering::Relaxed);
        }
    }
    subscription.close().await;
    Ok((unique, last_ack_ms))
}
