//! Reserved ids nobody used: a producer's RELEASE records them `unused` before their reserved
//! CHECKs come due (which then need no hook call), and a short retention deletes them in
//! bounded batches, so the store keeps no lasting row for them.

use recheck::message::{Check, now_ms};
use sqlx::AssertSqlSafe;

use super::{Binds, Result, Store, expect_text, id_text};

impl Store {
    /// Records the released `checks` of `producer` as `unused`; an id with a row already (a
    /// confirm came first, so the id was used after all) keeps its row. Returns how many were new.
    pub async fn release(&self, producer: &str, checks: &[Check]) -> Result<u64> {
        let chunk_rows = self.chunk_rows();
        let now = now_ms();
        let mut tx = self.begin().await?;
        let mut released = 0;
        for chunk in checks.chunks(chunk_rows) {
            // Per row: id, routing key, expect, published_at; then shared: now, the producer.
            let (now_p, producer_p) = (Binds::shared(chunk.len() * 4, 1), Binds::shared(chunk.len() * 4, 2));
            let columns = [
                None,
                Some(producer_p.as_str()),
                None,
                Some("''"),
                None,
                Some("'unused'"),
                Some("0"),
                Some("0"),
                None,
                Some("0"),
                Some(now_p.as_str()),
                Some(now_p.as_str()),
            ];
            let sql = format!(
                "INSERT INTO messages (message_id, producer, routing_key, business_key, expect, status,
                     attempt, scheduled_attempt, published_at, next_check_at, created_at, updated_at)
                 VALUES {}
                 ON CONFLICT (message_id) DO NOTHING",
                self.binds().tuples(chunk.len(), &columns)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(chunk.len() == chunk_rows);
            for check in chunk {
                query = query
                    .bind(id_text(check.message_id))
                    .bind(check.routing_key.as_str())
                    .bind(expect_text(&check.expect))
                    .bind(check.published_at);
            }
            released += query.bind(now).bind(producer).execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        self.committed();
        Ok(released)
    }
}
