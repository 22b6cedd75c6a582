//! No check left behind: the rows whose check is overdue, claimed for one sweeper, and the
//! `next_check_at` of checks the reconciler republishes without an attempt of their own.

use sqlx::AssertSqlSafe;

use super::{Binds, MessageRow, RawMessage, Result, Store, message_from};

/// The one value a claim's condition binds (`$2`).
enum Bind<'a> {
    Int(i64),
    Text(&'a str),
}

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
        self.claim_open(
            "AND next_check_at > 0 AND next_check_at < $2",
            Bind::Int(overdue_before),
            until,
            limit,
        )
        .await
    }

    /// Claims up to `limit` open rows of `producer` whatever their due time (moving it to
    /// `until`) and returns them, for their CHECKs to be published now: an operator's "check now"
    /// after an outage. Soonest due first.
    pub async fn claim_producer(&self, producer: &str, until: i64, limit: usize) -> Result<Vec<MessageRow>> {
        self.claim_open("AND producer = $2", Bind::Text(producer), until, limit).await
    }

    /// The claim both share: one `UPDATE … WHERE message_id IN (SELECT … LIMIT)` that repeats its
    /// condition outside the subquery, so a row another instance moved meanwhile is skipped.
    async fn claim_open(
        &self,
        condition: &str,
        value: Bind<'_>,
        until: i64,
        limit: usize,
    ) -> Result<Vec<MessageRow>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let open = "status IN ('pending', 'resent') AND producer <> ''";
        let sql = format!(
            "UPDATE messages SET next_check_at = $1
             WHERE message_id IN (
                 SELECT message_id FROM messages WHERE {open} {condition}
                 ORDER BY next_check_at LIMIT $3)
               AND {open} {condition}
             RETURNING {}",
            super::MESSAGE_COLUMNS
        );
        let query = sqlx::query_as::<_, RawMessage>(AssertSqlSafe(sql)).bind(until);
        let query = match value {
            Bind::Int(v) => query.bind(v),
            Bind::Text(v) => query.bind(v),
        };
        let raws = query.bind(limit).fetch_all(&self.pool).await?;
        self.committed();
        raws.into_iter().map(message_from).collect()
    }

    /// Records when the checks just republished for these open rows come due (a deferral, or a
    /// look again at an attempt another process holds): without it the sweeper would take them
    /// for lost.
    pub async fn reschedule(&self, message_ids: &[&str], next_check_at: i64) -> Result<()> {
        let chunk_rows = self.chunk_rows();
        for ids in message_ids.chunks(chunk_rows) {
            let sql = format!(
                "UPDATE messages SET next_check_at = {}
                 WHERE status IN ('pending', 'resent') AND message_id IN ({})",
                Binds::shared(ids.len(), 1),
                self.binds().list(ids.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
            for id in ids {
                query = query.bind(*id);
            }
            query.bind(next_check_at).execute(&self.pool).await?;
            self.committed();
        }
        Ok(())
    }
}
