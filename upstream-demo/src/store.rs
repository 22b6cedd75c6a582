//! The order store over sqlx `Any`: an embedded SQLite file by default,
//! PostgreSQL when `DATABASE_URL` says so. One table, created at start with SQL
//! both backends accept; the Recheck message id is stored with each order so the
//! resend hook can find the payload again.

use std::collections::HashMap;

use recheck::db::Binds;
use sqlx::{Any, AnyPool, AssertSqlSafe, Transaction};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The URL names no backend we support (the SDK's message says which).
    #[error("{0}")]
    Url(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    customer TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL)";

/// Every `ResendHook` call this service answered: an audit a producer team would keep, and how the
/// fault suites prove that no attempt was resent twice (one row per call, not per message).
const HOOK_CALLS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS hook_calls (
    message_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    at BIGINT NOT NULL)";

/// Ids per `IN (…)` or multi-row `VALUES` statement: far below SQLite's and PostgreSQL's bound
/// on placeholders.
const CHUNK_ROWS: usize = 1000;

/// One order as stored; `payload` is the exact body of its `order.created` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub order_id: String,
    pub message_id: Uuid,
    pub customer: String,
    pub amount_cents: i64,
    pub payload: String,
    /// ms since the Unix epoch.
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    binds: Binds,
}

impl Store {
    /// Connects and creates the `orders` table if it is missing.
    pub async fn connect(url: &str) -> Result<Self> {
        // WAL (set by the SDK) lets the resend hook read while orders are being written.
        let (pool, backend) = recheck::db::connect(url).await.map_err(|e| match e {
            recheck::Error::Db(e) => StoreError::from(e),
            other => StoreError::Url(other.to_string()),
        })?;
        sqlx::query(SCHEMA).execute(&pool).await?;
        sqlx::query(HOOK_CALLS_SCHEMA).execute(&pool).await?;
        Ok(Self { pool, binds: Binds::new(backend) })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn begin(&self) -> Result<Transaction<'static, Any>> {
        Ok(self.pool.begin().await?)
    }

    /// Inserts `order` inside the caller's transaction (it commits or rolls back).
    pub async fn insert(tx: &mut Transaction<'static, Any>, order: &Order) -> Result<()> {
        sqlx::query(
            "INSERT INTO orders (order_id, message_id, customer, amount_cents, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&order.order_id)
        .bind(order.message_id.to_string())
        .bind(&order.customer)
        .bind(order.amount_cents)
        .bind(&order.payload)
        .bind(order.created_at)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The stored payload of the order carrying `message_id`, if it was committed.
    pub async fn payload(&self, message_id: Uuid) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as("SELECT payload FROM orders WHERE message_id = $1")
            .bind(message_id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(payload,)| payload))
    }

    /// The stored payloads of the committed orders among `message_ids`, by id (one
    /// `SELECT … IN` per 1 000 ids); an id without a committed order is absent.
    pub async fn payloads(&self, message_ids: &[Uuid]) -> Result<HashMap<Uuid, String>> {
        let mut found = HashMap::with_capacity(message_ids.len());
        for ids in message_ids.chunks(CHUNK_ROWS) {
            let sql = format!(
                "SELECT message_id, payload FROM orders WHERE message_id IN ({})",
                self.binds.list(ids.len())
            );
            let mut query = sqlx::query_as::<_, (String, String)>(AssertSqlSafe(sql)).persistent(false);
            for id in ids {
                query = query.bind(id.to_string());
            }
            for (id, payload) in query.fetch_all(&self.pool).await? {
                // Stored by `insert` from a Uuid, so it parses; a row that did not would be no order of ours.
                if let Ok(id) = Uuid::parse_str(&id) {
                    found.insert(id, payload);
                }
            }
        }
        Ok(found)
    }

    /// Records one answered `ResendHook` call.
    pub async fn record_hook_call(&self, message_id: &str, attempt: u32, outcome: &str) -> Result<()> {
        self.record_hook_calls(&[(message_id, attempt, outcome)]).await
    }

    /// Records answered calls, one row per id (a `ResendBatch` answers many), in one statement
    /// per 1 000.
    pub async fn record_hook_calls(&self, calls: &[(&str, u32, &str)]) -> Result<()> {
        let at = recheck::message::now_ms();
        for chunk in calls.chunks(CHUNK_ROWS) {
            let shared = Binds::shared(chunk.len() * 3, 1);
            let sql = format!(
                "INSERT INTO hook_calls (message_id, attempt, outcome, at) VALUES {}",
                self.binds.tuples(chunk.len(), &[None, None, None, Some(&shared)])
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
            for (message_id, attempt, outcome) in chunk {
                query = query.bind(*message_id).bind(i64::from(*attempt)).bind(*outcome);
            }
            query.bind(at).execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Committed orders (tests and operators count them).
    pub async fn count(&self) -> Result<i64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders").fetch_one(&self.pool).await?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn committed_orders_are_found_rolled_back_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("orders.db").display());
        let store = Store::connect(&url).await.unwrap();
        let order = |id: &str| Order {
            order_id: id.into(),
            message_id: Uuid::now_v7(),
            customer: "ada".into(),
            amount_cents: 1250,
            payload: format!(r#"{{"order_id":"{id}"}}"#),
            created_at: 1,
        };
        let (kept, dropped) = (order("o-1"), order("o-2"));

        let mut tx = store.begin().await.unwrap();
        Store::insert(&mut tx, &kept).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = store.begin().await.unwrap();
        Store::insert(&mut tx, &dropped).await.unwrap();
        tx.rollback().await.unwrap();

        assert_eq!(store.payload(kept.message_id).await.unwrap(), Some(kept.payload.clone()));
        assert_eq!(store.payload(dropped.message_id).await.unwrap(), None);
        // The batched lookup: the committed one only, by id.
        let found = store.payloads(&[kept.message_id, dropped.message_id]).await.unwrap();
        assert_eq!(found, HashMap::from([(kept.message_id, kept.payload.clone())]));
        assert_eq!(store.count().await.unwrap(), 1);
        // Opening again keeps the table (CREATE TABLE IF NOT EXISTS).
        assert_eq!(Store::connect(&url).await.unwrap().count().await.unwrap(), 1);
    }
}
