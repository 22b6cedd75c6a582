//! A consumer on the Recheck SDK: awards points once per `order.created` message, in the
//! transaction that claims the message id in the inbox, then confirms it. Runs until Ctrl-C.
//!
//! ```sh
//! RECHECK_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//! DATABASE_URL=sqlite:///tmp/points.db?mode=rwc \
//! cargo run -p recheck --example consumer
//! ```
//!
//! - `RECHECK_AMQP_URL`: the broker (default: local, as guest).
//! - `DATABASE_URL`: `sqlite:…` or `postgres:…` (default: a SQLite file in the temp directory).
//!
//! Start the callback service first: it declares the topology this consumer's queue binds to.
//! The consumer's name, `points`, is the one the example producer's orders expect.

use std::env;

use recheck::{
    Applied, Confirmer, ConsumerConfig, ConsumerLoop, Effect, Inbox, Incoming, Publisher, PublisherConfig,
    Topology, Transient, hook::BoxError, shutdown::on_signals,
};
use sqlx::AnyConnection;
use tracing_subscriber::EnvFilter;

/// The business effect. The SDK runs it once per message id, in the transaction of the inbox
/// claim: the points and the "seen" mark commit together or not at all.
struct AwardPoints;

impl Effect for AwardPoints {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Incoming<'_>) -> Result<Applied, Transient> {
        // A database error is transient: rolled back, and the message comes again.
        sqlx::query("INSERT INTO points VALUES ($1, 10)").bind(&msg.headers.business_key).execute(tx).await?;
        Ok(Applied::Processed)
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The SDK's log lines, with a line per message handled (its id and outcome).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,recheck=debug"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let amqp_url = env::var("RECHECK_AMQP_URL").unwrap_or("amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let sqlite = format!("sqlite://{}?mode=rwc", env::temp_dir().join("recheck-points.db").display());
    let database_url = env::var("DATABASE_URL").unwrap_or(sqlite);

    // The inbox table and the consumer's own, in one database.
    let (pool, _) = recheck::db::connect(&database_url).await?;
    Inbox::migrate(&pool).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS points (order_id TEXT, points BIGINT)").execute(&pool).await?;
    let publisher = Publisher::connect(PublisherConfig::new(amqp_url, "example-consumer")).await?;
    let (topology, queue) = (Topology::default(), "points.orders");
    topology.declare_consumer_queue(&publisher.create_channel().await?, queue, &["order.created"]).await?;
    // `points`: the name the orders' `expect` lists, on every CONFIRM and inbox row.
    let confirmer = Confirmer::new(publisher.clone(), topology.clone(), "points", Default::default());
    let config = ConsumerConfig::new("points", queue);
    // Until Ctrl-C or SIGTERM: the batch in hand is committed, confirmed and acked first.
    ConsumerLoop::new(pool, publisher, topology, confirmer, AwardPoints, config).run(on_signals()?).await?;
    Ok(())
}
