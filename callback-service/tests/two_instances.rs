//! Two callback instances on one PostgreSQL store, concurrently: each decides from a message's
//! confirms while holding the row's lock, so no instance decides without what the other committed.
//! Without the lock, two consumers' confirms ingested at once on two instances each see only
//! their own, and the message waits for its next check (an avoidable resend); and a CHECK meeting
//! its confirms misses one committing beside it.

use std::sync::Arc;

use callback_service::store::{Status, Store};
use recheck::message::{Check, Confirm, Outcome};
use uuid::Uuid;

const MESSAGES: usize = 3_000;
/// Confirms per ingest batch, as a CONFIRM micro-batch brings them.
const BATCH: usize = 100;

fn confirms(consumer: &str, ids: &[Uuid]) -> Vec<(String, Confirm)> {
    let confirm =
        |id: &Uuid| Confirm { message_id: *id, outcome: Outcome::Processed, detail: None, processed_at: 1 };
    ids.iter().map(|id| (consumer.to_owned(), confirm(id))).collect()
}

async fn two_stores() -> (Arc<Store>, Arc<Store>) {
    let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
    let one = Arc::new(Store::connect(&db.url).await.unwrap());
    let two = Arc::new(Store::connect(&db.url).await.unwrap());
    (one, two)
}

/// Ingests `consumer`'s confirms of every id on `store`, batch by batch.
fn ingest(store: &Arc<Store>, consumer: &'static str, ids: &Arc<Vec<Uuid>>) -> tokio::task::JoinHandle<()> {
    let (store, ids) = (store.clone(), ids.clone());
    tokio::spawn(async move {
        for chunk in ids.chunks(BATCH) {
            store.ingest_confirms(&confirms(consumer, chunk)).await.unwrap();
        }
    })
}

async fn not_confirmed(store: &Store, ids: &[Uuid]) -> Vec<String> {
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let rows = store.get_many(&ids).await.unwrap();
    ids.into_iter().filter(|id| rows.get(id).is_none_or(|r| r.status != Status::Confirmed)).collect()
}

/// The CHECKs are known; `a`'s confirms go to one instance and `b`'s to the other at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_confirming_on_two_instances_confirm_every_message() {
    let (one, two) = two_stores().await;
    let ids: Arc<Vec<Uuid>> = Arc::new((0..MESSAGES).map(|_| Uuid::now_v7()).collect());
    let checks: Vec<Check> = ids.iter().map(|id| recheck_tests::first_check(*id, &["a", "b"])).collect();
    for chunk in checks.chunks(1000) {
        one.record_first_checks("orders", &chunk.iter().collect::<Vec<_>>()).await.unwrap();
    }
    let (a, b) = (ingest(&one, "a", &ids), ingest(&two, "b", &ids));
    a.await.unwrap();
    b.await.unwrap();
    let left = not_confirmed(&one, &ids).await;
    assert!(
        left.is_empty(),
        "{} of {MESSAGES} not confirmed (each costs a resend), e.g. {:?}",
        left.len(),
        &left[..left.len().min(3)]
    );
}

/// Confirms of both consumers arrive while the CHECKs are taken on the other instance: every
/// message ends confirmed, whichever came first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_meeting_confirms_on_another_instance_confirm_every_message() {
    let (one, two) = two_stores().await;
    let ids: Arc<Vec<Uuid>> = Arc::new((0..MESSAGES).map(|_| Uuid::now_v7()).collect());
    let a = ingest(&one, "a", &ids);
    let b = ingest(&one, "b", &ids);
    let checks = {
        let (two, ids) = (two.clone(), ids.clone());
        tokio::spawn(async move {
            let checks: Vec<Check> =
                ids.iter().map(|id| recheck_tests::first_check(*id, &["a", "b"])).collect();
            for chunk in checks.chunks(BATCH) {
                two.record_first_checks("orders", &chunk.iter().collect::<Vec<_>>()).await.unwrap();
            }
        })
    };
    a.await.unwrap();
    b.await.unwrap();
    checks.await.unwrap();
    let left = not_confirmed(&one, &ids).await;
    assert!(
        left.is_empty(),
        "{} of {MESSAGES} not confirmed, e.g. {:?}",
        left.len(),
        &left[..left.len().min(3)]
    );
}
