//! The state machine's per-attempt steps. Every step is a conditional update
//! on `(message_id, attempt)`: a duplicated or redelivered check, or a second
//! instance, finds the attempt already taken and does nothing.

use std::collections::HashMap;

use recheck::message::{Check, now_ms};
use sqlx::AssertSqlSafe;

use super::{
    CHUNK_ROWS, MessageRow, RawMessage, Result, Status, Store, expect_text, id_text, message_from,
    placeholders, record_transition, select_messages,
};

impl MessageRow {
    /// The check has nothing to write (the usual case: a read, no write lock): the row is
    /// confirmed (it keeps what the confirm gave it), or complete at this attempt or a later one.
    /// Rejected and failed rows still take the producer fields, which a redrive needs.
    pub fn recorded_for(&self, check: &Check) -> bool {
        self.status == Status::Confirmed || (!self.producer.is_empty() && self.attempt >= check.attempt)
    }
}

/// How an attempt ended, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The producer republished: `resent`, one more resend, failures forgotten.
    Resent { next_check_at: i64 },
    /// RETRY_LATER, an RPC error, a timeout, or a deferral: status unchanged.
    Retry { reason: String, next_check_at: i64 },
    /// `void` or `failed`, with the reason; no further checks.
    Terminal { status: Status, reason: String },
}

/// A check as the store sees it, for the reconciler to decide on.
pub type CheckView = MessageRow;

impl Store {
    /// Creates the row from a check (or fills in a row a confirm created) and
    /// returns it. A check from a later attempt than the row knows (a redrive
    /// on another instance, a purge) moves the row forward to it.
    pub async fn record_check(&self, producer: &str, check: &Check) -> Result<CheckView> {
        let row = self.get(&id_text(check.message_id)).await?;
        self.record_check_read(producer, check, row).await
    }

    /// [`Store::record_check`] with the row already read (`None`: there was none).
    pub async fn record_check_read(
        &self,
        producer: &str,
        check: &Check,
        row: Option<MessageRow>,
    ) -> Result<CheckView> {
        if let Some(row) = row
            && row.recorded_for(check)
        {
            return Ok(row);
        }
        let id = id_text(check.message_id);
        let now = now_ms();
        let attempt = i64::from(check.attempt);
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO messages (message_id, producer, routing_key, business_key, expect, status, attempt,
                 scheduled_attempt, published_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6, $7, $8, $8)
             ON CONFLICT (message_id) DO UPDATE
             SET producer = excluded.producer, routing_key = excluded.routing_key,
                 business_key = excluded.business_key, expect = excluded.expect,
                 published_at = excluded.published_at
             WHERE messages.producer = ''",
        )
        .bind(&id)
        .bind(producer)
        .bind(&check.routing_key)
        .bind(&check.business_key)
        .bind(expect_text(&check.expect))
        .bind(attempt)
        .bind(check.published_at)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE messages SET attempt = $1, scheduled_attempt = $1, updated_at = $2
             WHERE message_id = $3 AND attempt < $1 AND status IN ('pending', 'resent')",
        )
        .bind(attempt)
        .bind(now)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        let row = fetch(&mut tx, &id).await?;
        tx.commit().await?;
        self.committed();
        Ok(row)
    }

    /// Takes attempt `n` (bumps the row to `n + 1`); `false` if another check,
    /// instance or redelivery took it first.
    pub async fn claim(&self, message_id: &str, n: u32) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE messages SET attempt = attempt + 1, updated_at = $1
             WHERE message_id = $2 AND attempt = $3 AND status IN ('pending', 'resent')",
        )
        .bind(now_ms())
        .bind(message_id)
        .bind(i64::from(n))
        .execute(&self.pool)
        .await?;
        self.committed();
        Ok(done.rows_affected() == 1)
    }

    /// Records how attempt `attempt` ended, if the row is still at that attempt
    /// and not settled meanwhile (a confirm may have come in during the RPC).
    ///
    /// Every UPDATE repeats `status IN ('pending', 'resent')`: on PostgreSQL a confirm that
    /// commits between our read and our write is only seen by the write's own WHERE (re-checked
    /// on the row's new version), and without it a `resent` would overwrite `confirmed` — a
    /// confirmed message left looking unconfirmed, with no check left to fix it.
    pub async fn finish(&self, message_id: &str, attempt: u32, outcome: &AttemptOutcome) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let row = fetch(&mut tx, message_id).await?;
        if row.attempt != attempt {
            return Ok(false);
        }
        if row.status.is_terminal() {
            return self.finish_settled(tx, message_id, attempt, outcome, now).await;
        }
        let a = i64::from(attempt);
        let (to, reason) = match outcome {
            AttemptOutcome::Resent { next_check_at } => {
                let done = sqlx::query(
                    "UPDATE messages SET status = 'resent', resend_count = resend_count + 1,
                         first_failure_at = NULL, last_error = NULL, scheduled_attempt = $1,
                         next_check_at = $2, updated_at = $3
                     WHERE message_id = $4 AND attempt = $1 AND status IN ('pending', 'resent')",
                )
                .bind(a)
                .bind(*next_check_at)
                .bind(now)
                .bind(message_id)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    return self.finish_settled(tx, message_id, attempt, outcome, now).await;
                }
                (Status::Resent, format!("resend #{}", row.resend_count + 1))
            }
            AttemptOutcome::Retry { reason, next_check_at } => {
                sqlx::query(
                    "UPDATE messages SET last_error = $1, first_failure_at = COALESCE(first_failure_at, $2),
                         scheduled_attempt = $3, next_check_at = $4, updated_at = $2
                     WHERE message_id = $5 AND attempt = $3 AND status IN ('pending', 'resent')",
                )
                .bind(reason)
                .bind(now)
                .bind(a)
                .bind(*next_check_at)
                .bind(message_id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                self.committed();
                return Ok(true);
            }
            AttemptOutcome::Terminal { status, reason } => {
                let done = sqlx::query(
                    "UPDATE messages SET status = $1, last_error = $2, next_check_at = 0, updated_at = $3
                     WHERE message_id = $4 AND attempt = $5 AND status IN ('pending', 'resent')",
                )
                .bind(status.as_str())
                .bind(reason)
                .bind(now)
                .bind(message_id)
                .bind(a)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    return self.finish_settled(tx, message_id, attempt, outcome, now).await;
                }
                (*status, reason.clone())
            }
        };
        record_transition(&mut tx, message_id, Some(row.status), to, attempt, &reason, now).await?;
        tx.commit().await?;
        self.committed();
        Ok(true)
    }

    /// The row was settled during the RPC (typically by the confirm of this very resend): a
    /// resend still happened and counts, the status stays; other outcomes change nothing.
    async fn finish_settled(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        message_id: &str,
        attempt: u32,
        outcome: &AttemptOutcome,
        now: i64,
    ) -> Result<bool> {
        if !matches!(outcome, AttemptOutcome::Resent { .. }) {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE messages SET resend_count = resend_count + 1, scheduled_attempt = $1, updated_at = $2
             WHERE message_id = $3 AND attempt = $1",
        )
        .bind(i64::from(attempt))
        .bind(now)
        .bind(message_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.committed();
        Ok(true)
    }

    /// Notes that the CHECK for `attempt` is published (after a takeover).
    pub async fn mark_scheduled(&self, message_id: &str, attempt: u32, next_check_at: i64) -> Result<()> {
        sqlx::query(
            "UPDATE messages SET scheduled_attempt = $1, next_check_at = $2
             WHERE message_id = $3 AND scheduled_attempt < $1",
        )
        .bind(i64::from(attempt))
        .bind(next_check_at)
        .bind(message_id)
        .execute(&self.pool)
        .await?;
        self.committed();
        Ok(())
    }

    /// The rows of these ids (one statement per [`CHUNK_ROWS`] ids); ids without a row are absent.
    pub async fn get_many(&self, message_ids: &[String]) -> Result<HashMap<String, MessageRow>> {
        let mut rows = HashMap::with_capacity(message_ids.len());
        for ids in message_ids.chunks(CHUNK_ROWS) {
            let sql = format!(
                concat!(select_messages!("WHERE message_id IN ("), "{})"),
                placeholders(ids.len(), 1)
            );
            let mut query = sqlx::query_as::<_, RawMessage>(AssertSqlSafe(sql)).persistent(false);
            for id in ids {
                query = query.bind(id.as_str());
            }
            for raw in query.fetch_all(&self.pool).await? {
                let row = message_from(raw)?;
                rows.insert(row.message_id.clone(), row);
            }
        }
        Ok(rows)
    }

    pub async fn get(&self, message_id: &str) -> Result<Option<MessageRow>> {
        let raw: Option<RawMessage> = sqlx::query_as(select_messages!("WHERE message_id = $1"))
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await?;
        raw.map(message_from).transpose()
    }
}

async fn fetch(tx: &mut sqlx::AnyConnection, message_id: &str) -> Result<MessageRow> {
    let raw: RawMessage = sqlx::query_as(select_messages!("WHERE message_id = $1"))
        .bind(message_id)
        .fetch_one(&mut *tx)
        .await?;
    message_from(raw)
}
