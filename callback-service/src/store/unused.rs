//! Reserved ids nobody used: a producer's RELEASE records them `unused` before their reserved
//! CHECKs come due (which then need no hook call), and a short retention deletes them in
//! bounded batches, so the store keeps no lasting row for them.

use recheck::message::{Check, now_ms};
use sqlx::AssertSqlSafe;

use super::{Result, Store, expect_text, id_text, tuples};

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
}
