//! Set-based confirm ingest (`Store::ingest_confirms`) on SQLite and PostgreSQL: one batch of
//! mixed cases ends exactly as its confirms applied one by one in lock order (message id,
//! consumer) — same statuses, confirms, history and counts.

#[macro_use]
mod common;

use callback_service::store::{AttemptOutcome, IngestReport, Status, Store};
use recheck::message::{Check, Confirm, Outcome, now_ms};
use uuid::Uuid;

on_both_stores!(a_mixed_batch_ends_as_one_by_one, a_batch_bigger_than_a_chunk_settles_every_message);

fn check(id: Uuid, expect: &[&str]) -> Check {
    Check {
        message_id: id,
        routing_key: "order.created".into(),
        business_key: "o".into(),
        attempt: 0,
        published_at: now_ms(),
        expect: (!expect.is_empty()).then(|| expect.iter().map(|c| c.to_string()).collect()),
        traceparent: None,
        reserved: false,
    }
}

fn confirm(consumer: &str, id: Uuid, outcome: Outcome, detail: Option<&str>) -> (String, Confirm) {
    let confirm = Confirm { message_id: id, outcome, detail: detail.map(str::to_owned), processed_at: 1 };
    (consumer.to_owned(), confirm)
}

/// The messages of [`a_mixed_batch_ends_as_one_by_one`], by case.
struct Ids {
    before_row: Uuid,
    two_expected: Uuid,
    one_of_two: Uuid,
    rejected: Uuid,
    late_on_failed: Uuid,
    late_on_void: Uuid,
    repeated: Uuid,
    confirmed: Uuid,
    duplicate_stored: Uuid,
    duplicate_then_rejected: Uuid,
    rejected_first: Uuid,
    stored_rejection: Uuid,
}

/// The rows as they stand before the batch.
async fn prepare(store: &Store, ids: &Ids) {
    for (id, expect) in [
        (ids.two_expected, &["points", "audit"][..]),
        (ids.one_of_two, &["points", "audit"]),
        (ids.rejected, &[]),
        (ids.late_on_failed, &[]),
        (ids.late_on_void, &[]),
        (ids.duplicate_stored, &["points", "audit"]),
        (ids.duplicate_then_rejected, &["audit", "points"]),
        (ids.stored_rejection, &["points", "audit"]),
    ] {
        store.record_check("orders", &check(id, expect)).await.unwrap();
    }
    for (id, status) in [(ids.late_on_failed, Status::Failed), (ids.late_on_void, Status::Void)] {
        assert_eq!(store.claim(&id.to_string(), 0).await.unwrap(), Some(0));
        let outcome = AttemptOutcome::Terminal { status, reason: "test".into() };
        assert!(store.finish(&id.to_string(), 1, &outcome).await.unwrap());
    }
    let earlier = [
        confirm("points", ids.confirmed, Outcome::Processed, None),
        confirm("audit", ids.duplicate_stored, Outcome::Duplicate, None),
        confirm("points", ids.duplicate_then_rejected, Outcome::Duplicate, None),
        confirm("audit", ids.stored_rejection, Outcome::Rejected, Some("earlier")),
    ];
    store.ingest_confirms(&earlier).await.unwrap();
    // Redriven: pending again, audit's rejection still stored.
    store.redrive(&ids.stored_rejection.to_string()).await.unwrap().unwrap();
}

fn batch(ids: &Ids) -> Vec<(String, Confirm)> {
    use Outcome::{Duplicate, Processed, Rejected};
    vec![
        // A confirm before the check, its duplicate first: the processed one replaces it.
        confirm("points", ids.before_row, Duplicate, None),
        confirm("points", ids.before_row, Processed, None),
        // Both expected consumers: confirmed by the second in lock order.
        confirm("points", ids.two_expected, Processed, None),
        confirm("audit", ids.two_expected, Processed, None),
        confirm("points", ids.one_of_two, Processed, None),
        confirm("points", ids.rejected, Rejected, Some("no such customer")),
        confirm("points", ids.late_on_failed, Processed, None),
        confirm("points", ids.late_on_void, Duplicate, None),
        // The same id in two CONFIRM messages of the batch.
        confirm("points", ids.repeated, Processed, None),
        confirm("points", ids.repeated, Processed, None),
        confirm("points", ids.confirmed, Duplicate, None),
        confirm("points", ids.duplicate_stored, Processed, None),
        // audit comes first: with points' stored duplicate that confirms, before points' rejection
        // (which still replaces the stored duplicate).
        confirm("points", ids.duplicate_then_rejected, Rejected, Some("changed its mind")),
        confirm("audit", ids.duplicate_then_rejected, Processed, None),
        confirm("points", ids.rejected_first, Processed, None),
        confirm("audit", ids.rejected_first, Rejected, None),
        // A stored rejection is never overwritten, so points alone does not confirm.
        confirm("points", ids.stored_rejection, Processed, None),
        confirm("audit", ids.stored_rejection, Processed, None),
    ]
}

/// Everything the store holds about one message: status, attempt, confirms, history.
async fn state(store: &Store, id: Uuid) -> String {
    let (row, mut confirms, history) = store.details(&id.to_string()).await.unwrap().unwrap();
    confirms.sort_by(|a, b| a.consumer.cmp(&b.consumer));
    let confirms: Vec<_> = confirms.iter().map(|c| (&c.consumer, c.outcome, &c.detail)).collect();
    let history: Vec<_> = history.iter().map(|t| (t.from, t.to, t.attempt, &t.reason)).collect();
    format!("{:?} attempt {} confirms {confirms:?} history {history:?}", row.status, row.attempt)
}

async fn a_mixed_batch_ends_as_one_by_one(urls: &[String; 2]) {
    let ids = Ids {
        before_row: Uuid::now_v7(),
        two_expected: Uuid::now_v7(),
        one_of_two: Uuid::now_v7(),
        rejected: Uuid::now_v7(),
        late_on_failed: Uuid::now_v7(),
        late_on_void: Uuid::now_v7(),
        repeated: Uuid::now_v7(),
        confirmed: Uuid::now_v7(),
        duplicate_stored: Uuid::now_v7(),
        duplicate_then_rejected: Uuid::now_v7(),
        rejected_first: Uuid::now_v7(),
        stored_rejection: Uuid::now_v7(),
    };
    let (batched, single) =
        (Store::connect(&urls[0]).await.unwrap(), Store::connect(&urls[1]).await.unwrap());
    prepare(&batched, &ids).await;
    prepare(&single, &ids).await;
    let batch = batch(&ids);

    let before = batched.transactions();
    let report = batched.ingest_confirms(&batch).await.unwrap();
    assert_eq!(batched.transactions(), before + 1, "one transaction for the batch");
    // before_row and repeated have no CHECK yet: stored, not confirmed.
    assert_eq!(report, IngestReport { confirms: batch.len(), confirmed: 5, recovered: 2, rejected: 2 });

    // The reference: each confirm alone, in lock order (stable: repeats keep batch order).
    let mut ordered = batch.clone();
    ordered.sort_by(|a, b| (a.1.message_id, &a.0).cmp(&(b.1.message_id, &b.0)));
    let mut summed = IngestReport::default();
    for one in &ordered {
        let r = single.ingest_confirms(std::slice::from_ref(one)).await.unwrap();
        summed.confirms += r.confirms;
        summed.confirmed += r.confirmed;
        summed.recovered += r.recovered;
        summed.rejected += r.rejected;
    }
    assert_eq!(summed, report);

    let mut all: Vec<Uuid> = batch.iter().map(|(_, c)| c.message_id).collect();
    all.dedup();
    for id in all {
        let got = state(&batched, id).await;
        assert_eq!(got, state(&single, id).await, "message {id}");
    }

    // And what one by one means, spelled out for the subtle cases.
    let row = |id: Uuid| {
        let batched = &batched;
        async move { batched.details(&id.to_string()).await.unwrap().unwrap() }
    };
    let (before_row, confirms, history) = row(ids.before_row).await;
    assert_eq!((before_row.status, history.len()), (Status::Pending, 0), "confirmed before its CHECK");
    assert!(before_row.awaiting_check());
    assert_eq!(confirms[0].outcome, Outcome::Processed, "a duplicate was kept over the processed");
    let last_reason = |h: &[callback_service::store::Transition]| h.last().map(|t| t.reason.clone());
    assert_eq!(last_reason(&row(ids.two_expected).await.2).as_deref(), Some("confirmed by points"));
    assert_eq!(row(ids.one_of_two).await.0.status, Status::Pending);
    assert_eq!(
        last_reason(&row(ids.rejected).await.2).as_deref(),
        Some("rejected by points: no such customer")
    );
    for id in [ids.late_on_failed, ids.late_on_void] {
        let (r, _, history) = row(id).await;
        assert_eq!(r.status, Status::Confirmed);
        assert_eq!(last_reason(&history).as_deref(), Some("late confirm by points (recovered)"));
    }
    let (repeated, _, history) = row(ids.repeated).await;
    assert_eq!((repeated.status, history.len()), (Status::Pending, 0));
    assert_eq!(row(ids.confirmed).await.0.status, Status::Pending, "confirmed before its CHECK");
    assert_eq!(last_reason(&row(ids.duplicate_stored).await.2).as_deref(), Some("confirmed by points"));
    let (r, confirms, history) = row(ids.duplicate_then_rejected).await;
    assert_eq!((r.status, last_reason(&history).as_deref()), (Status::Confirmed, Some("confirmed by audit")));
    assert!(confirms.iter().any(|c| c.consumer == "points" && c.outcome == Outcome::Rejected));
    // A rejection needs no CHECK: it settles in any order.
    assert_eq!(row(ids.rejected_first).await.0.status, Status::Rejected);
    assert_eq!(row(ids.stored_rejection).await.0.status, Status::Pending);

    // The CHECKs come: they weigh the confirms stored meanwhile, in one transaction.
    let first = [
        check(ids.before_row, &[]),
        check(ids.repeated, &["points"]),
        check(ids.confirmed, &["points", "audit"]),
    ];
    let before = batched.transactions();
    let rows = batched.record_first_checks("orders", &first.iter().collect::<Vec<_>>()).await.unwrap();
    assert_eq!(batched.transactions(), before + 1, "one transaction for the CHECK batch");
    let status = |id: Uuid| rows[&id.to_string()].status;
    assert_eq!((status(ids.before_row), status(ids.repeated)), (Status::Confirmed, Status::Confirmed));
    assert_eq!(status(ids.confirmed), Status::Pending, "audit is expected too and never confirmed");
    assert!(rows.values().all(|r| r.checked() && r.producer == "orders" && !r.awaiting_check()));
    assert_eq!(
        last_reason(&row(ids.before_row).await.2).as_deref(),
        Some("confirmed by points at its check (the confirms came first)")
    );
    assert_eq!(row(ids.before_row).await.2.len(), 1);
}

/// More confirms than one statement carries: messages of three expected consumers straddle the
/// chunk boundaries, and each ends confirmed once, by its last consumer.
async fn a_batch_bigger_than_a_chunk_settles_every_message(urls: &[String; 2]) {
    let store = Store::connect(&urls[0]).await.unwrap();
    let ids: Vec<Uuid> = (0..700).map(|_| Uuid::now_v7()).collect();
    let consumers = ["a", "b", "c"];
    for id in &ids[..350] {
        store.record_check("orders", &check(*id, &consumers)).await.unwrap();
    }
    let mut batch = Vec::new();
    for consumer in consumers {
        batch.extend(ids.iter().map(|id| confirm(consumer, *id, Outcome::Processed, None)));
    }
    let report = store.ingest_confirms(&batch).await.unwrap();
    // The second half has no CHECK yet: its CHECK confirms it, below.
    assert_eq!(report, IngestReport { confirms: 2100, confirmed: 350, recovered: 0, rejected: 0 });
    let later: Vec<Check> = ids[350..].iter().map(|id| check(*id, &[])).collect();
    let rows = store.record_first_checks("orders", &later.iter().collect::<Vec<_>>()).await.unwrap();
    assert_eq!(rows.len(), 350);
    for (i, id) in ids.iter().enumerate() {
        let (row, confirms, history) = store.details(&id.to_string()).await.unwrap().unwrap();
        assert_eq!((row.status, confirms.len(), history.len()), (Status::Confirmed, 3, 1), "message {id}");
        // With `expect` the last consumer confirms; without it, the CHECK, naming them all.
        let reason = if i < 350 {
            "confirmed by c"
        } else {
            "confirmed by a, b, c at its check (the confirms came first)"
        };
        assert_eq!(history[0].reason, reason);
    }
}
