//! The points store over sqlx `Any`: an embedded SQLite file by default,
//! PostgreSQL when `DATABASE_URL` says so. It holds the SDK's inbox and one
//! table of our own, `points`, written in the inbox's transaction.

use anyhow::Context;
use sqlx::{AnyConnection, AnyPool};

use crate::order::Order;

/// One row per message that earned points. upstream-demo's load report reads
/// `message_id` from this exact table, so keep its name and columns.
const POINTS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS points (
    message_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    customer TEXT NOT NULL,
    points BIGINT NOT NULL,
    awarded_at BIGINT NOT NULL)";

/// Connects and creates the inbox and `points` tables if they are missing.
pub async fn connect(url: &str) -> anyhow::Result<AnyPool> {
    let (pool, _) = recheck::db::connect(url)
        .await
        .with_context(|| format!("opening the points store {}", recheck::secret::redact_url(url)))?;
    recheck::Inbox::migrate(&pool).await.context("creating the inbox table")?;
    sqlx::query(POINTS_SCHEMA).execute(&pool).await.context("creating the points table")?;
    Ok(pool)
}

/// Awards `order`'s points inside the caller's (the inbox's) transaction.
pub async fn award(tx: &mut AnyConnection, message_id: &str, order: &Order, now_ms: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO points (message_id, order_id, customer, points, awarded_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(message_id)
    .bind(&order.order_id)
    .bind(&order.customer)
    .bind(order.points())
    .bind(now_ms)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
