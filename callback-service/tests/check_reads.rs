//! What a CHECK delivery reads before it decides: every row of the batch at once
//! (`Store::get_many`), and which rows need no write (`MessageRow::recorded_for`: the checks
//! decided in memory), on SQLite and PostgreSQL.

#[macro_use]
mod common;

use callback_service::store::{Status, Store};
use recheck::message::{Check, Confirm, Outcome, now_ms};
use uuid::Uuid;

on_both_stores!(get_many_reads_the_rows_there_are, recorded_for_is_the_read_only_case);

fn check(id: Uuid, attempt: u32) -> Check {
    Check {
        message_id: id,
        routing_key: "order.created".into(),
        business_key: "o".into(),
        attempt,
        published_at: now_ms(),
        expect: Some(vec!["points".into()]),
        traceparent: None,
        reserved: false,
    }
}

fn processed(id: Uuid) -> (String, Confirm) {
    ("points".into(), Confirm { message_id: id, outcome: Outcome::Processed, detail: None, processed_at: 1 })
}

/// More ids than one statement carries, some without a row.
async fn get_many_reads_the_rows_there_are(urls: &[String; 2]) {
    let store = Store::connect(&urls[0]).await.unwrap();
    let ids: Vec<Uuid> = (0..1500).map(|_| Uuid::now_v7()).collect();
    let confirms: Vec<_> = ids.iter().step_by(2).map(|id| processed(*id)).collect();
    store.ingest_confirms(&confirms).await.unwrap();
    store.record_check("orders", &check(ids[1], 0)).await.unwrap();

    let texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let rows = store.get_many(&texts).await.unwrap();
    assert_eq!(rows.len(), 751);
    for id in &texts {
        assert_eq!(rows.get(id), store.get(id).await.unwrap().as_ref(), "{id}");
    }
    assert!(store.get_many(&[]).await.unwrap().is_empty());
}

async fn recorded_for_is_the_read_only_case(urls: &[String; 2]) {
    let store = Store::connect(&urls[0]).await.unwrap();
    let (confirmed, complete, rejected) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    store.ingest_confirms(&[processed(confirmed)]).await.unwrap();
    store.record_check("orders", &check(complete, 0)).await.unwrap();
    let rejection = Confirm { outcome: Outcome::Rejected, ..processed(rejected).1 };
    store.ingest_confirms(&[("points".into(), rejection)]).await.unwrap();
    let row = |id: Uuid| {
        let store = &store;
        async move { store.get(&id.to_string()).await.unwrap().unwrap() }
    };

    // Known only from its confirm: pending, and its CHECK must write (it brings `expect`).
    let r = row(confirmed).await;
    assert_eq!((r.status, r.producer.as_str()), (Status::Pending, ""));
    assert!(!r.recorded_for(&check(confirmed, 0)));
    let r = store.record_check("orders", &check(confirmed, 0)).await.unwrap();
    // Confirmed (by the CHECK, which found points' confirm): read only at any attempt.
    assert_eq!((r.status, r.producer.as_str()), (Status::Confirmed, "orders"));
    assert!(r.recorded_for(&check(confirmed, 0)) && r.recorded_for(&check(confirmed, 7)));
    // Complete: read only up to its attempt; a later attempt moves the row forward.
    let r = row(complete).await;
    assert!(r.recorded_for(&check(complete, 0)));
    assert!(!r.recorded_for(&check(complete, 1)));
    // A rejected row still takes the producer fields (a redrive needs them).
    let r = row(rejected).await;
    assert_eq!(r.status, Status::Rejected);
    assert!(!r.recorded_for(&check(rejected, 0)));
    let filled = store.record_check("orders", &check(rejected, 0)).await.unwrap();
    assert_eq!((filled.status, filled.producer.as_str()), (Status::Rejected, "orders"));
    assert!(filled.recorded_for(&check(rejected, 0)));
}
