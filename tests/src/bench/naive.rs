//! **naive**: the delayed second check without batching — per business message one CHECK
//! (through a TTL delay queue and its dead-letter hop), the business message, and one CONFIRM:
//! four broker enqueues. Same topology and wire format as Recheck (the SDK's `Topology`, a batch
//! of one), no database: it shows what the pattern costs the broker before any group commit.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use futures_util::future::try_join_all;
use lapin::{message::Delivery, options::BasicAckOptions};
use recheck::{
    Outgoing, Publisher, Subscription, SubscriptionConfig, Topology,
    broker::control::publish_checks,
    message::{
        BusinessHeaders, CONTENT_TYPE_JSON, Check, CheckBatch, Confirm, ConfirmBatch, Limits, Outcome, now_ms,
    },
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    Env, broker,
    load::{self, Latency},
    procfs::Meter,
    report::{Offered, Scenario},
};

const CONSUMER_QUEUE: &str = "naive.points";
const EVENT: &str = "order.created";

/// What the checker has seen of one message.
#[derive(Default)]
struct Seen {
    confirmed: bool,
    checked: bool,
}

#[derive(Default)]
struct Tally {
    messages: HashMap<Uuid, Seen>,
    confirms: u64,
    checks: u64,
    /// Checks that arrived before their confirm: a naive checker would resend these.
    early_checks: u64,
    last_confirm_ms: i64,
}

pub async fn run(env: &Env<'_>) -> Result<Scenario> {
    let o = &env.options;
    let (n, warm) = (o.messages, o.offered_orders);
    let vhost = env.fresh_vhost().await?;
    let delay = o.check_delay;
    let topology = Topology::new("naive", vec![delay]);
    let producer = broker::publisher(&vhost, "bench-naive-producer").await?;
    let consumer = broker::publisher(&vhost, "bench-naive-consumer").await?;
    let checker = broker::publisher(&vhost, "bench-naive-checker").await?;
    let channel = producer.create_channel().await?;
    topology.declare(&channel).await?;
    topology.declare_consumer_queue(&channel, CONSUMER_QUEUE, &[EVENT]).await?;

    let stop = CancellationToken::new();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let tasks = [
        tokio::spawn(consume(consumer.clone(), topology.clone(), stop.clone())),
        tokio::spawn(check(
            checker.clone(),
            topology.checks_queue(),
            tally.clone(),
            Kind::Check,
            stop.clone(),
        )),
        tokio::spawn(check(
            checker.clone(),
            topology.confirms_queue(),
            tally.clone(),
            Kind::Confirm,
            stop.clone(),
        )),
    ];

    let create = |i: u64| {
        let (producer, topology) = (&producer, &topology);
        async move { create(producer, topology, i, delay).await }
    };
    let counts = || {
        let t = tally.lock().expect("tally lock");
        (t.confirms, t.checks)
    };
    let deadline = Instant::now() + o.deadline;
    let offered = load::drive(warm, o.offered_rate, o.window, create).await;
    offered.ensure_ok("naive: create at the offered load")?;
    while counts().0 < warm {
        anyhow::ensure!(Instant::now() < deadline, "naive: the offered load was not confirmed in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let meter = Meter::start(env.targets("bench (producer + consumer + checker)", false));
    let created = load::drive(n, 0, o.window, |i| create(warm + i)).await;
    created.ensure_ok("naive: create")?;
    // Reconciled once every confirm is in; the run ends when every check has come back too.
    let deadline = Instant::now() + o.deadline;
    loop {
        let (confirms, checks) = counts();
        if confirms >= warm + n && checks >= warm + n {
            break;
        }
        if tasks.iter().any(|t| t.is_finished()) {
            anyhow::bail!("naive: a consumer stopped early");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "naive: {confirms} confirms, {checks} checks of {n} in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let processes = meter.finish(n).await;
    stop.cancel();
    for task in tasks {
        task.await?.context("naive consumer")?;
    }
    for link in [&producer, &consumer, &checker] {
        link.close().await;
    }

    let t = tally.lock().expect("tally lock");
    let lost = t.messages.values().filter(|s| !(s.confirmed && s.checked)).count() as u64
        + (warm + n).saturating_sub(t.messages.len() as u64);
    let elapsed_s = (t.last_confirm_ms - created.started_ms) as f64 / 1000.0;
    Ok(Scenario {
        name: "naive".into(),
        messages: n,
        lost,
        elapsed_s,
        per_s: n as f64 / elapsed_s.max(1e-3),
        latency_us: Latency::of(&created.latency),
        offered: Offered::at(o.offered_rate, &offered),
        extra_producer_db_writes_per_msg: 0.0,
        processes,
        notes: vec![format!(
            "broker only, no database (the checker keeps its state in memory); create = CHECK then \
             business message, each until its broker confirm, {} in flight; \
             check delay {delay:?}; {} checks arrived before their confirm (a naive checker resends those)",
            o.window, t.early_checks
        )],
    })
}

/// One business message the naive way: its own CHECK, then the message.
async fn create(producer: &Publisher, topology: &Topology, i: u64, delay: Duration) -> Result<()> {
    let message_id = Uuid::now_v7();
    let business_key = format!("order-{i}");
    let check = Check {
        message_id,
        routing_key: EVENT.into(),
        business_key: business_key.clone(),
        attempt: 0,
        published_at: now_ms(),
        expect: Some(vec!["points".into()]),
        traceparent: None,
        reserved: false,
    };
    publish_checks(producer, topology, &CheckBatch::new("orders", vec![check]), delay).await?;
    let headers = BusinessHeaders { message_id, producer: "orders".into(), business_key, attempt: 0 };
    let body = format!(r#"{{"order_id":"order-{i}","customer":"customer-{}","amount_cents":1000}}"#, i % 100);
    producer
        .publish(Outgoing {
            exchange: &topology.events_exchange(),
            routing_key: EVENT,
            body: body.as_bytes(),
            properties: headers.to_properties(),
        })
        .await?;
    Ok(())
}

/// The consumer: one CONFIRM per message (each broker-confirmed), then `ack(multiple)`.
async fn consume(link: Publisher, topology: Topology, stop: CancellationToken) -> Result<()> {
    let config = SubscriptionConfig::new(CONSUMER_QUEUE, "bench-naive");
    let mut subscription = Subscription::new(link.clone(), config).await?;
    let exchange = topology.confirms_exchange();
    while let Some(batch) = subscription.next_batch(&stop).await? {
        try_join_all(batch.iter().map(|d| confirm_one(&link, &exchange, d))).await?;
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    subscription.close().await;
    Ok(())
}

async fn confirm_one(link: &Publisher, exchange: &str, delivery: &Delivery) -> Result<()> {
    let headers = BusinessHeaders::from_properties(&delivery.properties)?;
    let confirm = Confirm {
        message_id: headers.message_id,
        outcome: Outcome::Processed,
        detail: None,
        processed_at: now_ms(),
    };
    let body = serde_json::to_vec(&ConfirmBatch::new("points", vec![confirm]))?;
    link.publish(Outgoing {
        exchange,
        routing_key: "",
        body: &body,
        properties: lapin::BasicProperties::default().with_content_type(CONTENT_TYPE_JSON.into()),
    })
    .await?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Check,
    Confirm,
}

/// The checker: records confirms, and for each due check whether its confirm is already in.
async fn check(
    link: Publisher,
    queue: String,
    tally: Arc<Mutex<Tally>>,
    kind: Kind,
    stop: CancellationToken,
) -> Result<()> {
    let config = SubscriptionConfig::new(queue, "bench-naive-checker");
    let mut subscription = Subscription::new(link, config).await?;
    let limits = Limits::default();
    while let Some(batch) = subscription.next_batch(&stop).await? {
        {
            let mut t = tally.lock().expect("tally lock");
            let confirms_before = t.confirms;
            for d in &batch {
                let content_type = d.properties.content_type().as_ref().map(|c| c.as_str());
                let ids: Vec<Uuid> = match kind {
                    Kind::Check => CheckBatch::decode(&d.data, content_type, limits)?
                        .checks
                        .into_iter()
                        .map(|c| c.message_id)
                        .collect(),
                    Kind::Confirm => ConfirmBatch::decode(&d.data, content_type, limits)?
                        .confirms
                        .into_iter()
                        .map(|c| c.message_id)
                        .collect(),
                };
                for id in ids {
                    let Tally { messages, confirms, checks, early_checks, .. } = &mut *t;
                    let seen = messages.entry(id).or_default();
                    match kind {
                        Kind::Check if !seen.checked => {
                            seen.checked = true;
                            *checks += 1;
                            *early_checks += u64::from(!seen.confirmed);
                        }
                        Kind::Confirm if !seen.confirmed => {
                            seen.confirmed = true;
                            *confirms += 1;
                        }
                        _ => {}
                    }
                }
            }
            if t.confirms > confirms_before {
                t.last_confirm_ms = now_ms();
            }
        }
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    subscription.close().await;
    Ok(())
}
