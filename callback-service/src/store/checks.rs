//! The state machine's per-attempt steps. Every step is a conditional update
//! on `(message_id, attempt)`: a duplicated or redelivered check, or a second
//! instance, finds the attempt already taken and does nothing.

use std::collections::HashMap;

use recheck::message::{Check, now_ms};
use sqlx::AssertSqlSafe;

use super::{
    MessageRow, RawMessage, Result, Status, Store, id_text, message_from, record_transition, select_messages,
};

impl MessageRow {
    /// The check has nothing to write (the usual case: a read, no write lock): the row has seen
    /// its CHECK and is confirmed, or is at this attempt or a later one. A row without its CHECK
    /// always takes it: the CHECK brings the producer fields (a redrive needs them) and `expect`.
    pub fn recorded_for(&self, check: &Check) -> bool {
        self.checked() && (self.status == Status::Confirmed || self.attempt >= check.attempt)
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

impl Store {
    /// Creates the row from a check (or fills in a row a confirm created) and
    /// returns it. A check from a later attempt than the row knows (a redrive
    /// on another instance, a purge) moves the row forward to it.
    pub async fn record_check(&self, producer: &str, check: &Check) -> Result<MessageRow> {
        let row = self.get(&id_text(check.message_id)).await?;
        self.record_check_read(producer, check, row).await
    }

    /// [`Store::record_check`] with the row already read (`None`: there was none).
    pub async fn record_check_read(
        &self,
        producer: &str,
        check: &Check,
        row: Option<MessageRow>,
    ) -> Result<MessageRow> {
        let id = id_text(check.message_id);
        let row = match row {
            Some(row) if row.recorded_for(check) => return Ok(row),
            Some(row) if row.checked() => row,
            _ => {
                let mut rows = self.record_first_checks(producer, &[check]).await?;
                return rows.remove(&id).ok_or_else(|| sqlx::Error::RowNotFound.into());
            }
        };
        let mut tx = self.begin().await?;
        advance(&mut tx, &row.message_id, check.attempt, now_ms()).await?;
        let row = fetch(&mut tx, &id).await?;
        tx.commit().await?;
        self.committed();
        Ok(row)
    }

    /// Takes attempt `n` (bumps the row to `n + 1`) and returns the resends done so far; `None`
    /// if another check, instance or redelivery took it first, or the attempt before has not
    /// recorded its outcome yet (`scheduled_attempt < n`: its resend count would be stale).
    pub async fn claim(&self, message_id: &str, n: u32) -> Result<Option<u32>> {
        let resends: Option<i64> = sqlx::query_scalar(
            "UPDATE messages SET attempt = attempt + 1, updated_at = $1
             WHERE message_id = $2 AND attempt = $3 AND scheduled_attempt >= $3
               AND status IN ('pending', 'resent')
             RETURNING resend_count",
        )
        .bind(now_ms())
        .bind(message_id)
        .bind(i64::from(n))
        .fetch_optional(&self.pool)
        .await?;
        self.committed();
        Ok(resends.map(|n| u32::try_from(n).unwrap_or(u32::MAX)))
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
    /// resend still happened, so it counts and its history row is written (the timeline and the
    /// resend rate show it), and the status stays; other outcomes change nothing.
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
        // As it stands now: what settled it may have committed after our first read.
        let row = fetch(&mut tx, message_id).await?;
        let done = sqlx::query(
            "UPDATE messages SET resend_count = resend_count + 1, scheduled_attempt = $1, updated_at = $2
             WHERE message_id = $3 AND attempt = $1",
        )
        .bind(i64::from(attempt))
        .bind(now)
        .bind(&row.message_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            let reason = format!(
                "resend #{} ({} meanwhile: its status stays)",
                row.resend_count + 1,
                row.status.as_str()
            );
            record_transition(
                &mut tx,
                &row.message_id,
                Some(row.status),
                Status::Resent,
                attempt,
                &reason,
                now,
            )
            .await?;
        }
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
        let chunk_rows = self.chunk_rows();
        let mut rows = HashMap::with_capacity(message_ids.len());
        for ids in message_ids.chunks(chunk_rows) {
            let sql = format!(
                concat!(select_messages!("WHERE message_id IN ("), "{})"),
                self.binds().list(ids.len())
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

/// Moves an open row forward to a check's later attempt (a redrive on another instance, a purge).
pub(super) async fn advance(
    tx: &mut sqlx::AnyConnection,
    message_id: &str,
    attempt: u32,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "UPDATE messages SET attempt = $1, scheduled_attempt = $1, updated_at = $2
         WHERE message_id = $3 AND attempt < $1 AND status IN ('pending', 'resent')",
    )
    .bind(i64::from(attempt))
    .bind(now)
    .bind(message_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn fetch(tx: &mut sqlx::AnyConnection, message_id: &str) -> Result<MessageRow> {
    let raw: RawMessage = sqlx::query_as(select_messages!("WHERE message_id = $1"))
        .bind(message_id)
        .fetch_one(&mut *tx)
        .await?;
    message_from(raw)
}
