//! What operators read and change: one message with its confirms and history,
//! lists by status (with the latest reason), redrive, stats and throughput.

use std::collections::HashMap;

use recheck::message::{Outcome, now_ms};

use super::{
    ConfirmRow, MessageRow, RawMessage, Result, Status, Store, Transition, message_from, record_transition,
    select_messages,
};

/// What [`Store::counts`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    pub by_status: Vec<(Status, u64)>,
    /// Open (`pending` / `resent`) rows that have not seen their CHECK: confirmed by some
    /// consumer, maybe, but whether more are expected is known only once the CHECK comes.
    pub awaiting_check: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.by_status.iter().map(|(_, n)| n).sum()
    }
}

impl Store {
    /// A message with its confirms and its history, oldest first.
    pub async fn details(
        &self,
        message_id: &str,
    ) -> Result<Option<(MessageRow, Vec<ConfirmRow>, Vec<Transition>)>> {
        let Some(row) = self.get(message_id).await? else { return Ok(None) };
        let confirms: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
            "SELECT consumer, outcome, detail, processed_at FROM confirms WHERE message_id = $1 ORDER BY received_at",
        )
        .bind(message_id)
        .fetch_all(&self.pool)
        .await?;
        let history: Vec<(i64, Option<String>, String, i64, String)> = sqlx::query_as(
            "SELECT at, from_status, to_status, attempt, reason FROM history WHERE message_id = $1 ORDER BY id",
        )
        .bind(message_id)
        .fetch_all(&self.pool)
        .await?;
        let confirms = confirms
            .into_iter()
            .map(|(consumer, outcome, detail, processed_at)| ConfirmRow {
                consumer,
                outcome: Outcome::parse(&outcome).unwrap_or(Outcome::Processed),
                detail,
                processed_at,
            })
            .collect();
        let history = history
            .into_iter()
            .map(|(at, from, to, attempt, reason)| Transition {
                at,
                from: from.as_deref().and_then(Status::parse),
                to: Status::parse(&to).unwrap_or(Status::Pending),
                attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                reason,
            })
            .collect();
        Ok(Some((row, confirms, history)))
    }

    /// A page of messages (by id, which for UUIDv7 is creation order), optionally
    /// of one status; the second value is the id to continue after.
    pub async fn list(
        &self,
        status: Option<Status>,
        page_size: u32,
        after: &str,
    ) -> Result<(Vec<MessageRow>, Option<String>)> {
        let limit = i64::from(page_size.clamp(1, 1000));
        let raw: Vec<RawMessage> = match status {
            Some(status) => {
                sqlx::query_as(select_messages!(
                    "WHERE status = $1 AND message_id > $2 ORDER BY message_id LIMIT $3"
                ))
                .bind(status.as_str())
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as(select_messages!("WHERE message_id > $1 ORDER BY message_id LIMIT $2"))
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let rows = raw.into_iter().map(message_from).collect::<Result<Vec<_>>>()?;
        let next = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.message_id.clone())).flatten();
        Ok((rows, next))
    }

    /// `failed` / `rejected` → `pending` at a new attempt with a fresh resend
    /// budget. Returns the attempt the caller must publish a CHECK for, or
    /// `None` if the message is not in a redrivable state.
    pub async fn redrive(&self, message_id: &str) -> Result<Option<MessageRow>> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let raw: Option<RawMessage> = sqlx::query_as(select_messages!("WHERE message_id = $1"))
            .bind(message_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = raw.map(message_from).transpose()? else { return Ok(None) };
        // A row rejected before its CHECK came knows no producer to ask: its CHECK, when it
        // comes, fills that in, and only then can a redrive's CHECK name it.
        if !matches!(row.status, Status::Failed | Status::Rejected) || !row.checked() {
            return Ok(None);
        }
        let attempt = row.attempt + 1;
        let done = sqlx::query(
            // Due from now on: if its CHECK is never published, the sweeper publishes it.
            "UPDATE messages SET status = 'pending', attempt = $1, scheduled_attempt = $1, resend_count = 0,
                 first_failure_at = NULL, last_error = NULL, next_check_at = $2, updated_at = $2
             WHERE message_id = $3 AND attempt = $4 AND status = $5",
        )
        .bind(i64::from(attempt))
        .bind(now)
        .bind(message_id)
        .bind(i64::from(row.attempt))
        .bind(row.status.as_str())
        .execute(&mut *tx)
        .await?;
        // A redrive or a late confirm got in first: nothing of ours to record or publish.
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        record_transition(&mut tx, message_id, Some(row.status), Status::Pending, attempt, "redrive", now)
            .await?;
        tx.commit().await?;
        self.committed();
        self.get(message_id).await
    }

    /// Up to `limit` ids of `status` rows (failed or rejected) that a redrive can take (they have
    /// seen their CHECK), of `producer` if given, changed at or after `since` (ms); oldest first.
    pub async fn redrivable(
        &self,
        status: Status,
        producer: Option<&str>,
        since: i64,
        limit: usize,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT message_id FROM messages
             WHERE status = $1 AND producer <> '' AND ($2 = '' OR producer = $2) AND updated_at >= $3
             ORDER BY updated_at, message_id LIMIT $4",
        )
        .bind(status.as_str())
        .bind(producer.unwrap_or_default())
        .bind(since)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Row counts per status (every status, zeros included), and of the open ones how many
    /// still wait for their CHECK (known only from confirms), in one scan.
    pub async fn counts(&self) -> Result<Counts> {
        // Two queries, so neither reads the table's rows for the terminal ones: the counts per
        // status come from an index alone; `producer` is read only for the open rows. (One
        // query summing over `producer` read every row: 4 s a count at 10 M stored rows.)
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM messages GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        let open = Status::ALL.into_iter().filter(|s| !s.is_terminal()).map(|s| format!("'{}'", s.as_str()));
        let sql = format!(
            "SELECT COUNT(*) FROM messages WHERE status IN ({}) AND producer = ''",
            open.collect::<Vec<_>>().join(", ")
        );
        // The statuses are the crate's constants, not input.
        let awaiting_check: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&self.pool).await?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        let by_status = Status::ALL
            .into_iter()
            .map(|s| (s, rows.iter().find(|(name, _)| name == s.as_str()).map_or(0, |(_, count)| n(*count))))
            .collect();
        Ok(Counts { by_status, awaiting_check: n(awaiting_check) })
    }

    /// Per producer, when its oldest open (`pending` / `resent`) message was prepared (its
    /// `published_at`, ms): what the oldest-pending gauge and its alert watch. Rows still awaiting
    /// their CHECK name no producer and are left out.
    pub async fn oldest_open(&self) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT producer, MIN(published_at) FROM messages
             WHERE status IN ('pending', 'resent') AND producer <> '' GROUP BY producer",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Confirms received and resends made since `since_ms`.
    pub async fn activity_since(&self, since_ms: i64) -> Result<(u64, u64)> {
        let confirms: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM confirms WHERE received_at >= $1")
            .bind(since_ms)
            .fetch_one(&self.pool)
            .await?;
        let resends: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM history WHERE to_status = 'resent' AND at >= $1")
                .bind(since_ms)
                .fetch_one(&self.pool)
                .await?;
        Ok((u64::try_from(confirms).unwrap_or(0), u64::try_from(resends).unwrap_or(0)))
    }

    /// Confirms received and resends made per `bucket_ms` bucket from `since_ms` on, oldest
    /// first: `(bucket start, confirms, resends)`, empty buckets left out.
    pub async fn throughput(&self, since_ms: i64, bucket_ms: i64) -> Result<Vec<(i64, u64, u64)>> {
        let bucket_ms = bucket_ms.max(1);
        let confirms: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT received_at / $1, COUNT(*) FROM confirms WHERE received_at >= $2 GROUP BY 1",
        )
        .bind(bucket_ms)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        let resends: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT at / $1, COUNT(*) FROM history WHERE to_status = 'resent' AND at >= $2 GROUP BY 1",
        )
        .bind(bucket_ms)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut buckets = std::collections::BTreeMap::<i64, (u64, u64)>::new();
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        for (bucket, count) in confirms {
            buckets.entry(bucket).or_default().0 += n(count);
        }
        for (bucket, count) in resends {
            buckets.entry(bucket).or_default().1 += n(count);
        }
        Ok(buckets.into_iter().map(|(b, (c, r))| (b * bucket_ms, c, r)).collect())
    }

    /// The reason of each message's latest history row into its current status (why it is where
    /// it is: a failure's cause, a rejection's detail; a resend recorded after the message was
    /// settled does not count), for the given ids.
    pub async fn latest_reasons(&self, message_ids: &[&str]) -> Result<HashMap<String, String>> {
        if message_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let binds = self.binds().list(message_ids.len());
        let sql = format!(
            "SELECT message_id, reason FROM history WHERE id IN
             (SELECT MAX(h.id) FROM history h JOIN messages m
                  ON m.message_id = h.message_id AND m.status = h.to_status
              WHERE h.message_id IN ({binds}) GROUP BY h.message_id)"
        );
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        for id in message_ids {
            query = query.bind(*id);
        }
        let rows: Vec<(String, String)> = query.fetch_all(&self.pool).await?;
        Ok(rows.into_iter().collect())
    }
}
