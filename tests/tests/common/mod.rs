//! Helpers shared by the SDK suites: stores, a connected publisher, waiting on
//! conditions with a deadline, and draining a queue.
#![allow(dead_code)] // each suite uses a different part

use std::{future::Future, time::Duration};

use futures_util::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use recheck::{Publisher, PublisherConfig, Topology, topology::parse_tiers};
use sqlx::AnyPool;
use tokio::time::{Instant, timeout_at};

/// A store the SDK runs against, with what keeps it alive.
pub struct Store {
    pub label: &'static str,
    pub pool: AnyPool,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh SQLite file and a fresh PostgreSQL database: every store test runs on both.
pub async fn fresh_stores() -> Vec<Store> {
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}/test.db?mode=rwc", dir.path().display());
    let sqlite = AnyPool::connect(&sqlite_url).await.unwrap();
    sqlx::query("PRAGMA journal_mode=WAL").execute(&sqlite).await.unwrap();
    let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
    let postgres = AnyPool::connect(&db.url).await.unwrap();
    vec![
        Store { label: "sqlite", pool: sqlite, _dir: Some(dir) },
        Store { label: "postgres", pool: postgres, _dir: None },
    ]
}

/// A fresh vhost with the whole topology declared (tiers of 1 s and 3 s).
pub async fn fresh_broker() -> (recheck_tests::Vhost, Publisher, Topology) {
    recheck_tests::init_tracing();
    let vhost = recheck_tests::kit().await.rabbit.fresh_vhost().await.unwrap();
    let publisher = Publisher::connect(PublisherConfig::new(vhost.as_str(), "sdk-test")).await.unwrap();
    let topology = Topology::new("recheck", parse_tiers("1s,3s").unwrap());
    let channel = publisher.create_channel().await.unwrap();
    topology.declare(&channel).await.unwrap();
    (vhost, publisher, topology)
}

/// Polls `probe` until it returns `Some`, failing the test at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One consumer on a queue; every message it hands out is acked.
pub struct Drain {
    queue: String,
    consumer: lapin::Consumer,
}

impl Drain {
    pub async fn new(channel: &Channel, queue: &str) -> Self {
        channel.basic_qos(1000, BasicQosOptions::default()).await.unwrap();
        let consumer = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        Self { queue: queue.to_owned(), consumer }
    }

    /// The next message, failing the test if none comes within `within`.
    pub async fn next(&mut self, within: Duration) -> Delivery {
        let next = timeout_at(Instant::now() + within, self.consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no message on {} within {within:?}", self.queue));
        let delivery = next.expect("consumer ended").expect("delivery");
        delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        delivery
    }

    /// The next message if one comes within `within`.
    pub async fn try_next(&mut self, within: Duration) -> Option<Delivery> {
        let next = timeout_at(Instant::now() + within, self.consumer.next()).await.ok()?;
        let delivery = next.expect("consumer ended").expect("delivery");
        delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        Some(delivery)
    }

    /// Exactly `n` messages, all within `within`.
    pub async fn take(&mut self, n: usize, within: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + within;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "got {} of {n} messages from {} within {within:?}",
                got.len(),
                self.queue
            );
            got.push(self.next(left).await);
        }
        got
    }
}

/// Messages ready in `queue` right now (passive declare).
pub async fn depth(channel: &Channel, queue: &str) -> u32 {
    let options = lapin::options::QueueDeclareOptions::durable().passive();
    channel.queue_declare(queue.into(), options, FieldTable::default()).await.unwrap().message_count()
}

/// Runs a scenario once on SQLite and once on PostgreSQL, as two tests (`super::NAME(&url)`).
#[allow(unused_macros)] // each suite that uses it brings `#[macro_use] mod common;`
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}/callback.db?mode=rwc", dir.path().display());
                super::$name(&url).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
                super::$name(&db.url).await;
            })*
        }
    };
}
