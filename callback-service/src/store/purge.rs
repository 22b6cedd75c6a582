//! Retention: terminal rows older than `--retention` and `unused` rows (reserved ids nobody used)
//! older than `--unused-retention` go with their confirms and history. One loop for both, in
//! bounded batches, each its own transaction, with a pause after each: a purge of millions of
//! rows never holds SQLite's write lock, or a long PostgreSQL transaction, in front of ingest.

use std::time::{Duration, Instant};

use sqlx::AssertSqlSafe;

use super::{Binds, Result, Store};

/// Statuses retention deletes after `--retention`.
const TERMINAL: &str = "('confirmed', 'void', 'rejected', 'failed')";

/// After each batch the purge waits this many times as long as the batch took, so it has the
/// store (SQLite's write lock, PostgreSQL's I/O, a core) at most a fifth of the time and ingest
/// keeps ≥ 0.8 of its rate meanwhile. A pause, not just a yield: a writer that found SQLite
/// locked retries on its busy handler's backoff, and would miss a lock that is free for
/// microseconds between two batches.
const PAUSE_PER_BATCH: u32 = 4;

/// The longest pause: a batch that waited long for the write lock behind ingest would otherwise
/// pause four times that wait, and a purge under steady load would crawl (a 2 s wait, 8 s of
/// nothing) and fall behind what retention must delete.
const MAX_PAUSE: Duration = Duration::from_secs(1);

impl Store {
    /// Deletes terminal messages (with their confirms and history) not touched since
    /// `before_ms`; returns how many messages.
    pub async fn purge(&self, before_ms: i64) -> Result<u64> {
        self.purge_batches(TERMINAL, before_ms).await
    }

    /// Deletes `unused` rows (with the history of a check that found one unused) not touched
    /// since `before_ms`; returns how many.
    pub async fn purge_unused(&self, before_ms: i64) -> Result<u64> {
        self.purge_batches("('unused')", before_ms).await
    }

    /// Deletes the rows in `statuses` (SQL, a constant of this file) not touched since
    /// `before_ms`, at most [`Store::chunk_rows`] per transaction, until none is left.
    async fn purge_batches(&self, statuses: &str, before_ms: i64) -> Result<u64> {
        let chunk_rows = self.chunk_rows();
        let condition = |before: &str| format!("status IN {statuses} AND updated_at < {before}");
        // In the order of the index on (status, updated_at), which a batch then reads: only the
        // rows it deletes. Unordered, PostgreSQL takes a sequential scan (nearly every old row
        // qualifies), which walks again, every batch, the rows deleted before it.
        let select = format!(
            "SELECT message_id FROM messages WHERE {} ORDER BY status, updated_at LIMIT $2",
            condition("$1")
        );
        let mut purged = 0;
        loop {
            let started = Instant::now();
            let mut tx = self.begin().await?;
            let ids: Vec<String> = sqlx::query_scalar(AssertSqlSafe(select.as_str()))
                .bind(before_ms)
                .bind(i64::try_from(chunk_rows).unwrap_or(i64::MAX))
                .fetch_all(&mut *tx)
                .await?;
            if ids.is_empty() {
                return Ok(purged);
            }
            // By id, the condition repeated (a row redriven meanwhile stays) as `IS TRUE`: as a
            // bare range SQLite's planner takes it for the way in and reads every old row, each
            // batch. A table of 1 M rows purged at 70 rows/s that way.
            let sql = format!(
                "DELETE FROM messages WHERE message_id IN ({}) AND ({}) IS TRUE RETURNING message_id",
                self.binds().list(ids.len()),
                condition(&Binds::shared(ids.len(), 1))
            );
            // Full batches repeat their statements: prepared once, kept (the last one is not).
            let full = ids.len() == chunk_rows;
            let mut query = sqlx::query_scalar(AssertSqlSafe(sql)).persistent(full);
            for id in &ids {
                query = query.bind(id.as_str());
            }
            let deleted: Vec<String> = query.bind(before_ms).fetch_all(&mut *tx).await?;
            // Gone with their message: nothing reads a confirm or a history line without it.
            for table in ["confirms", "history"].into_iter().filter(|_| !deleted.is_empty()) {
                let sql =
                    format!("DELETE FROM {table} WHERE message_id IN ({})", self.binds().list(deleted.len()));
                let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(full);
                for id in &deleted {
                    query = query.bind(id.as_str());
                }
                query.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            self.committed();
            purged += deleted.len() as u64;
            if !full {
                // The selection ran short: nothing is left.
                return Ok(purged);
            }
            tokio::time::sleep((started.elapsed() * PAUSE_PER_BATCH).min(MAX_PAUSE)).await;
        }
    }
}
