//! A CHECK batch meets rows that do not know their CHECK yet: no row at all (the check came
//! first), or a row its confirms created (the usual order). One transaction records them all and
//! settles those whose stored confirms already satisfy the CHECK's `expect` ([`super::settle`]).

use std::collections::HashMap;

use recheck::message::{Check, now_ms};
use sqlx::AssertSqlSafe;

use super::{
    Binds, MessageRow, RawMessage, Result, Status, Store,
    checks::advance,
    chunk_rows,
    confirms::{Move, Settled, append_history, move_rows, read_confirms},
    expect_text, id_text, message_from, select_messages,
    settle::{Expected, confirmers},
};

impl MessageRow {
    /// Its CHECK has been seen: a CHECK always names its producer, a confirm cannot.
    pub fn checked(&self) -> bool {
        !self.producer.is_empty()
    }
}

impl Store {
    /// Records `checks` of `producer` whose rows lack their CHECK, in one transaction: the CHECK
    /// fills in what a row lacks (producer, routing key, business key, `expect`, `published_at`),
    /// moves it to the CHECK's attempt, and the stored confirms are weighed against `expect`.
    /// Returns the rows as they now stand. Rows are locked in id order, as confirm ingest locks
    /// them, so a confirm committing meanwhile is either seen here or sees this CHECK.
    pub async fn record_first_checks(
        &self,
        producer: &str,
        checks: &[&Check],
    ) -> Result<HashMap<String, MessageRow>> {
        let chunk_rows = self.chunk_rows();
        let now = now_ms();
        let mut checks: Vec<(String, &Check)> = checks.iter().map(|c| (id_text(c.message_id), *c)).collect();
        checks.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        checks.dedup_by(|a, b| a.0 == b.0);
        let mut tx = self.begin().await?;
        let mut rows = HashMap::with_capacity(checks.len());
        for chunk in checks.chunks(chunk_rows) {
            upsert(&mut tx, producer, chunk, now).await?;
            for (id, check) in chunk.iter().filter(|(_, c)| c.attempt > 0) {
                advance(&mut tx, id, check.attempt, now).await?;
            }
            let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
            let mut read = read(&mut tx, &ids).await?;
            settle(&mut tx, &mut read, now).await?;
            rows.extend(read);
        }
        tx.commit().await?;
        self.committed();
        Ok(rows)
    }
}

/// Inserts each row, or fills in a row that has not seen its CHECK (and locks it either way).
async fn upsert(
    tx: &mut sqlx::AnyConnection,
    producer: &str,
    checks: &[(String, &Check)],
    now: i64,
) -> Result<()> {
    let chunk_rows = chunk_rows(tx);
    // `next_check_at` is now: the check is being handled. Whatever it decides writes its own;
    // if it never finishes (parked, say), the row is overdue and the sweeper republishes it.
    // Per row: id, routing key, business key, expect, attempt twice, published_at; then shared:
    // now, the producer.
    let (now_p, producer_p) = (Binds::shared(checks.len() * 7, 1), Binds::shared(checks.len() * 7, 2));
    let columns = [
        None,
        Some(producer_p.as_str()),
        None,
        None,
        None,
        Some("'pending'"),
        None,
        None,
        None,
        Some(now_p.as_str()),
        Some(now_p.as_str()),
        Some(now_p.as_str()),
    ];
    let sql = format!(
        "INSERT INTO messages (message_id, producer, routing_key, business_key, expect, status, attempt,
             scheduled_attempt, published_at, next_check_at, created_at, updated_at)
         VALUES {}
         ON CONFLICT (message_id) DO UPDATE
         SET producer = excluded.producer, routing_key = excluded.routing_key,
             business_key = excluded.business_key, expect = excluded.expect,
             published_at = excluded.published_at, next_check_at = excluded.next_check_at
         WHERE messages.producer = ''",
        Binds::of(tx).tuples(checks.len(), &columns)
    );
    let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(checks.len() == chunk_rows);
    for (id, check) in checks {
        query = query
            .bind(id.as_str())
            .bind(check.routing_key.as_str())
            .bind(check.business_key.as_str())
            .bind(expect_text(&check.expect))
            .bind(i64::from(check.attempt))
            .bind(i64::from(check.attempt))
            .bind(check.published_at);
    }
    query.bind(now).bind(producer).execute(&mut *tx).await?;
    Ok(())
}

async fn read(tx: &mut sqlx::AnyConnection, ids: &[&str]) -> Result<HashMap<String, MessageRow>> {
    let chunk_rows = chunk_rows(tx);
    let sql =
        format!(concat!(select_messages!("WHERE message_id IN ("), "{})"), Binds::of(tx).list(ids.len()));
    let mut query = sqlx::query_as::<_, RawMessage>(AssertSqlSafe(sql)).persistent(ids.len() == chunk_rows);
    for id in ids {
        query = query.bind(*id);
    }
    let mut rows = HashMap::with_capacity(ids.len());
    for raw in query.fetch_all(&mut *tx).await? {
        let row = message_from(raw)?;
        rows.insert(row.message_id.clone(), row);
    }
    Ok(rows)
}

/// Confirms the open rows whose stored confirms satisfy their `expect` now that it is known.
async fn settle(
    tx: &mut sqlx::AnyConnection,
    rows: &mut HashMap<String, MessageRow>,
    now: i64,
) -> Result<()> {
    let open: Vec<&str> =
        rows.values().filter(|r| !r.status.is_terminal()).map(|r| r.message_id.as_str()).collect();
    if open.is_empty() {
        return Ok(());
    }
    let stored = read_confirms(tx, &open).await?;
    let moves: Vec<Move> = stored
        .iter()
        .filter_map(|(id, seen)| {
            let row = &rows[id];
            let expect = row.expect.as_ref().map(|e| e.join(","));
            Expected::of(row.checked(), expect.as_deref()).confirmed_by(seen).then(|| Move {
                id: id.as_str(),
                from: row.status,
                attempt: row.attempt,
                settled: Settled::AtCheck { by: confirmers(seen) },
            })
        })
        .collect();
    let moved = move_rows(tx, moves, now).await?;
    append_history(tx, &moved, now).await?;
    let confirmed: Vec<String> = moved.iter().map(|m| m.id.to_owned()).collect();
    for id in confirmed {
        if let Some(row) = rows.get_mut(&id) {
            row.status = Status::Confirmed;
            row.updated_at = now;
        }
    }
    Ok(())
}
