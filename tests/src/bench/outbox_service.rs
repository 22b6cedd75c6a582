//! The transactional-outbox baseline's producer, run as its own process (`bench outbox-service`):
//! the same `demo.v1.Orders/CreateOrder` as upstream-demo, but the order row and an outbox row are
//! written in one transaction and nothing is published on the request path; a relay task reads
//! unsent outbox rows in id order, publishes them (broker-confirmed, all of a batch in flight) and
//! marks them sent. The business message carries the same headers and body as Recheck's, so the
//! same consumer (downstream-demo) processes it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures_util::future::try_join_all;
use recheck::{
    Outgoing, Publisher, PublisherConfig, Topology,
    db::Backend,
    message::{BusinessHeaders, now_ms},
};
use recheck_proto::demo::v1::{
    CreateOrderRequest, CreateOrderResponse,
    orders_server::{Orders, OrdersServer},
};
use sqlx::{AnyPool, AssertSqlSafe};
use tokio::{net::TcpListener, sync::Notify};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// `bench outbox-service` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct OutboxServiceArgs {
    #[arg(long)]
    pub amqp_url: String,
    /// The order store (orders + outbox tables).
    #[arg(long)]
    pub database_url: String,
    #[arg(long)]
    pub grpc_addr: SocketAddr,
    /// Most outbox rows the relay publishes and marks per round.
    #[arg(long, default_value_t = 500)]
    pub relay_batch: i64,
}

/// Same columns as upstream-demo's `orders`.
const ORDERS: &str = "CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    customer TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL)";

fn outbox_schema(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "CREATE TABLE IF NOT EXISTS outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                message_id TEXT NOT NULL,
                routing_key TEXT NOT NULL,
                business_key TEXT NOT NULL,
                payload TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                sent_at BIGINT)"
        }
        Backend::Postgres => {
            "CREATE TABLE IF NOT EXISTS outbox (
                id BIGSERIAL PRIMARY KEY,
                message_id TEXT NOT NULL,
                routing_key TEXT NOT NULL,
                business_key TEXT NOT NULL,
                payload TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                sent_at BIGINT)"
        }
    }
}

const EVENT: &str = "order.created";
const PRODUCER: &str = "orders";

/// Serves until `shutdown`; the relay finishes the batch in hand.
pub async fn serve(args: OutboxServiceArgs, shutdown: CancellationToken) -> Result<()> {
    let (pool, backend) = recheck::db::connect(&args.database_url).await?;
    sqlx::query(ORDERS).execute(&pool).await?;
    sqlx::query(outbox_schema(backend)).execute(&pool).await?;
    sqlx::query("CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (id) WHERE sent_at IS NULL")
        .execute(&pool)
        .await?;
    let publisher = Publisher::connect(PublisherConfig::new(&args.amqp_url, "bench-outbox")).await?;
    let topology = Topology::default();
    let channel = publisher.create_channel().await?;
    topology.declare(&channel).await.context("declaring the topology")?;
    channel.close(200, "declared".into()).await?;

    let wake = Arc::new(Notify::new());
    let service = OutboxOrders { pool: pool.clone(), wake: wake.clone() };
    let listener = TcpListener::bind(args.grpc_addr).await?;
    let grpc = tonic::transport::Server::builder()
        .add_service(OrdersServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.clone().cancelled_owned());
    let relay = relay(&pool, &publisher, &topology, args.relay_batch, &wake, &shutdown);
    let (served, ()) = tokio::join!(grpc, relay);
    publisher.close().await;
    pool.close().await;
    served.context("serving gRPC")
}

struct OutboxOrders {
    pool: AnyPool,
    wake: Arc<Notify>,
}

#[tonic::async_trait]
impl Orders for OutboxOrders {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        let req = request.into_inner();
        if req.customer.is_empty() || req.amount_cents < 0 {
            return Err(Status::invalid_argument("customer must be set and amount_cents must be ≥ 0"));
        }
        let order_id = Uuid::now_v7().to_string();
        let message_id = Uuid::now_v7().to_string();
        let payload = serde_json::json!({
            "order_id": order_id, "customer": req.customer, "amount_cents": req.amount_cents,
        })
        .to_string();
        let now = now_ms();
        let store = |e: sqlx::Error| Status::unavailable(format!("order store: {e}"));
        let mut tx = self.pool.begin().await.map_err(store)?;
        sqlx::query(
            "INSERT INTO orders (order_id, message_id, customer, amount_cents, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&order_id)
        .bind(&message_id)
        .bind(&req.customer)
        .bind(req.amount_cents)
        .bind(&payload)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(store)?;
        sqlx::query(
            "INSERT INTO outbox (message_id, routing_key, business_key, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&message_id)
        .bind(EVENT)
        .bind(&order_id)
        .bind(&payload)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(store)?;
        tx.commit().await.map_err(store)?;
        // The relay polls too; the wake-up only saves it the poll interval.
        self.wake.notify_one();
        Ok(Response::new(CreateOrderResponse { order_id, message_id, committed: true, published: false }))
    }
}

type OutboxRow = (i64, String, String, String, String);

/// Publishes unsent rows in id order and marks them sent, until `shutdown`.
async fn relay(
    pool: &AnyPool,
    publisher: &Publisher,
    topology: &Topology,
    batch: i64,
    wake: &Notify,
    shutdown: &CancellationToken,
) {
    let exchange = topology.events_exchange();
    loop {
        match relay_round(pool, publisher, &exchange, batch).await {
            // A full batch: there is probably more right now.
            Ok(n) if n as i64 == batch => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "relay round failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

async fn relay_round(pool: &AnyPool, publisher: &Publisher, exchange: &str, batch: i64) -> Result<usize> {
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "SELECT id, message_id, routing_key, business_key, payload FROM outbox \
         WHERE sent_at IS NULL ORDER BY id LIMIT $1",
    )
    .bind(batch)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    try_join_all(rows.iter().map(|(_, message_id, routing_key, business_key, payload)| async move {
        let headers = BusinessHeaders {
            message_id: message_id.parse()?,
            producer: PRODUCER.into(),
            business_key: business_key.clone(),
            attempt: 0,
        };
        publisher
            .publish(Outgoing {
                exchange,
                routing_key,
                body: payload.as_bytes(),
                properties: headers.to_properties(),
            })
            .await?;
        anyhow::Ok(())
    }))
    .await?;
    // The ids are integers this table generated: safe to inline.
    let ids = rows.iter().map(|(id, ..)| id.to_string()).collect::<Vec<_>>().join(",");
    sqlx::query(AssertSqlSafe(format!("UPDATE outbox SET sent_at = $1 WHERE id IN ({ids})")))
        .bind(now_ms())
        .execute(pool)
        .await?;
    Ok(rows.len())
}
