//! At-most-once processing on the consumer: one row per `(consumer, message_id)`
//! written in the caller's transaction, so the effect and the "seen" mark
//! commit together or not at all.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use sqlx::{AnyConnection, AnyPool, AssertSqlSafe};
use uuid::Uuid;

use crate::{
    db::Binds,
    error::Result,
    wire::message::{Outcome, now_ms},
};

/// The table, the same SQL for SQLite and PostgreSQL. Run by [`Inbox::migrate`],
/// or copy it into the service's own migrations.
pub const INBOX_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS recheck_inbox (
        consumer TEXT NOT NULL,
        message_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT,
        -- Deliveries of this message id seen by this consumer (1 = no duplicate).
        seen BIGINT NOT NULL DEFAULT 1,
        processed_at BIGINT NOT NULL,
        PRIMARY KEY (consumer, message_id)
    )",
    "CREATE INDEX IF NOT EXISTS recheck_inbox_processed_at ON recheck_inbox (processed_at)",
];

/// Rows per batched statement: 2 binds a row stays far below SQLite's 32 766 and PostgreSQL's
/// 65 535 parameters, and the prepared-statement cache holds few shapes.
const CHUNK: usize = 256;

/// What the inbox remembers of a message processed before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prior {
    /// `processed`, or `rejected` (a redelivery is then confirmed as rejected again).
    pub outcome: Outcome,
    /// The reason given with a rejection.
    pub detail: Option<String>,
}

/// One consumer's inbox: a row per `(consumer, message_id)` in the consumer's own database,
/// written in the transaction of the effect. [`ConsumerLoop`](crate::consumer::consume::ConsumerLoop) uses it; a
/// consumer with a loop of its own calls [`Inbox::claim`] in its transaction.
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: String,
}

impl Inbox {
    /// The inbox of `consumer`: the name its CONFIRMs carry.
    pub fn new(consumer: impl Into<String>) -> Self {
        Self { consumer: consumer.into() }
    }

    /// The consumer whose rows this inbox reads and writes.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Creates the table and its index ([`INBOX_SCHEMA`]) if they are missing.
    pub async fn migrate(pool: &AnyPool) -> Result<()> {
        for statement in INBOX_SCHEMA {
            sqlx::query(*statement).execute(pool).await?;
        }
        Ok(())
    }

    /// Claims the message inside `tx`. `true`: first time, apply the effect.
    /// `false`: already processed (or being processed by a transaction that
    /// committed first: the unique key makes the second one wait, then lose).
    /// Each duplicate is counted on the row (`seen`), with the transaction.
    pub async fn claim(&self, tx: &mut AnyConnection, message_id: Uuid) -> Result<bool> {
        let seen: i64 = sqlx::query_scalar(
            "INSERT INTO recheck_inbox (consumer, message_id, outcome, processed_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (consumer, message_id) DO UPDATE SET seen = recheck_inbox.seen + 1
             RETURNING seen",
        )
        .bind(&self.consumer)
        .bind(message_id.to_string())
        .bind(Outcome::Processed.as_str())
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?;
        Ok(seen == 1)
    }

    /// [`claim`](Self::claim) for many deliveries in one statement per 256 ids: the ids
    /// seen for the first time. An id given `k` times counts `k` deliveries; it is first-seen
    /// (its first copy applies the effect, the others are duplicates) if no row existed.
    pub async fn claim_many(&self, tx: &mut AnyConnection, message_ids: &[Uuid]) -> Result<HashSet<Uuid>> {
        // Each id once per statement (PostgreSQL's ON CONFLICT cannot touch a row twice), in id
        // order, so concurrent claimers lock rows in one order and cannot deadlock each other.
        let mut copies = BTreeMap::<Uuid, i64>::new();
        for id in message_ids {
            *copies.entry(*id).or_default() += 1;
        }
        let copies: Vec<(Uuid, i64)> = copies.into_iter().collect();
        let mut first = HashSet::with_capacity(copies.len());
        let now = now_ms();
        for chunk in copies.chunks(CHUNK) {
            let shared: Vec<String> = (1..=3).map(|k| Binds::shared(chunk.len() * 2, k)).collect();
            let rows = Binds::of(tx)
                .tuples(chunk.len(), &[Some(&shared[0]), None, Some(&shared[1]), Some(&shared[2]), None]);
            let sql = format!(
                "INSERT INTO recheck_inbox (consumer, message_id, outcome, processed_at, seen) VALUES {rows}
                 ON CONFLICT (consumer, message_id) DO UPDATE SET seen = recheck_inbox.seen + excluded.seen
                 RETURNING message_id, seen"
            );
            let mut query = sqlx::query_as(AssertSqlSafe(sql));
            for (id, n) in chunk {
                query = query.bind(id.to_string()).bind(*n);
            }
            query = query.bind(&self.consumer).bind(Outcome::Processed.as_str()).bind(now);
            let claimed: Vec<(String, i64)> = query.fetch_all(&mut *tx).await?;
            let sent: HashMap<String, (Uuid, i64)> =
                chunk.iter().map(|(id, n)| (id.to_string(), (*id, *n))).collect();
            // `seen` is exactly this statement's copies only when the row is new.
            first.extend(
                claimed
                    .iter()
                    .filter_map(|(id, seen)| sent.get(id).filter(|(_, n)| n == seen).map(|(id, _)| *id)),
            );
        }
        Ok(first)
    }

    /// Messages processed once, and duplicate deliveries absorbed, so far.
    pub async fn counts(&self, pool: &AnyPool) -> Result<(i64, i64)> {
        // CAST: PostgreSQL sums BIGINT as NUMERIC, which the `Any` driver cannot decode.
        let (messages, duplicates): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(seen - 1), 0) AS BIGINT) FROM recheck_inbox WHERE consumer = $1",
        )
                .bind(&self.consumer)
                .fetch_one(pool)
                .await?;
        Ok((messages, duplicates))
    }

    /// Records a business rejection for a claimed message, so a redelivery
    /// re-confirms `rejected` rather than `duplicate`.
    pub async fn mark_rejected(&self, tx: &mut AnyConnection, message_id: Uuid, detail: &str) -> Result<()> {
        sqlx::query(
            "UPDATE recheck_inbox SET outcome = $1, detail = $2 WHERE consumer = $3 AND message_id = $4",
        )
        .bind(Outcome::Rejected.as_str())
        .bind(detail)
        .bind(&self.consumer)
        .bind(message_id.to_string())
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// How an already-claimed message ended.
    pub async fn prior(&self, tx: &mut AnyConnection, message_id: Uuid) -> Result<Option<Prior>> {
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT outcome, detail FROM recheck_inbox WHERE consumer = $1 AND message_id = $2",
        )
        .bind(&self.consumer)
        .bind(message_id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        Ok(row.map(|(outcome, detail)| Prior {
            outcome: Outcome::parse(&outcome).unwrap_or(Outcome::Processed),
            detail,
        }))
    }

    /// [`prior`](Self::prior) of many ids in one statement per 256; ids without a row are absent.
    pub async fn prior_many(
        &self,
        tx: &mut AnyConnection,
        message_ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Prior>> {
        let mut found = HashMap::with_capacity(message_ids.len());
        for chunk in message_ids.chunks(CHUNK) {
            let binds = Binds::of(tx).list(chunk.len());
            let consumer = Binds::shared(chunk.len(), 1);
            let sql = format!(
                "SELECT message_id, outcome, detail FROM recheck_inbox WHERE consumer = {consumer} AND message_id IN ({binds})"
            );
            let mut query = sqlx::query_as(AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id.to_string());
            }
            query = query.bind(&self.consumer);
            let rows: Vec<(String, String, Option<String>)> = query.fetch_all(&mut *tx).await?;
            for (id, outcome, detail) in rows {
                let Ok(id) = Uuid::parse_str(&id) else { continue };
                let outcome = Outcome::parse(&outcome).unwrap_or(Outcome::Processed);
                found.insert(id, Prior { outcome, detail });
            }
        }
        Ok(found)
    }

    /// Deletes rows older than `retention`; returns how many.
    pub async fn purge(&self, pool: &AnyPool, retention: Duration) -> Result<u64> {
        let cutoff = now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let done = sqlx::query("DELETE FROM recheck_inbox WHERE consumer = $1 AND processed_at < $2")
            .bind(&self.consumer)
            .bind(cutoff)
            .execute(pool)
            .await?;
        Ok(done.rows_affected())
    }
}
