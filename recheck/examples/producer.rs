//! A producer on the Recheck SDK. Each order is prepared (its CHECK broker-confirmed), committed
//! in the producer's own `orders` table with its message id, then published; the `ResendHook`
//! then answers the callback service from that table until Ctrl-C.
//!
//! ```sh
//! RECHECK_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//! DATABASE_URL=sqlite:///tmp/orders.db?mode=rwc \
//! cargo run -p recheck --example producer -- 3
//! ```
//!
//! - `RECHECK_AMQP_URL`: the broker (default: local, as guest).
//! - `DATABASE_URL`: `sqlite:…` or `postgres:…` (default: a SQLite file in the temp directory).
//! - `RECHECK_HOOK_ADDR`: where the `ResendHook` listens (default `127.0.0.1:50061`).
//! - The argument: how many orders (default 3).
//!
//! The callback service must be running and know the hook:
//! `callback-service --producers orders=http://127.0.0.1:50061`. Each order expects a CONFIRM from
//! the consumer `points` (`cargo run -p recheck --example consumer`); start that first, as it
//! declares the queue the orders are routed to (until then they are unroutable). An order nobody
//! confirms within its check delay (30 s) is resent through the hook.

use std::{env, sync::Arc, time::Duration};

use recheck::{
    Event, Lookup, Producer, ProducerConfig, Publisher, PublisherConfig, ResendHookService, ResendSource,
    Topology, hook::BoxError,
};
use sqlx::AnyPool;
use tonic::transport::Server;
use tracing_subscriber::EnvFilter;
use uuid::Uuid;

/// The producer's own table. Each order keeps its message id: that is what the hook looks up.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, message_id TEXT, payload TEXT)";

/// The hook's one question: the payload committed with this message id, if any.
struct Orders(AnyPool);

impl ResendSource for Orders {
    async fn load(&self, id: Uuid, _business_key: &str) -> Result<Lookup, BoxError> {
        let sql = "SELECT payload FROM orders WHERE message_id = $1";
        let p: Option<String> = sqlx::query_scalar(sql).bind(id.to_string()).fetch_optional(&self.0).await?;
        Ok(p.map_or(Lookup::NotCommitted, |payload| Lookup::Found(payload.into_bytes())))
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The SDK's log lines: connections, and each `Resend` the hook answers.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let amqp_url = env_or("RECHECK_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let sqlite = format!("sqlite://{}?mode=rwc", env::temp_dir().join("recheck-orders.db").display());
    let database_url = env_or("DATABASE_URL", &sqlite);
    let addr = env_or("RECHECK_HOOK_ADDR", "127.0.0.1:50061").parse()?;
    let count: usize = env::args().nth(1).map_or(Ok(3), |n| n.parse())?;

    let (pool, _) = recheck::db::connect(&database_url).await?;
    sqlx::query(SCHEMA).execute(&pool).await?;
    let publisher = Publisher::connect(PublisherConfig::new(amqp_url, "example-producer")).await?;
    // The callback service declares the same topology at start; declaring is idempotent.
    Topology::default().declare(&publisher.create_channel().await?).await?;
    // Each order is checked after the default check delay, 30 s.
    let producer = Producer::new(publisher.clone(), Topology::default(), ProducerConfig::new("orders"));

    // The hook, up before the first check comes due. A missing order younger than the grace
    // (10 s, as `ProducerConfig::grace`) may still be committing: the callback service is told to
    // ask again later.
    let orders = Arc::new(Orders(pool.clone()));
    let hook = ResendHookService::new(orders, producer.clone(), Duration::from_secs(10)).into_server();
    let stop = recheck::shutdown::on_signals()?.cancelled_owned();
    let serving = tokio::spawn(Server::builder().add_service(hook).serve_with_shutdown(addr, stop));

    for _ in 0..count {
        let id = Uuid::now_v7().to_string();
        let payload = format!(r#"{{"order_id":"{id}","customer":"ada","amount_cents":1250}}"#);
        let event = Event {
            routing_key: "order.created".into(),
            business_key: id.clone(),
            payload: payload.clone().into_bytes(),
            expect: Some(vec!["points".into()]),
        };
        // 1. The CHECK is durable before anything commits: a crash from here on is repaired.
        let prepared = producer.prepare(event).await?;
        // 2. The business transaction stores the message id with the order.
        let (mut tx, message_id) = (pool.begin().await?, prepared.message_id.to_string());
        let insert = sqlx::query("INSERT INTO orders VALUES ($1, $2, $3)").bind(&id).bind(&message_id);
        insert.bind(&payload).execute(&mut *tx).await?;
        prepared.ensure_fresh()?; // past its grace: roll back (dropping `tx`) instead
        tx.commit().await?;
        println!("order {id} committed, message {message_id}");
        // 3. The business message. A failure is no loss: the CHECK has it resent.
        prepared.publish().await.unwrap_or_else(|e| eprintln!("publish failed: {e}; the CHECK resends it"));
    }
    println!("serving the ResendHook on {addr} until Ctrl-C");
    // Dropping the publisher at exit closes the broker connection.
    Ok(serving.await??)
}

/// An environment variable, or `default` when it is unset.
fn env_or(name: &str, default: &str) -> String {
    env::var(name).unwrap_or_else(|_| default.to_owned())
}
