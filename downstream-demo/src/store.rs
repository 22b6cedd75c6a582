//! The points store over sqlx `Any`: an embedded SQLite file by default,
//! PostgreSQL when `DATABASE_URL` says so. It holds the SDK's inbox and two
//! tables of our own, written in the inbox's transaction:
//!
//! - `points`, a ledger: one row per application of the effect. No key on the
//!   message id on purpose: a second application is a second row (and a doubled
//!   balance), a number a test can see, instead of a constraint error.
//! - `balances`, per customer: points and orders, incremented per application —
//!   the non-idempotent part. Exactly-once shows as balances that equal what the
//!   producer's committed orders imply.
//!
//! A second instance under another consumer name (e.g. `shipping`) runs the same
//! effect on its own store.

use anyhow::Context;
use sqlx::{AnyConnection, AnyPool};

use crate::order::Order;

/// upstream-demo's load report and the test kit read `message_id` from this exact
/// table, so keep its name and columns.
const POINTS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS points (
    message_id TEXT NOT NULL,
    order_id TEXT NOT NULL,
    customer TEXT NOT NULL,
    points BIGINT NOT NULL,
    awarded_at BIGINT NOT NULL)";
const POINTS_INDEX: &str = "CREATE INDEX IF NOT EXISTS points_message_id ON points (message_id)";
const BALANCES_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS balances (
    customer TEXT PRIMARY KEY,
    points BIGINT NOT NULL,
    orders BIGINT NOT NULL)";

/// Connects and creates the inbox, `points` and `balances` tables if they are missing.
pub async fn connect(url: &str) -> anyhow::Result<AnyPool> {
    let (pool, _) = recheck::db::connect(url)
        .await
        .with_context(|| format!("opening the points store {}", recheck::secret::redact_url(url)))?;
    recheck::Inbox::migrate(&pool).await.context("creating the inbox table")?;
    for ddl in [POINTS_SCHEMA, POINTS_INDEX, BALANCES_SCHEMA] {
        sqlx::query(ddl).execute(&pool).await.context("creating the points tables")?;
    }
    Ok(pool)
}

/// Awards `order`'s points inside the caller's (the inbox's) transaction: a ledger row, and the
/// customer's balance incremented (so applying it twice counts twice).
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
    sqlx::query(
        "INSERT INTO balances (customer, points, orders) VALUES ($1, $2, 1)
         ON CONFLICT (customer) DO UPDATE
         SET points = balances.points + excluded.points, orders = balances.orders + 1",
    )
    .bind(&order.customer)
    .bind(order.points())
    .execute(&mut *tx)
    .await?;
    Ok(())
}
