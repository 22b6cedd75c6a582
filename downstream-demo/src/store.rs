//! The points store over sqlx `Any`: an embedded SQLite file by default,
//! PostgreSQL when `DATABASE_URL` says so. It holds the SDK's inbox and one
//! table of our own, `points`, written in the inbox's transaction.

use anyhow::{Context, bail};
use sqlx::{AnyConnection, AnyPool, any::AnyPoolOptions};

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
    sqlx::any::install_default_drivers();
    let sqlite = url.starts_with("sqlite:");
    if !sqlite && !url.starts_with("postgres:") && !url.starts_with("postgresql:") {
        bail!("unsupported database URL {url:?} (use sqlite:// or postgres://)");
    }
    let pool = AnyPoolOptions::new()
        // SQLite has one writer anyway; more connections only add lock waits.
        .max_connections(if sqlite { 4 } else { 16 })
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    // WAL lets `stats` read while batches are being written; the
                    // busy timeout makes a writer wait for the lock instead of failing.
                    sqlx::query("PRAGMA journal_mode=WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA busy_timeout=10000").execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
        .with_context(|| format!("opening the points store {url}"))?;
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
