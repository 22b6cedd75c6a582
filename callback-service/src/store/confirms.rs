//! Confirm ingest: many confirms per transaction, set-based — a handful of statements per chunk
//! of up to [`CHUNK_ROWS`] confirms, not several per confirm. A confirm before its check creates
//! the row, which then knows no `expect`: only its CHECK can settle it ([`super::settle`]).
//!
//! Per chunk: create the missing rows and lock the rest (in id order), read their status, read
//! the stored confirms of the messages that expect several consumers, upsert the confirms, decide
//! each message in memory exactly as applying its confirms one by one would ([`settling`]), move
//! the rows (one UPDATE per (from, to)), append the history. Only full chunks keep their prepared statement (one text
//! each; compiling a 1 000-row statement costs SQLite about as much as running it); partial ones
//! vary in length and would only churn the statement cache.

use std::collections::{BTreeMap, HashMap, HashSet};

use recheck::message::{Confirm, Outcome, now_ms};
use sqlx::{AnyConnection, AssertSqlSafe};

use super::{Binds, Result, Status, Store, chunk_rows, id_text, settle::Expected};

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

impl std::ops::AddAssign for IngestReport {
    fn add_assign(&mut self, other: Self) {
        self.confirms += other.confirms;
        self.confirmed += other.confirmed;
        self.recovered += other.recovered;
        self.rejected += other.rejected;
    }
}

/// One confirm of the batch, with its id as stored.
struct Item<'a> {
    id: String,
    consumer: &'a str,
    confirm: &'a Confirm,
}

/// What settles a message: a confirm, or its CHECK finding the confirms it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Settled<'a> {
    Rejected {
        consumer: &'a str,
        detail: Option<&'a str>,
    },
    Confirmed {
        consumer: &'a str,
    },
    /// The confirms came first; the CHECK's `expect` found them sufficient.
    AtCheck {
        by: String,
    },
}

impl Settled<'_> {
    pub(super) fn to(&self) -> Status {
        match self {
            Settled::Rejected { .. } => Status::Rejected,
            Settled::Confirmed { .. } | Settled::AtCheck { .. } => Status::Confirmed,
        }
    }

    fn reason(&self, from: Status) -> String {
        match (self, from) {
            (Settled::AtCheck { by }, _) => {
                format!("confirmed by {by} at its check (the confirms came first)")
            }
            (Settled::Rejected { consumer, detail }, _) => {
                format!("rejected by {consumer}: {}", detail.unwrap_or("no detail"))
            }
            (Settled::Confirmed { consumer }, Status::Failed | Status::Void | Status::Unused) => {
                format!("late confirm by {consumer} (recovered)")
            }
            (Settled::Confirmed { consumer }, _) => format!("confirmed by {consumer}"),
        }
    }
}

/// A row to move, as read under its lock.
pub(super) struct Move<'a> {
    pub(super) id: &'a str,
    pub(super) from: Status,
    pub(super) attempt: u32,
    pub(super) settled: Settled<'a>,
}

/// What a chunk needs of a `messages` row.
struct RowState {
    status: Status,
    /// Its CHECK has been seen (a CHECK always names its producer; a confirm cannot).
    checked: bool,
    expect: Option<String>,
    attempt: u32,
}

impl RowState {
    fn expected(&self) -> Expected<'_> {
        Expected::of(self.checked, self.expect.as_deref())
    }
}

impl Store {
    /// Persists a batch of confirms (consumer, confirm) in one transaction.
    pub async fn ingest_confirms(&self, batch: &[(String, Confirm)]) -> Result<IngestReport> {
        let chunk_rows = self.chunk_rows();
        let mut report = IngestReport { confirms: batch.len(), ..Default::default() };
        let now = now_ms();
        // Rows are locked in one order (message id, consumer) by every instance: two batches that
        // share ids then queue behind each other instead of deadlocking (PostgreSQL aborts one
        // of two crossed transactions, and its confirms come back later — after their checks).
        // Stable: repeats of one (id, consumer) keep their arrival order.
        let mut ordered: Vec<Item> = batch
            .iter()
            .map(|(consumer, confirm)| Item { id: id_text(confirm.message_id), consumer, confirm })
            .collect();
        ordered.sort_by(|a, b| (a.confirm.message_id, a.consumer).cmp(&(b.confirm.message_id, b.consumer)));
        let mut tx = self.begin().await?;
        // A message's confirms may straddle two chunks: the second sees what the first stored.
        for chunk in ordered.chunks(chunk_rows) {
            ingest_chunk(&mut tx, chunk, now, &mut report).await?;
        }
        tx.commit().await?;
        self.committed();
        Ok(report)
    }
}

async fn ingest_chunk(
    tx: &mut AnyConnection,
    items: &[Item<'_>],
    now: i64,
    report: &mut IngestReport,
) -> Result<()> {
    let mut ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    ids.dedup();
    insert_or_lock(tx, &ids, now).await?;
    let rows = read_rows(tx, &ids).await?;
    // Only messages expecting several consumers need the others' confirms; read before ours are
    // stored, so each of ours is judged with what came before it, as one by one.
    let expecting: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| rows[*id].expected().needs_others() && unsettled(rows[*id].status))
        .collect();
    let mut stored = read_confirms(tx, &expecting).await?;
    upsert_confirms(tx, items, now).await?;

    let mut moves = Vec::new();
    for message in items.chunk_by(|a, b| a.id == b.id) {
        let id = message[0].id.as_str();
        let row = &rows[id];
        if !unsettled(row.status) {
            continue;
        }
        let seen = stored.entry(id.to_owned()).or_default();
        if let Some(settled) = settling(message, row.expected(), seen) {
            moves.push(Move { id, from: row.status, attempt: row.attempt, settled });
        }
    }
    let moved = move_rows(tx, moves, now).await?;
    append_history(tx, &moved, now).await?;
    for m in &moved {
        match m.settled.to() {
            Status::Rejected => report.rejected += 1,
            _ => {
                report.confirmed += 1;
                if matches!(m.from, Status::Failed | Status::Void | Status::Unused) {
                    report.recovered += 1;
                }
            }
        }
    }
    Ok(())
}

/// A confirm moves any row but a confirmed or rejected one.
fn unsettled(status: Status) -> bool {
    !matches!(status, Status::Confirmed | Status::Rejected)
}

/// The first of one message's confirms (in lock order) that settles it, as storing and checking
/// them one by one finds it: a rejection settles at once; otherwise [`Expected::confirmed_by`]
/// decides (never before the CHECK). `seen` holds the consumers' stored outcomes and is updated
/// as the confirms are.
fn settling<'a>(
    message: &[Item<'a>],
    expected: Expected<'_>,
    seen: &mut HashMap<String, Outcome>,
) -> Option<Settled<'a>> {
    for item in message {
        let outcome = item.confirm.outcome;
        // The upsert: a `duplicate` never overwrites what the consumer first said.
        match seen.get_mut(item.consumer) {
            Some(stored) if *stored == Outcome::Duplicate => *stored = outcome,
            Some(_) => {}
            None => {
                seen.insert(item.consumer.to_owned(), outcome);
            }
        }
        if outcome == Outcome::Rejected {
            return Some(Settled::Rejected {
                consumer: item.consumer,
                detail: item.confirm.detail.as_deref(),
            });
        }
        if expected.confirmed_by(seen) {
            return Some(Settled::Confirmed { consumer: item.consumer });
        }
    }
    None
}

/// A row for each id that has none yet, and a lock on each that has, taken in id order in one
/// statement (PostgreSQL locks a conflicting row even when the `DO UPDATE` writes nothing). Every
/// writer that decides from a row's confirms — this ingest, another instance's, a CHECK meeting
/// its confirms — holds the row's lock while it reads them, so none decides without seeing what
/// another committed (two consumers' confirms in concurrent batches once both waited for the next
/// check), and the id order keeps two batches from deadlocking.
async fn insert_or_lock(tx: &mut AnyConnection, ids: &[&str], now: i64) -> Result<()> {
    let (chunk_rows, binds) = (chunk_rows(tx), Binds::of(tx));
    for ids in ids.chunks(chunk_rows) {
        let now_p = Binds::shared(ids.len(), 1);
        let sql = format!(
            "INSERT INTO messages (message_id, status, created_at, updated_at) VALUES {}
             ON CONFLICT (message_id) DO UPDATE SET updated_at = messages.updated_at WHERE 1 = 0",
            binds.tuples(ids.len(), &[None, Some("'pending'"), Some(&now_p), Some(&now_p)])
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(ids.len() == chunk_rows);
        for id in ids {
            query = query.bind(*id);
        }
        query.bind(now).execute(&mut *tx).await?;
    }
    Ok(())
}

/// Status, expect and attempt of every id (each has a row by now).
async fn read_rows(tx: &mut AnyConnection, ids: &[&str]) -> Result<HashMap<String, RowState>> {
    let (chunk_rows, binds) = (chunk_rows(tx), Binds::of(tx));
    let mut rows = HashMap::with_capacity(ids.len());
    for ids in ids.chunks(chunk_rows) {
        let sql = format!(
            "SELECT message_id, status, producer, expect, attempt FROM messages WHERE message_id IN ({})",
            binds.list(ids.len())
        );
        let mut query =
            sqlx::query_as::<_, (String, String, String, Option<String>, i64)>(AssertSqlSafe(sql))
                .persistent(ids.len() == chunk_rows);
        for id in ids {
            query = query.bind(*id);
        }
        let found = query.fetch_all(&mut *tx).await?;
        for (id, status, producer, expect, attempt) in found {
            let state = RowState {
                status: Status::parse(&status).unwrap_or(Status::Pending),
                checked: !producer.is_empty(),
                expect,
                attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
            };
            rows.insert(id, state);
        }
    }
    // Purged meanwhile: fail the batch, which comes back and creates the row again.
    if ids.iter().any(|id| !rows.contains_key(*id)) {
        return Err(sqlx::Error::RowNotFound.into());
    }
    Ok(rows)
}

/// Stored confirms of the given messages: message id → consumer → outcome.
pub(super) async fn read_confirms(
    tx: &mut AnyConnection,
    ids: &[&str],
) -> Result<HashMap<String, HashMap<String, Outcome>>> {
    let (chunk_rows, binds) = (chunk_rows(tx), Binds::of(tx));
    let mut stored: HashMap<String, HashMap<String, Outcome>> = HashMap::new();
    for ids in ids.chunks(chunk_rows) {
        let sql = format!(
            "SELECT message_id, consumer, outcome FROM confirms WHERE message_id IN ({})",
            binds.list(ids.len())
        );
        let mut query = sqlx::query_as::<_, (String, String, String)>(AssertSqlSafe(sql))
            .persistent(ids.len() == chunk_rows);
        for id in ids {
            query = query.bind(*id);
        }
        let found = query.fetch_all(&mut *tx).await?;
        for (id, consumer, outcome) in found {
            let outcome = Outcome::parse(&outcome).unwrap_or(Outcome::Processed);
            stored.entry(id).or_default().insert(consumer, outcome);
        }
    }
    Ok(stored)
}

/// Stores the confirms. A `duplicate` never overwrites what the consumer first said; repeats of
/// one (id, consumer) are folded the same way first (one statement may not update a row twice).
async fn upsert_confirms(tx: &mut AnyConnection, items: &[Item<'_>], now: i64) -> Result<()> {
    let (chunk_rows, binds) = (chunk_rows(tx), Binds::of(tx));
    let mut rows: Vec<&Item> = Vec::with_capacity(items.len());
    for item in items {
        match rows.last_mut() {
            Some(last) if last.id == item.id && last.consumer == item.consumer => {
                if last.confirm.outcome == Outcome::Duplicate {
                    *last = item;
                }
            }
            _ => rows.push(item),
        }
    }
    for rows in rows.chunks(chunk_rows) {
        let now_p = Binds::shared(rows.len() * 5, 1);
        let sql = format!(
            "INSERT INTO confirms (message_id, consumer, outcome, detail, processed_at, received_at)
             VALUES {}
             ON CONFLICT (message_id, consumer) DO UPDATE
             SET outcome = excluded.outcome, detail = excluded.detail, processed_at = excluded.processed_at
             WHERE confirms.outcome = 'duplicate'",
            binds.tuples(rows.len(), &[None, None, None, None, None, Some(&now_p)])
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(rows.len() == chunk_rows);
        for item in rows {
            query = query
                .bind(item.id.as_str())
                .bind(item.consumer)
                .bind(item.confirm.outcome.as_str())
                .bind(item.confirm.detail.as_deref())
                .bind(item.confirm.processed_at);
        }
        query.bind(now).execute(&mut *tx).await?;
    }
    Ok(())
}

/// Moves each row conditionally on the status it was read with, one UPDATE per (from, to).
/// Every row is locked by this transaction, so each finds the status it was read with; the
/// `status` condition and `RETURNING` only keep a history line from claiming a move that did not
/// happen. Returns the moves made, in id order.
pub(super) async fn move_rows<'a>(
    tx: &mut AnyConnection,
    moves: Vec<Move<'a>>,
    now: i64,
) -> Result<Vec<Move<'a>>> {
    let (chunk_rows, binds) = (chunk_rows(tx), Binds::of(tx));
    let mut groups: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for m in &moves {
        groups.entry((m.from.as_str(), m.settled.to().as_str())).or_default().push(m.id);
    }
    let mut moved: HashSet<String> = HashSet::with_capacity(moves.len());
    for ((from, to), ids) in groups {
        for ids in ids.chunks(chunk_rows) {
            let shared = |k| Binds::shared(ids.len(), k);
            let sql = format!(
                "UPDATE messages SET status = {}, updated_at = {}
                 WHERE status = {} AND message_id IN ({}) RETURNING message_id",
                shared(1),
                shared(2),
                shared(3),
                binds.list(ids.len())
            );
            let mut query =
                sqlx::query_scalar::<_, String>(AssertSqlSafe(sql)).persistent(ids.len() == chunk_rows);
            for id in ids {
                query = query.bind(*id);
            }
            moved.extend(query.bind(to).bind(now).bind(from).fetch_all(&mut *tx).await?);
        }
    }
    let mut done: Vec<Move> = moves.into_iter().filter(|m| moved.contains(m.id)).collect();
    done.sort_unstable_by(|a, b| a.id.cmp(b.id));
    Ok(done)
}

/// One history row per move, in id order.
pub(super) async fn append_history(tx: &mut AnyConnection, moved: &[Move<'_>], now: i64) -> Result<()> {
    let (chunk_rows, binds) = (chunk_rows(tx), Binds::of(tx));
    for moved in moved.chunks(chunk_rows) {
        let at = Binds::shared(moved.len() * 5, 1);
        let sql = format!(
            "INSERT INTO history (message_id, at, from_status, to_status, attempt, reason) VALUES {}",
            binds.tuples(moved.len(), &[None, Some(&at), None, None, None, None])
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(moved.len() == chunk_rows);
        for m in moved {
            query = query
                .bind(m.id)
                .bind(m.from.as_str())
                .bind(m.settled.to().as_str())
                .bind(i64::from(m.attempt))
                .bind(m.settled.reason(m.from));
        }
        query.bind(now).execute(&mut *tx).await?;
    }
    Ok(())
}
