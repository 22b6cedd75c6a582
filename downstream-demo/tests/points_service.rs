//! The points service end to end, started in-process on a fresh vhost and a
//! fresh SQLite file: orders published with the SDK earn points once, a
//! duplicate is absorbed, a malformed body is rejected visibly, CONFIRMs reach
//! `recheck.confirms`; with every fault on, each order still ends once; a
//! message lost for this consumer (`--drop-message-rate`) leaves no trace and its
//! resend is processed. Each case runs on SQLite and on PostgreSQL.

use std::{collections::HashMap, time::Duration};

use clap::Parser;
use downstream_demo::{
    Config, Stats, build,
    config::FaultArgs,
    faults::{Faults, blocked},
};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use recheck::{
    Producer, ProducerConfig, Publisher, PublisherConfig, Topology,
    message::{ConfirmBatch, Limits, Outcome},
    topology::parse_tiers,
};
use sqlx::AnyPool;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A running service and what the test drives it with.
struct Harness {
    producer: Producer,
    pool: AnyPool,
    confirms: lapin::Consumer,
    /// The consumer name the service runs under (`--consumer`).
    consumer: String,
    stop: CancellationToken,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

/// Starts the service on a fresh vhost and a fresh SQLite file or PostgreSQL database.
async fn start(postgres: bool, extra: &[&str]) -> Harness {
    recheck_tests::init_tracing();
    let vhost = recheck_tests::kit().await.rabbit.fresh_vhost().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = if postgres {
        recheck_tests::kit().await.postgres.fresh_database().await.unwrap().url
    } else {
        format!("sqlite://{}/points.db?mode=rwc", dir.path().display())
    };
    let mut args = vec!["downstream-demo", "--amqp-url", &vhost.url, "--database-url", &db];
    args.extend(["--delay-tiers", "1s", "--ops-addr", "127.0.0.1:0"]);
    args.extend(extra);
    let mut config = Config::try_parse_from(args).unwrap();
    if extra.is_empty() {
        // A clean run whatever fault variables the environment holds.
        config.faults = Default::default();
    }
    let consumer = config.store.consumer.clone();
    let app = build(config).await.unwrap();
    let pool = app.pool().clone();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run(stop.clone()));

    let publisher = Publisher::connect(PublisherConfig::new(vhost.url.as_str(), "test")).await.unwrap();
    let topology = Topology::new("recheck", parse_tiers("1s").unwrap());
    let channel = publisher.create_channel().await.unwrap();
    let confirms = channel
        .basic_consume(
            topology.confirms_queue().as_str().into(),
            "test".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let producer = Producer::new(publisher, topology, ProducerConfig::new("orders"));
    Harness { producer, pool, confirms, consumer, stop, running, _dir: dir }
}

impl Harness {
    async fn order(&self, id: Uuid, n: usize, attempt: u32) {
        let body = format!(r#"{{"order_id":"o-{n}","customer":"c-{}","amount_cents":{}}}"#, n % 3, 1000 + n);
        self.producer
            .publish_business(id, "order.created", &format!("o-{n}"), body.as_bytes(), attempt)
            .await
            .unwrap();
    }

    /// Reads CONFIRMs into `seen` (id → outcomes, detail) until `done` holds.
    async fn confirms_until(&mut self, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(seen) {
            let next = timeout_at(deadline, self.confirms.next()).await.expect("CONFIRMs stopped coming");
            record(next.unwrap().unwrap(), &self.consumer, seen).await;
        }
    }

    /// Reads CONFIRMs into `seen` until none came for `quiet`.
    async fn confirms_until_quiet(&mut self, seen: &mut Seen, quiet: Duration) {
        while let Ok(next) = tokio::time::timeout(quiet, self.confirms.next()).await {
            record(next.unwrap().unwrap(), &self.consumer, seen).await;
        }
    }

    async fn stats_when(&self, done: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stats = Stats::load(&self.pool, &self.consumer).await.unwrap();
            if done(&stats) {
                return stats;
            }
            assert!(Instant::now() < deadline, "timed out; last stats: {stats:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.running.await.unwrap().unwrap();
    }
}

/// What CONFIRMs said, per message id: outcomes in arrival order, with details.
type Seen = HashMap<Uuid, Vec<(Outcome, Option<String>)>>;

async fn record(d: lapin::message::Delivery, consumer: &str, seen: &mut Seen) {
    d.acker.ack(BasicAckOptions::default()).await.unwrap();
    let batch = ConfirmBatch::decode(&d.data, None, Limits::default()).unwrap();
    assert_eq!(batch.consumer, consumer);
    for c in batch.confirms {
        seen.entry(c.message_id).or_default().push((c.outcome, c.detail));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awards_points_once_absorbs_a_duplicate_and_confirms() {
    for postgres in [false, true] {
        awards_points_once(postgres).await;
    }
}

async fn awards_points_once(postgres: bool) {
    let mut h = start(postgres, &[]).await;
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for (n, id) in ids.iter().enumerate() {
        h.order(*id, n, 0).await;
    }
    // Valid Recheck headers, unreadable body: a business rejection, not a crash.
    let malformed = Uuid::now_v7();
    h.producer.publish_business(malformed, "order.created", "o-x", b"not json", 0).await.unwrap();

    let mut seen = Seen::new();
    h.confirms_until(&mut seen, |s| s.len() == 21).await;
    for id in &ids {
        assert_eq!(seen[id], [(Outcome::Processed, None)]);
    }
    let (outcome, detail) = &seen[&malformed][0];
    assert_eq!(*outcome, Outcome::Rejected);
    assert!(detail.as_deref().unwrap().starts_with("malformed order: "), "{detail:?}");

    // A resend of an order already awarded (as after a lost CONFIRM).
    h.order(ids[0], 0, 1).await;
    h.confirms_until(&mut seen, |s| s[&ids[0]].len() == 2).await;
    assert_eq!(seen[&ids[0]][1], (Outcome::Duplicate, None));

    let stats = h.stats_when(|s| s.duplicates_absorbed == 1).await;
    let points: i64 = (0..20).map(|n| (1000 + n) / 100).sum();
    assert_eq!(
        (stats.orders_with_points, stats.points_awarded, stats.messages, stats.rejected),
        (20, points, 21, 1)
    );
    // Each application moved one balance once; the duplicate moved nothing.
    assert_eq!((stats.effects_applied, stats.balance_points, stats.balance_orders), (20, points, 20));
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM points").fetch_all(&h.pool).await.unwrap();
    let mut expected: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let mut rows = rows;
    rows.sort();
    expected.sort();
    assert_eq!(rows, expected);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_fault_on_each_order_ends_once() {
    for postgres in [false, true] {
        faults_end_once(postgres).await;
    }
}

async fn faults_end_once(postgres: bool) {
    let rates = ["--fail-rate", "0.3", "--reject-rate", "0.25", "--drop-confirm-rate", "0.3"];
    let mut args = rates.to_vec();
    args.extend(["--slow-ms", "2", "--seed", "1", "--batch-size", "8"]);
    let mut h = start(postgres, &args).await;
    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
    for (n, id) in ids.iter().enumerate() {
        h.order(*id, n, 0).await;
    }
    let blocked_ids: Vec<&Uuid> = ids.iter().filter(|id| blocked(**id, 0.25)).collect();

    // Failed transactions are redelivered until they commit; lost CONFIRMs are
    // not resent here (no callback service), so count from the store.
    let stats = h.stats_when(|s| s.messages == 40).await;
    assert_eq!(stats.rejected, blocked_ids.len() as i64);
    assert_eq!(stats.orders_with_points, 40 - blocked_ids.len() as i64);
    assert_eq!(stats.duplicates_absorbed, 0, "a rolled-back attempt must leave no trace");

    // Whatever CONFIRMs did arrive agree with the id-based reject decision.
    let mut seen = Seen::new();
    h.confirms_until_quiet(&mut seen, Duration::from_secs(1)).await;
    assert!(!seen.is_empty() && seen.len() < 40, "about 30% of CONFIRMs are dropped: {}", seen.len());
    for (id, outcomes) in &seen {
        let want = if blocked(*id, 0.25) { Outcome::Rejected } else { Outcome::Processed };
        assert!(outcomes.iter().all(|(o, _)| *o == want), "{id}: {outcomes:?}");
    }

    // A resend of a blocked order is rejected again, never awarded.
    if let Some(id) = blocked_ids.first() {
        let n = ids.iter().position(|i| i == *id).unwrap();
        h.order(**id, n, 1).await;
        let stats = h.stats_when(|s| s.duplicates_absorbed == 1).await;
        assert_eq!(stats.orders_with_points, 40 - blocked_ids.len() as i64);
    }
    h.stop().await;
}

/// A second instance under another name, queue and store: its CONFIRMs carry its name, and a
/// message lost for it (`--drop-message-rate`) leaves no inbox row, no effect and no CONFIRM,
/// while the resend of the same id is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_message_leaves_no_trace_and_its_resend_is_processed() {
    for postgres in [false, true] {
        lost_then_resent(postgres).await;
    }
}

async fn lost_then_resent(postgres: bool) {
    let args = ["--consumer", "shipping", "--queue", "shipping.order-created"];
    let mut h = start(postgres, &[&args[..], &["--drop-message-rate", "0.3", "--seed", "5"]].concat()).await;
    let dice = Faults::new(&FaultArgs { drop_message_rate: 0.3, seed: Some(5), ..Default::default() });
    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
    for (n, id) in ids.iter().enumerate() {
        h.order(*id, n, 0).await;
    }
    let lost: Vec<usize> = (0..ids.len()).filter(|n| dice.drop_message(ids[*n], 0)).collect();
    assert!(!lost.is_empty() && lost.len() < 30, "the dice dropped {} of 40", lost.len());
    let kept = 40 - lost.len();

    let mut seen = Seen::new();
    h.confirms_until(&mut seen, |s| s.len() == kept).await;
    // Nothing more comes: the lost ones were acked unseen.
    h.confirms_until_quiet(&mut seen, Duration::from_millis(500)).await;
    assert_eq!(seen.len(), kept);
    assert!(lost.iter().all(|n| !seen.contains_key(&ids[*n])));
    let stats = h.stats_when(|s| s.messages == kept as i64).await;
    assert_eq!((stats.orders_with_points, stats.balance_orders), (kept as i64, kept as i64));

    // The resends (attempt 1) get through and are processed, not absorbed as duplicates.
    for n in &lost {
        h.order(ids[*n], *n, 1).await;
    }
    h.confirms_until(&mut seen, |s| s.len() == 40).await;
    assert!(lost.iter().all(|n| seen[&ids[*n]] == [(Outcome::Processed, None)]));
    let stats = h.stats_when(|s| s.messages == 40).await;
    assert_eq!((stats.consumer.as_str(), stats.effects_applied, stats.balance_orders), ("shipping", 40, 40));
    assert_eq!(stats.duplicates_absorbed, 0);
    h.stop().await;
}

/// Its queue gone under it (deleted by an operator, a policy, a broker reset): the consumer loop
/// cannot subscribe, and the service ends with the reason instead of staying up, ready, reading
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumer_loop_stops_the_service_with_its_reason() {
    recheck_tests::init_tracing();
    let vhost = recheck_tests::kit().await.rabbit.fresh_vhost().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/points.db?mode=rwc", dir.path().display());
    let args =
        ["downstream-demo", "--amqp-url", &vhost.url, "--database-url", &db, "--ops-addr", "127.0.0.1:0"];
    let mut config = Config::try_parse_from(args).unwrap();
    config.faults = Default::default();
    let queue = config.queue.clone();
    let app = build(config).await.unwrap();
    let publisher = Publisher::connect(PublisherConfig::new(vhost.url.as_str(), "test")).await.unwrap();
    let channel = publisher.create_channel().await.unwrap();
    channel.queue_delete(queue.as_str().into(), Default::default()).await.unwrap();

    let ended = tokio::time::timeout(Duration::from_secs(30), app.run(CancellationToken::new())).await;
    let err = ended.expect("the service kept running without its consumer loop").unwrap_err();
    assert!(err.to_string().contains("consuming failed"), "{err:#}");
}
