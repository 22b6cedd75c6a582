//! Reserved ids nobody used: a producer's RELEASE records them `unused` before their reserved
//! CHECKs come due (which then need no hook call), and a short retention deletes them in
//! bounded batches, so the store keeps no lasting row for them.

use recheck::message::{Check, now_ms};
use sqlx::AssertSqlSafe;

use super::{Result, Store, expect_text, id_text, placeholders, tuples};

impl Store {
    /// Records the released `checks` of `producer` as `unused`; an id with a row already (a
    /// confirm came first, so the id was used after all) keeps its row. Returns how many were new.
    pub async fn release(&self, producer: &str, checks: &[Check]) -> Result<u64> {
        let chunk_rows = self.chunk_rows();
        let now = now_ms();
        let mut tx = self.begin().await?;
        let mut released = 0;
        for chunk in checks.chunks(chunk_rows) {
            // $1 now, $2 the producer; per row: id, routing key, expect, published_at.
            let columns = [
                None,
                Some("$2"),
                None,
                Some("''"),
                None,
                Some("'unused'"),
                Some("0"),
                Some("0"),
                None,
                Some("0"),
                Some("$1"),
                Some("$1"),
            ];
            let sql = format!(
                "INSERT INTO messages (message_id, producer, routing_key, business_key, expect, status,
                     attempt, scheduled_attempt, published_at, next_check_at, created_at, updated_at)
                 VALUES {}
                 ON CONFLICT (message_id) DO NOTHING",
                tuples(chunk.len(), 3, &columns)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql))
                .persistent(chunk.len() == chunk_rows)
                .bind(now)
                .bind(producer);
            for check in chunk {
                query = query
                    .bind(id_text(check.message_id))
                    .bind(check.routing_key.as_str())
                    .bind(expect_text(&check.expect))
                    .bind(check.published_at);
            }
            released += query.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        self.committed();
        Ok(released)
    }

    /// Deletes `unused` rows (with the history of a check that found one unused) not touched
    /// since `before_ms`, at most `batch` per transaction so ingest is never stalled behind one
    /// long delete; returns how many.
    pub async fn purge_unused(&self, before_ms: i64, batch: usize) -> Result<u64> {
        let chunk_rows = self.chunk_rows();
        let limit = i64::try_from(batch.clamp(1, chunk_rows)).unwrap_or(1);
        let mut purged = 0;
        loop {
            let mut tx = self.begin().await?;
            let ids: Vec<(String,)> = sqlx::query_as(
                "SELECT message_id FROM messages WHERE status = 'unused' AND updated_at < $1 LIMIT $2",
            )
            .bind(before_ms)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            if ids.is_empty() {
                return Ok(purged);
            }
            // No confirms exist for an unused id: a confirm would have moved it on.
            for (table, also) in [("history", ""), ("messages", " AND status = 'unused'")] {
                let sql =
                    format!("DELETE FROM {table} WHERE message_id IN ({}){also}", placeholders(ids.len(), 1));
                let mut query = sqlx::query(AssertSqlSafe(sql));
                for (id,) in &ids {
                    query = query.bind(id.as_str());
                }
                let done = query.execute(&mut *tx).await?.rows_affected();
                if table == "messages" {
                    purged += done;
                }
            }
            tx.commit().await?;
            self.committed();
        }
    }
}
