//! No check left behind: the rows whose check is overdue, claimed for one sweeper, and the
//! `next_check_at` of checks the reconciler republishes without an attempt of their own.

use sqlx::AssertSqlSafe;

use super::{CHUNK_ROWS, MessageRow, RawMessage, Result, Store, message_from, placeholders};

impl Store {
    /// Claims up to `limit` open rows whose check was due before `overdue_before` (their CHECK
    /// was lost or parked) by moving their `next_check_at` to `until`, and returns them: the
    /// caller republishes their CHECKs. The claim is the update's own WHERE, re-checked on each
    /// row as it is locked, so two instances never both take a row; a claim whose publish fails
    /// is overdue again at `until`.
    pub async fn claim_overdue(
        &self,
        overdue_before: i64,
        until: i64,
        limit: usize,
    ) -> Result<Vec<MessageRow>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let raws: Vec<RawMessage> = sqlx::query_as(concat!(
            "UPDATE messages SET next_check_at = $1
             WHERE message_id IN (
                 SELECT message_id FROM messages
                 WHERE status IN ('pending', 'resent') AND next_check_at > 0 AND next_check_at < $2
                     AND producer <> ''
                 ORDER BY next_check_at LIMIT $3)
               AND status IN ('pending', 'resent') AND next_check_at > 0 AND next_check_at < $2
             RETURNING message_id, producer, routing_key, business_key, expect, status, attempt, ",
            "scheduled_attempt, resend_count, next_check_at, last_error, published_at, first_failure_at, ",
            "created_at, updated_at"
        ))
        .bind(until)
        .bind(overdue_before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        self.committed();
        raws.into_iter().map(message_from).collect()
    }

    /// Records when the checks just republished for these open rows come due (a deferral, or a
    /// look again at an attempt another process holds): without it the sweeper would take them
    /// for lost.
    pub async fn reschedule(&self, message_ids: &[&str], next_check_at: i64) -> Result<()> {
        for ids in message_ids.chunks(CHUNK_ROWS) {
            let sql = format!(
                "UPDATE messages SET next_check_at = $1
                 WHERE status IN ('pending', 'resent') AND message_id IN ({})",
                placeholders(ids.len(), 2)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false).bind(next_check_at);
            for id in ids {
                query = query.bind(*id);
            }
            query.execute(&self.pool).await?;
            self.committed();
        }
        Ok(())
    }
}
