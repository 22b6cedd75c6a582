//! The consumer step against a real broker, on SQLite and on PostgreSQL:
//! a redelivered duplicate is absorbed (effect once, confirms `processed` then
//! `duplicate`), a rejection is confirmed as such, a transient failure is
//! redelivered and applied once, and a malformed message is parked with a reason. Batch by
//! batch (`handle_batch`): the same id twice in one batch, a transient failure in the middle
//! of a batch (the rest committed once), duplicates of a rejection re-confirmed `rejected`.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Drain, Store, fresh_broker, fresh_stores, wait_for};
use lapin::types::AMQPValue;
use recheck::{
    Applied, Confirmer, ConsumerConfig, ConsumerLoop, Effect, GroupCommitConfig, Inbox, Incoming, Producer,
    ProducerConfig, Subscription, SubscriptionConfig, Transient,
    consume::BatchReport,
    message::{ConfirmBatch, HEADER_PARK_REASON, Limits, Outcome},
};
use sqlx::AnyConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Awards points: one row per order. Rejects `bad-*` orders, fails `flaky-*` once.
struct Points {
    flaky_failures: AtomicUsize,
}

impl Effect for Points {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Incoming<'_>) -> Result<Applied, Transient> {
        let key = &msg.headers.business_key;
        if key.starts_with("bad-") {
            return Ok(Applied::Rejected(format!("no customer for {key}")));
        }
        if key.starts_with("flaky-") && self.flaky_failures.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err("points ledger timed out".into());
        }
        sqlx::query("INSERT INTO points (message_id, business_key) VALUES ($1, $2)")
            .bind(msg.headers.message_id.to_string())
            .bind(key.as_str())
            .execute(&mut *tx)
            .await?;
        Ok(Applied::Processed)
    }
}

async fn points_rows(store: &Store, key: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM points WHERE business_key = $1")
        .bind(key)
        .fetch_one(&store.pool)
        .await
        .unwrap()
}

/// A fresh vhost, the consumer's queue and `points` table on `store`, a producer, and the points
/// consumer on `queue` (not started).
struct PointsSetup<E> {
    _vhost: recheck_tests::Vhost,
    publisher: recheck::Publisher,
    topology: recheck::Topology,
    channel: lapin::Channel,
    producer: Producer,
    consumer: ConsumerLoop<E>,
}

impl<E: Effect> PointsSetup<E> {
    async fn new(store: &Store, queue: &str, effect: E) -> Self {
        let (_vhost, publisher, topology) = fresh_broker().await;
        let channel = publisher.create_channel().await.unwrap();
        topology.declare_consumer_queue(&channel, queue, &["order.created"]).await.unwrap();
        Inbox::migrate(&store.pool).await.unwrap();
        sqlx::query("CREATE TABLE points (message_id TEXT PRIMARY KEY, business_key TEXT NOT NULL)")
            .execute(&store.pool)
            .await
            .unwrap();
        let producer = Producer::new(publisher.clone(), topology.clone(), ProducerConfig::new("orders"));
        let confirmer =
            Confirmer::new(publisher.clone(), topology.clone(), "points", GroupCommitConfig::default());
        let consumer = ConsumerLoop::new(
            store.pool.clone(),
            publisher.clone(),
            topology.clone(),
            confirmer,
            effect,
            ConsumerConfig::new("points", queue),
        );
        Self { _vhost, publisher, topology, channel, producer, consumer }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_rejections_failures_and_poison_on_both_stores() {
    for store in fresh_stores().await {
        run_consumer_cases(&store).await;
    }
}

async fn run_consumer_cases(store: &Store) {
    let label = store.label;
    let effect = Points { flaky_failures: AtomicUsize::new(0) };
    let PointsSetup { _vhost, publisher, topology, channel, producer, consumer } =
        PointsSetup::new(store, "points.orders", effect).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));

    // Collects confirms until `done` holds for what was seen.
    let mut confirms = Drain::new(&channel, &topology.confirms_queue()).await;
    let mut outcomes: Vec<(Uuid, Outcome, Option<String>)> = Vec::new();
    async fn until(
        confirms: &mut Drain,
        outcomes: &mut Vec<(Uuid, Outcome, Option<String>)>,
        done: impl Fn(&[(Uuid, Outcome, Option<String>)]) -> bool,
    ) {
        while !done(outcomes) {
            let d = confirms.next(Duration::from_secs(20)).await;
            let batch = ConfirmBatch::decode(&d.data, None, Limits::default()).unwrap();
            assert_eq!(batch.consumer, "points");
            outcomes.extend(batch.confirms.into_iter().map(|c| (c.message_id, c.outcome, c.detail)));
        }
    }

    // A message, then the same message id again once it was confirmed (a resend after a lost confirm).
    let dup = Uuid::now_v7();
    producer.publish_business(dup, "order.created", "o-dup", b"{}", 0).await.unwrap();
    until(&mut confirms, &mut outcomes, |o| o.iter().any(|c| c.0 == dup)).await;
    producer.publish_business(dup, "order.created", "o-dup", b"{}", 1).await.unwrap();
    until(&mut confirms, &mut outcomes, |o| o.iter().filter(|c| c.0 == dup).count() == 2).await;

    // A rejection, a flaky one, and a poison message (no message id, no headers).
    let bad = Uuid::now_v7();
    producer.publish_business(bad, "order.created", "bad-1", b"{}", 0).await.unwrap();
    let flaky = Uuid::now_v7();
    producer.publish_business(flaky, "order.created", "flaky-1", b"{}", 0).await.unwrap();
    publisher
        .publish(recheck::Outgoing {
            exchange: &topology.events_exchange(),
            routing_key: "order.created",
            body: b"garbage",
            properties: lapin::BasicProperties::default(),
        })
        .await
        .unwrap();
    until(&mut confirms, &mut outcomes, |o| o.iter().any(|c| c.0 == bad) && o.iter().any(|c| c.0 == flaky))
        .await;
    let of = |id: Uuid| outcomes.iter().filter(|c| c.0 == id).map(|c| c.1).collect::<Vec<_>>();
    assert_eq!(of(dup), [Outcome::Processed, Outcome::Duplicate], "{label}");
    assert_eq!(of(bad), [Outcome::Rejected], "{label}");
    assert!(outcomes.iter().any(|c| c.0 == bad && c.2.as_deref() == Some("no customer for bad-1")));
    assert_eq!(of(flaky), [Outcome::Processed], "{label}");
    assert_eq!(points_rows(store, "o-dup").await, 1, "{label}: duplicate applied twice");
    assert_eq!(points_rows(store, "flaky-1").await, 1, "{label}: flaky message lost or doubled");
    assert_eq!(points_rows(store, "bad-1").await, 0, "{label}: rejected message applied");
    // The inbox counts what it absorbed; the rolled-back flaky attempt left no trace.
    assert_eq!(Inbox::new("points").counts(&store.pool).await.unwrap(), (3, 1), "{label}");

    // The poison message is parked with a reason, and the consumer's queue is empty.
    let parked = Drain::new(&channel, &topology.parking_queue()).await.next(Duration::from_secs(10)).await;
    assert_eq!(parked.data, b"garbage");
    let reason =
        parked.properties.headers().as_ref().and_then(|h| h.inner().get(HEADER_PARK_REASON).cloned());
    assert!(
        matches!(&reason, Some(AMQPValue::LongString(s)) if String::from_utf8_lossy(s.as_bytes()).contains("message_id")),
        "{label}: reason {reason:?}"
    );
    wait_for("an empty consumer queue", Duration::from_secs(10), || {
        let channel = channel.clone();
        async move { (common::depth(&channel, "points.orders").await == 0).then_some(()) }
    })
    .await;

    stop.cancel();
    let report = running.await.unwrap().unwrap();
    assert_eq!(
        (report.processed, report.duplicates, report.rejected, report.parked),
        (2, 1, 1, 1),
        "{label}"
    );
    assert_eq!(report.retried, 1, "{label}");
}

/// [`Points`] that also counts its calls per business key (a rolled-back call counts too).
struct CountedPoints {
    points: Points,
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl Effect for CountedPoints {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Incoming<'_>) -> Result<Applied, Transient> {
        *self.calls.lock().unwrap().entry(msg.headers.business_key.clone()).or_default() += 1;
        self.points.apply(tx, msg).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_twins_failures_and_rejections_on_both_stores() {
    for store in fresh_stores().await {
        run_batch_cases(&store).await;
    }
}

async fn run_batch_cases(store: &Store) {
    let label = store.label;
    let queue = "points.batches";
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let effect =
        CountedPoints { points: Points { flaky_failures: AtomicUsize::new(0) }, calls: calls.clone() };
    let PointsSetup { _vhost, publisher, topology, channel, producer, consumer } =
        PointsSetup::new(store, queue, effect).await;
    let mut confirms = Drain::new(&channel, &topology.confirms_queue()).await;

    // Publishes `messages`, waits until all are queued, then hands them to one `handle_batch`:
    // its report and its CONFIRMs (one outcome per id, as a CONFIRM carries an id once).
    let mut batch = async |messages: &[(Uuid, &str)], queued: u32| {
        for (id, key) in messages {
            producer.publish_business(*id, "order.created", key, b"{}", 0).await.unwrap();
        }
        wait_for("a full queue", Duration::from_secs(10), || {
            let channel = channel.clone();
            async move { (common::depth(&channel, queue).await == queued).then_some(()) }
        })
        .await;
        let config = SubscriptionConfig {
            prefetch: 64,
            batch_size: queued as usize,
            batch_linger: Duration::from_secs(5),
            ..SubscriptionConfig::new(queue, "batch-test")
        };
        let mut subscription = Subscription::new(publisher.clone(), config).await.unwrap();
        let deliveries = subscription.next_batch(&CancellationToken::new()).await.unwrap().unwrap();
        assert_eq!(deliveries.len(), queued as usize, "{label}: one batch");
        let report = consumer.handle_batch(deliveries, &CancellationToken::new()).await.unwrap();
        subscription.close().await;
        let mut outcomes = HashMap::new();
        while let Some(d) = confirms.try_next(Duration::from_millis(500)).await {
            let batch = ConfirmBatch::decode(&d.data, None, Limits::default()).unwrap();
            for c in batch.confirms {
                assert!(outcomes.insert(c.message_id, (c.outcome, c.detail)).is_none(), "{label}: id twice");
            }
        }
        (report, outcomes)
    };
    let expect = |processed, duplicates, rejected, retried| BatchReport {
        processed,
        duplicates,
        rejected,
        parked: 0,
        retried,
    };
    let rejected = |key: &str| (Outcome::Rejected, Some(format!("no customer for {key}")));
    let [x, twin, bad] = [(); 3].map(|_| Uuid::now_v7());

    // The fast path: the same id twice (applied once), a rejection twice (re-confirmed `rejected`).
    let (got, outcomes) =
        batch(&[(x, "x"), (twin, "twin"), (twin, "twin"), (bad, "bad-1"), (bad, "bad-1")], 5).await;
    assert_eq!(got, expect(2, 2, 1, 0), "{label}");
    assert_eq!(outcomes[&x], (Outcome::Processed, None), "{label}");
    assert_eq!(outcomes[&twin], (Outcome::Processed, None), "{label}");
    assert_eq!(outcomes[&bad], rejected("bad-1"), "{label}");
    assert_eq!(outcomes.len(), 3, "{label}");

    // A transient failure in the middle: the batch is redone without it, the rest commit once.
    let [o1, twin2, flaky, o2] = [(); 4].map(|_| Uuid::now_v7());
    let messages = [(o1, "o1"), (twin2, "twin2"), (flaky, "flaky-1"), (twin2, "twin2"), (o2, "o2")];
    let (got, outcomes) = batch(&messages, 5).await;
    assert_eq!(got, expect(3, 1, 0, 1), "{label}");
    for id in [o1, twin2, o2] {
        assert_eq!(outcomes[&id], (Outcome::Processed, None), "{label}");
    }
    assert_eq!(outcomes.len(), 3, "{label}: the failed message is not confirmed");
    for key in ["o1", "twin2", "o2"] {
        assert_eq!(points_rows(store, key).await, 1, "{label}: {key}");
    }
    assert_eq!(points_rows(store, "flaky-1").await, 0, "{label}: the failure rolled back");
    {
        let calls = calls.lock().unwrap();
        // Before the failure: applied, rolled back, applied again; after it: applied once.
        assert_eq!((calls["o1"], calls["twin2"], calls["flaky-1"], calls["o2"]), (2, 2, 1, 1), "{label}");
    }

    // The failed one comes back (and is processed) beside duplicates of earlier batches.
    let (got, outcomes) = batch(&[(bad, "bad-1"), (bad, "bad-1"), (x, "x")], 4).await;
    assert_eq!(got, expect(1, 3, 0, 0), "{label}");
    assert_eq!(outcomes[&flaky], (Outcome::Processed, None), "{label}");
    assert_eq!(outcomes[&bad], rejected("bad-1"), "{label}: a rejection's duplicate");
    assert_eq!(outcomes[&x], (Outcome::Duplicate, None), "{label}");
    assert_eq!(points_rows(store, "flaky-1").await, 1, "{label}");
    assert_eq!(points_rows(store, "bad-1").await, 0, "{label}");
    assert_eq!(Inbox::new("points").counts(&store.pool).await.unwrap(), (7, 6), "{label}");
    assert_eq!(common::depth(&channel, queue).await, 0, "{label}");
}
