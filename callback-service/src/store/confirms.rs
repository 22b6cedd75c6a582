//! Confirm ingest: many confirms per transaction. A confirm before its check
//! creates the row; `expect` decides when a message counts as confirmed.

use recheck::message::{Confirm, Outcome, now_ms};
use sqlx::AnyConnection;

use super::{Result, Status, Store, id_text, record_transition};

/// What one ingest transaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IngestReport {
    pub confirms: usize,
    /// Messages that became `confirmed` (from pending, resent, failed or void).
    pub confirmed: usize,
    /// Of those, messages that had already `failed` or been declared `void`.
    pub recovered: usize,
    pub rejected: usize,
}

impl Store {
    /// Persists a batch of confirms (consumer, confirm) in one transaction.
    pub async fn ingest_confirms(&self, batch: &[(String, Confirm)]) -> Result<IngestReport> {
        let mut report = IngestReport { confirms: batch.len(), ..Default::default() };
        let now = now_ms();
        let mut tx = self.begin().await?;
        // Rows are locked in one order (message id, consumer) by every instance: two batches that
        // share ids then queue behind each other instead of deadlocking (PostgreSQL aborts one
        // of two crossed transactions, and its confirms come back later — after their checks).
        let mut ordered: Vec<&(String, Confirm)> = batch.iter().collect();
        ordered.sort_unstable_by(|a, b| (a.1.message_id, &a.0).cmp(&(b.1.message_id, &b.0)));
        for (consumer, confirm) in ordered {
            apply_confirm(&mut tx, consumer, confirm, now, &mut report).await?;
        }
        tx.commit().await?;
        self.committed();
        Ok(report)
    }
}

async fn apply_confirm(
    tx: &mut AnyConnection,
    consumer: &str,
    confirm: &Confirm,
    now: i64,
    report: &mut IngestReport,
) -> Result<()> {
    let id = id_text(confirm.message_id);
    // A `duplicate` never overwrites what the consumer first said.
    sqlx::query(
        "INSERT INTO confirms (message_id, consumer, outcome, detail, processed_at, received_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (message_id, consumer) DO UPDATE
         SET outcome = excluded.outcome, detail = excluded.detail, processed_at = excluded.processed_at
         WHERE confirms.outcome = 'duplicate'",
    )
    .bind(&id)
    .bind(consumer)
    .bind(confirm.outcome.as_str())
    .bind(confirm.detail.as_deref())
    .bind(confirm.processed_at)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO messages (message_id, status, created_at, updated_at) VALUES ($1, 'pending', $2, $2)
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(&id)
    .bind(now)
    .execute(&mut *tx)
    .await?;

    // The status is read, then moved conditionally on it. On PostgreSQL a check's outcome may
    // commit in between (pending → resent): then the UPDATE matches nothing and we read again.
    let mut tries = 0;
    let (from, to, reason, attempt) = loop {
        tries += 1;
        let (status, expect, attempt): (String, Option<String>, i64) =
            sqlx::query_as("SELECT status, expect, attempt FROM messages WHERE message_id = $1")
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?;
        let from = Status::parse(&status).unwrap_or(Status::Pending);
        if matches!(from, Status::Confirmed | Status::Rejected) {
            return Ok(());
        }
        let (to, reason) = if confirm.outcome == Outcome::Rejected {
            let detail = confirm.detail.as_deref().unwrap_or("no detail");
            (Status::Rejected, format!("rejected by {consumer}: {detail}"))
        } else if all_expected_confirmed(tx, &id, expect.as_deref()).await? {
            let reason = match from {
                Status::Failed | Status::Void => format!("late confirm by {consumer} (recovered)"),
                _ => format!("confirmed by {consumer}"),
            };
            (Status::Confirmed, reason)
        } else {
            return Ok(());
        };
        let moved = sqlx::query(
            "UPDATE messages SET status = $1, updated_at = $2 WHERE message_id = $3 AND status = $4",
        )
        .bind(to.as_str())
        .bind(now)
        .bind(&id)
        .bind(from.as_str())
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() == 1 {
            break (from, to, reason, attempt);
        }
        if tries == 3 {
            // Settled elsewhere meanwhile; the confirm row is stored either way.
            return Ok(());
        }
    };
    let attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
    record_transition(tx, &id, Some(from), to, attempt, &reason, now).await?;
    match to {
        Status::Rejected => report.rejected += 1,
        _ => {
            report.confirmed += 1;
            if matches!(from, Status::Failed | Status::Void) {
                report.recovered += 1;
            }
        }
    }
    Ok(())
}

/// `expect` absent: any confirm suffices. Otherwise every named consumer must
/// have confirmed (processed or duplicate).
async fn all_expected_confirmed(tx: &mut AnyConnection, id: &str, expect: Option<&str>) -> Result<bool> {
    let Some(expect) = expect.filter(|e| !e.is_empty()) else {
        return Ok(true);
    };
    let confirmed: Vec<String> =
        sqlx::query_scalar("SELECT consumer FROM confirms WHERE message_id = $1 AND outcome <> 'rejected'")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
    Ok(expect.split(',').all(|want| confirmed.iter().any(|c| c == want)))
}
