//! Recheck SDK: reliable "publish after commit" on RabbitMQ, with a delayed second check.
//!
//! A service that commits a business row and then publishes a message loses the message if it
//! dies, or the broker is away, between the two. Recheck repairs that without an outbox table:
//!
//! 1. the producer publishes a delayed **CHECK** for the message ([`Producer::prepare`]) before
//!    it commits;
//! 2. it commits its business row, with the message id in it;
//! 3. it publishes the business message ([`Prepared::publish`]);
//! 4. each consumer applies the message's effect once (an [`Inbox`] row in the same transaction)
//!    and publishes a **CONFIRM** ([`ConsumerLoop`]);
//! 5. when the CHECK comes due, the callback service (a binary of this repository) looks for the
//!    confirms; for a message nobody confirmed it calls the producer's `ResendHook` over gRPC
//!    ([`ResendHookService`]), which finds the committed payload and publishes it again, or
//!    answers that the transaction never committed.
//!
//! The wire contract (topology, message formats, the hook, the state machine, the grace window)
//! is `docs/contract.md` in the repository; `recheck/examples/` holds a runnable producer and
//! consumer.
//!
//! # Producer
//!
//! One [`Producer`] per process; [`Producer::prepare`] → commit → [`Prepared::publish`] per
//! business transaction. The producer keeps the message id with its row, and serves the
//! `ResendHook` from one lookup, [`ResendSource::load`]: the callback service is given its
//! address (`--producers orders=http://host:50051`).
//!
//! ```no_run
//! use std::{sync::Arc, time::Duration};
//!
//! use recheck::{
//!     Event, Lookup, Producer, ProducerConfig, Publisher, PublisherConfig, ResendHookService,
//!     ResendSource, Topology, hook::BoxError,
//! };
//! use sqlx::AnyPool;
//! use uuid::Uuid;
//!
//! /// The hook's one question: the payload committed with this message id, if any.
//! struct Orders(AnyPool);
//!
//! impl ResendSource for Orders {
//!     async fn load(&self, message_id: Uuid, _business_key: &str) -> Result<Lookup, BoxError> {
//!         let sql = "SELECT payload FROM orders WHERE message_id = $1";
//!         let row: Option<(String,)> = sqlx::query_as(sql)
//!             .bind(message_id.to_string())
//!             .fetch_optional(&self.0)
//!             .await?;
//!         Ok(row.map_or(Lookup::NotCommitted, |(payload,)| Lookup::Found(payload.into_bytes())))
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let (pool, _) = recheck::db::connect("sqlite://orders.db?mode=rwc").await?;
//!     let ddl = "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, message_id TEXT, payload TEXT)";
//!     sqlx::query(ddl).execute(&pool).await?;
//!     let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
//!     let publisher = Publisher::connect(PublisherConfig::new(url, "orders")).await?;
//!     // The callback service declares the topology too; declaring is idempotent.
//!     let topology = Topology::default();
//!     topology.declare(&publisher.create_channel().await?).await?;
//!     let producer = Producer::new(publisher, topology, ProducerConfig::new("orders"));
//!
//!     // 1. The CHECK is broker-confirmed before anything commits.
//!     let payload = r#"{"order_id":"o-1","amount_cents":1250}"#;
//!     let event = Event {
//!         routing_key: "order.created".into(),
//!         business_key: "o-1".into(),
//!         payload: payload.into(),
//!         expect: Some(vec!["points".into()]),
//!     };
//!     let prepared = producer.prepare(event).await?;
//!     // 2. The business transaction stores the message id with the row.
//!     let mut tx = pool.begin().await?;
//!     sqlx::query("INSERT INTO orders (id, message_id, payload) VALUES ($1, $2, $3)")
//!         .bind("o-1")
//!         .bind(prepared.message_id.to_string())
//!         .bind(payload)
//!         .execute(&mut *tx)
//!         .await?;
//!     // Past its grace (`ProducerConfig::grace`, 10 s) its check may already have found no row.
//!     prepared.ensure_fresh()?;
//!     tx.commit().await?;
//!     // 3. The business message. Were it lost, the CHECK would have it resent.
//!     prepared.publish().await?;
//!
//!     // The hook: a missing row younger than the grace (the same 10 s) may still be committing.
//!     let hook = ResendHookService::new(Arc::new(Orders(pool)), producer, Duration::from_secs(10));
//!     tonic::transport::Server::builder()
//!         .add_service(hook.into_server())
//!         .serve("127.0.0.1:50051".parse()?)
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! # Consumer
//!
//! A consumer writes its business [`Effect`]; a [`ConsumerLoop`] runs it inside the transaction
//! that claims the message id in the [`Inbox`], commits, publishes the CONFIRM through a
//! [`Confirmer`], and acks. A redelivery or a resend of a message already processed is confirmed
//! as a duplicate without running the effect again (a rejected one is confirmed as rejected
//! again).
//!
//! ```no_run
//! use recheck::{
//!     Applied, Confirmer, ConsumerConfig, ConsumerLoop, Effect, GroupCommitConfig, Inbox, Incoming,
//!     Publisher, PublisherConfig, Topology, Transient,
//! };
//! use sqlx::AnyConnection;
//!
//! /// Runs once per message id: the inbox claim commits in the same transaction.
//! struct AwardPoints;
//!
//! impl Effect for AwardPoints {
//!     async fn apply(&self, tx: &mut AnyConnection, msg: &Incoming<'_>) -> Result<Applied, Transient> {
//!         if msg.body.is_empty() {
//!             // Never better on redelivery: confirmed `rejected`, never resent.
//!             return Ok(Applied::Rejected("empty order".into()));
//!         }
//!         sqlx::query("INSERT INTO points (order_id, points) VALUES ($1, 10)")
//!             .bind(&msg.headers.business_key)
//!             .execute(&mut *tx)
//!             .await?; // an Err rolls back: retried in place (a constraint or bad value: parked)
//!         Ok(Applied::Processed)
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let (pool, _) = recheck::db::connect("sqlite://points.db?mode=rwc").await?;
//!     Inbox::migrate(&pool).await?;
//!     let ddl = "CREATE TABLE IF NOT EXISTS points (order_id TEXT, points BIGINT)";
//!     sqlx::query(ddl).execute(&pool).await?;
//!     let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
//!     let publisher = Publisher::connect(PublisherConfig::new(url, "points")).await?;
//!     let topology = Topology::default();
//!     let channel = publisher.create_channel().await?;
//!     topology.declare(&channel).await?;
//!     topology.declare_consumer_queue(&channel, "points.orders", &["order.created"]).await?;
//!
//!     // "points": the name the producer's `expect` lists and the CONFIRMs carry.
//!     let batching = GroupCommitConfig::default();
//!     let confirmer = Confirmer::new(publisher.clone(), topology.clone(), "points", batching);
//!     let config = ConsumerConfig::new("points", "points.orders");
//!     let consumer = ConsumerLoop::new(pool, publisher, topology, confirmer, AwardPoints, config);
//!     // Until SIGTERM or SIGINT; the batch in hand is finished first.
//!     let report = consumer.run(recheck::shutdown::on_signals()?).await?;
//!     println!("{report:?}");
//!     Ok(())
//! }
//! ```
//!
//! # Modules
//!
//! [`wire`], [`security`] and [`telemetry`] at the ground, [`broker`] above them, [`producer`]
//! and [`consumer`] side by side on the broker, [`service`] on top; each folder's page says what
//! it holds. `ARCHITECTURE.md` in the repository is the code map and the invariants. The paths
//! before the folders (`recheck::message`, `recheck::publisher`, `recheck::hook`, …) stay
//! available as re-exports.

#![warn(missing_docs)]

pub mod broker;
pub mod consumer;
pub mod db;
mod error;
pub mod producer;
pub mod retry;
pub mod security;
pub mod service;
pub mod telemetry;
pub mod wire;

// The paths users named before the layers had folders.
pub use broker::{group_commit, parking, publisher, subscription, topology};
pub use consumer::{confirmer, consume, inbox};
pub use producer::hook;
pub use security::{auth, secret, signing, tls};
#[cfg(feature = "service")]
pub use service::ops;
pub use service::shutdown;
pub use telemetry::trace;
pub use wire::message;

pub use broker::{
    group_commit::{GroupCommit, GroupCommitConfig},
    publisher::{Outgoing, Publisher, PublisherConfig},
    subscription::{Subscription, SubscriptionConfig},
    topology::Topology,
};
pub use consumer::{
    confirmer::Confirmer,
    consume::{Applied, ConsumerConfig, ConsumerLoop, Effect, Incoming, Transient},
    inbox::Inbox,
};
pub use error::{Error, Result};
pub use producer::{
    Event, Prepared, Producer, ProducerConfig, ReserveConfig,
    hook::{Lookup, ResendHookService, ResendSource},
};
pub use security::{auth::BearerAuth, secret::SecretUrl};
