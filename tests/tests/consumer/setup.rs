//! What the consumer suites share: the `Points` effect (with failures on demand), a consumer on
//! a fresh vhost and store, its CONFIRMs, and one batch handed to `handle_batch`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use lapin::message::Delivery;
use recheck::{
    Applied, Confirmer, ConsumerConfig, ConsumerLoop, Effect, GroupCommitConfig, Inbox, Incoming, Producer,
    ProducerConfig, Subscription, SubscriptionConfig, Transient,
    message::{ConfirmBatch, Limits, Outcome},
};
use sqlx::AnyConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::{self, Drain, Store, fresh_broker, wait_for};

/// Awards points: one row per order. Rejects `bad-*` orders; a `flaky-*` order's call fails
/// while `failures` lasts (one failure used up per call).
pub struct Points {
    pub failures: Arc<AtomicUsize>,
}

impl Points {
    pub fn failing(times: usize) -> Self {
        Self { failures: Arc::new(AtomicUsize::new(times)) }
    }
}

impl Effect for Points {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Incoming<'_>) -> Result<Applied, Transient> {
        let key = &msg.headers.business_key;
        if key.starts_with("bad-") {
            return Ok(Applied::Rejected(format!("no customer for {key}")));
        }
        if key.starts_with("flaky-")
            && self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
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

pub async fn points_rows(store: &Store, key: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM points WHERE business_key = $1")
        .bind(key)
        .fetch_one(&store.pool)
        .await
        .unwrap()
}

/// One call of the effect: the business key, the broker's `redelivered` flag, when.
#[derive(Debug, Clone)]
pub struct Call {
    pub key: String,
    pub redelivered: bool,
    pub at: Instant,
}

/// [`Points`] that also records its calls (a rolled-back call too).
pub struct CountedPoints {
    pub points: Points,
    pub calls: Arc<Mutex<Vec<Call>>>,
}

impl CountedPoints {
    pub fn new(points: Points) -> (Self, Arc<Mutex<Vec<Call>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        (Self { points, calls: calls.clone() }, calls)
    }
}

impl Effect for CountedPoints {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Incoming<'_>) -> Result<Applied, Transient> {
        let call =
            Call { key: msg.headers.business_key.clone(), redelivered: msg.redelivered, at: Instant::now() };
        self.calls.lock().unwrap().push(call);
        self.points.apply(tx, msg).await
    }
}

/// How many calls of `key` `calls` holds.
pub fn calls_of(calls: &Mutex<Vec<Call>>, key: &str) -> usize {
    calls.lock().unwrap().iter().filter(|c| c.key == key).count()
}

/// A fresh vhost, the consumer's queue and `points` table on `store`, a producer, and the points
/// consumer on `queue` (not started).
pub struct PointsSetup<E> {
    pub _vhost: recheck_tests::Vhost,
    pub publisher: recheck::Publisher,
    pub topology: recheck::Topology,
    pub channel: lapin::Channel,
    pub producer: Producer,
    pub consumer: ConsumerLoop<E>,
    pub queue: &'static str,
}

impl<E: Effect> PointsSetup<E> {
    pub async fn new(store: &Store, queue: &'static str, effect: E) -> Self {
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
        Self { _vhost, publisher, topology, channel, producer, consumer, queue }
    }

    /// Publishes `messages` (id, business key, body), waits until `queued` are ready, and takes
    /// them as one batch from a subscription of their own (closed by the caller).
    pub async fn queued_batch(
        &self,
        messages: &[(Uuid, &str, &[u8])],
        queued: u32,
    ) -> (Subscription, Vec<Delivery>) {
        for (id, key, body) in messages {
            self.producer.publish_business(*id, "order.created", key, body, 0).await.unwrap();
        }
        let queue = self.queue;
        wait_for("a full queue", Duration::from_secs(10), || {
            let channel = self.channel.clone();
            async move { (common::depth(&channel, queue).await == queued).then_some(()) }
        })
        .await;
        let config = SubscriptionConfig {
            prefetch: 256,
            batch_size: queued as usize,
            batch_linger: Duration::from_secs(5),
            ..SubscriptionConfig::new(queue, "batch-test")
        };
        let mut subscription = Subscription::new(self.publisher.clone(), config).await.unwrap();
        let deliveries = subscription.next_batch(&CancellationToken::new()).await.unwrap().unwrap();
        assert_eq!(deliveries.len(), queued as usize, "one batch");
        (subscription, deliveries)
    }
}

/// The CONFIRMs' outcomes, by message id, in arrival order.
pub type Outcomes = HashMap<Uuid, Vec<(Outcome, Option<String>)>>;

/// Reads CONFIRMs into `outcomes` until `done` holds (20 s at most between two).
pub async fn confirms_until(confirms: &mut Drain, outcomes: &mut Outcomes, done: impl Fn(&Outcomes) -> bool) {
    while !done(outcomes) {
        let d = confirms.next(Duration::from_secs(20)).await;
        read_confirms(&d, outcomes);
    }
}

/// Reads every CONFIRM that comes until none has for `quiet`.
pub async fn confirms_until_quiet(confirms: &mut Drain, quiet: Duration) -> Outcomes {
    let mut outcomes = Outcomes::new();
    while let Some(d) = confirms.try_next(quiet).await {
        read_confirms(&d, &mut outcomes);
    }
    outcomes
}

fn read_confirms(d: &Delivery, outcomes: &mut Outcomes) {
    let batch = ConfirmBatch::decode(&d.data, None, Limits::default()).unwrap();
    assert_eq!(batch.consumer, "points");
    for c in batch.confirms {
        outcomes.entry(c.message_id).or_default().push((c.outcome, c.detail));
    }
}
