//! The store alone: retention deletes old terminal rows in bounded batches, with their confirms
//! and history, and leaves open rows whatever their age.

use recheck::message::{Check, Confirm, Outcome, now_ms};
use uuid::Uuid;

use callback_service::store::Status;

on_both_stores!(retention_purges_only_old_terminal_rows);

/// More rows than any store's purge batch (1 000 on PostgreSQL, 100 on SQLite): every old
/// terminal row goes with its confirms and history, batch after batch; open rows stay whatever
/// their age, with theirs; `unused` ones go only with their own purge.
async fn retention_purges_only_old_terminal_rows(url: &str) {
    const DONE: usize = 2_500;
    let store = callback_service::store::Store::connect(url).await.unwrap();
    let ids = |n: usize| (0..n).map(|_| Uuid::now_v7()).collect::<Vec<_>>();
    let (done, open, unused) = (ids(DONE), ids(20), ids(150));
    let confirm = |consumer: &str, id: Uuid| {
        let confirm =
            Confirm { message_id: id, outcome: Outcome::Processed, detail: None, processed_at: now_ms() };
        (consumer.to_owned(), confirm)
    };
    // Two consumers confirm each `done` message, one each `open` one; then the CHECKs: `done`
    // expects any one (confirmed), `open` both (pending).
    let confirms: Vec<(String, Confirm)> = done
        .iter()
        .flat_map(|&id| [confirm("points", id), confirm("stock", id)])
        .chain(open.iter().map(|&id| confirm("points", id)))
        .collect();
    store.ingest_confirms(&confirms).await.unwrap();
    let checks: Vec<Check> = done
        .iter()
        .map(|&id| recheck_tests::first_check(id, &[]))
        .chain(open.iter().map(|&id| recheck_tests::first_check(id, &["points", "stock"])))
        .collect();
    store.record_first_checks("orders", &checks.iter().collect::<Vec<_>>()).await.unwrap();
    let released: Vec<Check> = unused.iter().map(|&id| recheck_tests::first_check(id, &[])).collect();
    assert_eq!(store.release("orders", &released).await.unwrap(), unused.len() as u64);
    let pool = store.pool();
    let count = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.unwrap() as usize
    };
    assert_eq!(count("SELECT COUNT(*) FROM messages WHERE status = 'confirmed'").await, DONE);
    let of_done = "SELECT COUNT(*) FROM confirms WHERE message_id IN
                   (SELECT message_id FROM messages WHERE status = 'confirmed')";
    assert!(count(of_done).await >= DONE, "no confirms to purge");
    // Confirms and history lines whose message is gone.
    let orphans = "SELECT (SELECT COUNT(*) FROM confirms WHERE message_id NOT IN (SELECT message_id FROM messages))
                        + (SELECT COUNT(*) FROM history WHERE message_id NOT IN (SELECT message_id FROM messages))";

    assert_eq!(store.purge(now_ms() - 60_000).await.unwrap(), 0, "a fresh row was purged");
    let transactions = store.transactions();
    assert_eq!(store.purge(now_ms() + 1).await.unwrap(), DONE as u64);
    assert!(store.transactions() - transactions >= 3, "one long transaction, not bounded batches");
    assert_eq!(count(orphans).await, 0);
    assert!(store.details(&done[0].to_string()).await.unwrap().is_none());
    for id in &open {
        let (row, confirms, _) = store.details(&id.to_string()).await.unwrap().expect("open row purged");
        assert_eq!((row.status, confirms.len()), (Status::Pending, 1), "{id}");
    }
    assert_eq!(count("SELECT COUNT(*) FROM messages WHERE status = 'unused'").await, unused.len());

    assert_eq!(store.purge_unused(now_ms() + 1).await.unwrap(), unused.len() as u64);
    assert_eq!(count("SELECT COUNT(*) FROM messages").await, open.len(), "only the open rows are left");
    assert_eq!(count(orphans).await, 0);
}
