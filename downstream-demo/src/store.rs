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

use std::collections::BTreeMap;

use anyhow::Context;
use recheck::db::Binds;
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe};

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

/// Orders per statement: 4 binds a ledger row stays far below SQLite's 32 766 and PostgreSQL's
/// 65 535 parameters.
const CHUNK: usize = 256;

/// Awards `awards` (message id, order) inside the caller's (the inbox's) transaction: a ledger row
/// each, and each customer's balance incremented by its orders (so applying one twice counts
/// twice). Set-based: one ledger insert and one balance upsert per 256 orders.
pub async fn award(tx: &mut AnyConnection, awards: &[(String, Order)], now_ms: i64) -> sqlx::Result<()> {
    for chunk in awards.chunks(CHUNK) {
        let at = Binds::shared(chunk.len() * 4, 1);
        let rows = Binds::of(tx).tuples(chunk.len(), &[None, None, None, None, Some(&at)]);
        let sql =
            format!("INSERT INTO points (message_id, order_id, customer, points, awarded_at) VALUES {rows}");
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (message_id, order) in chunk {
            query = query.bind(message_id).bind(&order.order_id).bind(&order.customer).bind(order.points());
        }
        query.bind(now_ms).execute(&mut *tx).await?;
    }
    // One row per customer (PostgreSQL's ON CONFLICT cannot touch a row twice in a statement), in
    // customer order, so that two instances on one store lock balances in one order.
    let mut balances = BTreeMap::<&str, (i64, i64)>::new();
    for (_, order) in awards {
        let (points, orders) = balances.entry(&order.customer).or_default();
        *points += order.points();
        *orders += 1;
    }
    let balances: Vec<_> = balances.into_iter().collect();
    for chunk in balances.chunks(CHUNK) {
        let rows = Binds::of(tx).tuples(chunk.len(), &[None, None, None]);
        let sql = format!(
            "INSERT INTO balances (customer, points, orders) VALUES {rows}
             ON CONFLICT (customer) DO UPDATE
             SET points = balances.points + excluded.points, orders = balances.orders + excluded.orders"
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (customer, (points, orders)) in chunk {
            query = query.bind(*customer).bind(*points).bind(*orders);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}
