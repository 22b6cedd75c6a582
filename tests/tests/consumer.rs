//! The consumer step against a real broker, on SQLite and on PostgreSQL:
//! a redelivered duplicate is absorbed (effect once, confirms `processed` then
//! `duplicate`), a rejection is confirmed as such, a failed effect is redone and applied once,
//! and a malformed message is parked with a reason. Batch by batch (`handle_batch`): the same id
//! twice in one batch, a failed effect in the middle of a batch (redone message by message, each
//! committed once), duplicates of a rejection re-confirmed `rejected`. In `consumer/effects.rs`:
//! a transient failure retried in place, never redelivered; a set-based effect with a poison
//! message in its batch.

mod common;
#[path = "consumer/effects.rs"]
mod effects;
#[path = "consumer/setup.rs"]
mod setup;

use std::time::Duration;

use common::{Drain, Store, fresh_stores, wait_for};
use lapin::types::AMQPValue;
use recheck::{
    Inbox,
    consume::BatchReport,
    message::{HEADER_PARK_REASON, Outcome},
};
use setup::{
    CountedPoints, Outcomes, Points, PointsSetup, calls_of, confirms_until, confirms_until_quiet, points_rows,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_rejections_failures_and_poison_on_both_stores() {
    for store in fresh_stores().await {
        run_consumer_cases(&store).await;
    }
}

async fn run_consumer_cases(store: &Store) {
    let label = store.label;
    let PointsSetup { _vhost, publisher, topology, channel, producer, consumer, .. } =
        PointsSetup::new(store, "points.orders", Points::failing(1)).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    let mut confirms = Drain::new(&channel, &topology.confirms_queue()).await;
    let mut outcomes = Outcomes::new();

    // A message, then the same message id again once it was confirmed (a resend after a lost confirm).
    let dup = Uuid::now_v7();
    producer.publish_business(dup, "order.created", "o-dup", b"{}", 0).await.unwrap();
    confirms_until(&mut confirms, &mut outcomes, |o| o.contains_key(&dup)).await;
    producer.publish_business(dup, "order.created", "o-dup", b"{}", 1).await.unwrap();
    confirms_until(&mut confirms, &mut outcomes, |o| o[&dup].len() == 2).await;

    // A rejection, a flaky one, and a poison message (no message id, no headers).
    let bad = Uuid::now_v7();
    producer.publish_business(bad, "order.created", "bad-1", b"{}", 0).await.unwrap();
    let flaky = Uuid::now_v7();
    producer.publish_business(flaky, "order.created", "flaky-1", b"{}", 0).await.unwrap();
    publisher
        .publish(recheck::Outgoing {
            exchange: &topology.events_exchange(),
            routing_key: "order.created",
            body: b"garbage",
            properties: lapin::BasicProperties::default(),
        })
        .await
        .unwrap();
    confirms_until(&mut confirms, &mut outcomes, |o| o.contains_key(&bad) && o.contains_key(&flaky)).await;
    let of = |id: Uuid| outcomes[&id].iter().map(|c| c.0).collect::<Vec<_>>();
    assert_eq!(of(dup), [Outcome::Processed, Outcome::Duplicate], "{label}");
    assert_eq!(outcomes[&bad], [(Outcome::Rejected, Some("no customer for bad-1".into()))], "{label}");
    assert_eq!(of(flaky), [Outcome::Processed], "{label}");
    assert_eq!(points_rows(store, "o-dup").await, 1, "{label}: duplicate applied twice");
    assert_eq!(points_rows(store, "flaky-1").await, 1, "{label}: flaky message lost or doubled");
    assert_eq!(points_rows(store, "bad-1").await, 0, "{label}: rejected message applied");
    // The inbox counts what it absorbed; the rolled-back flaky attempt left no trace.
    assert_eq!(Inbox::new("points").counts(&store.pool).await.unwrap(), (3, 1), "{label}");

    // The poison message is parked with a reason, and the consumer's queue is empty.
    let parked = Drain::new(&channel, &topology.parking_queue()).await.next(Duration::from_secs(10)).await;
    assert_eq!(parked.data, b"garbage");
    let reason =
        parked.properties.headers().as_ref().and_then(|h| h.inner().get(HEADER_PARK_REASON).cloned());
    assert!(
        matches!(&reason, Some(AMQPValue::LongString(s)) if String::from_utf8_lossy(s.as_bytes()).contains("message_id")),
        "{label}: reason {reason:?}"
    );
    wait_for("an empty consumer queue", Duration::from_secs(10), || {
        let channel = channel.clone();
        async move { (common::depth(&channel, "points.orders").await == 0).then_some(()) }
    })
    .await;

    stop.cancel();
    let report = running.await.unwrap().unwrap();
    // The flaky effect failed once, in its batch: the redo message by message applied it.
    let expected = BatchReport { processed: 2, duplicates: 1, rejected: 1, parked: 1, retried: 0 };
    assert_eq!(report, expected, "{label}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_twins_failures_and_rejections_on_both_stores() {
    for store in fresh_stores().await {
        run_batch_cases(&store).await;
    }
}

async fn run_batch_cases(store: &Store) {
    let label = store.label;
    let (effect, calls) = CountedPoints::new(Points::failing(1));
    let setup = PointsSetup::new(store, "points.batches", effect).await;
    let mut confirms = Drain::new(&setup.channel, &setup.topology.confirms_queue()).await;

    // Hands `messages` to one `handle_batch`: its report and its CONFIRMs (one outcome per id,
    // as a CONFIRM carries an id once).
    let mut batch = async |messages: &[(Uuid, &str)], queued: u32| {
        let messages: Vec<(Uuid, &str, &[u8])> =
            messages.iter().map(|(id, key)| (*id, *key, &b"{}"[..])).collect();
        let (subscription, deliveries) = setup.queued_batch(&messages, queued).await;
        let report = setup.consumer.handle_batch(deliveries, &CancellationToken::new()).await.unwrap();
        subscription.close().await;
        let outcomes = confirms_until_quiet(&mut confirms, Duration::from_millis(500)).await;
        let outcomes: std::collections::HashMap<_, _> = outcomes
            .into_iter()
            .map(|(id, mut o)| {
                assert_eq!(o.len(), 1, "{label}: id twice");
                (id, o.remove(0))
            })
            .collect();
        (report, outcomes)
    };
    let expect = |processed, duplicates, rejected| BatchReport {
        processed,
        duplicates,
        rejected,
        parked: 0,
        retried: 0,
    };
    let rejected = |key: &str| (Outcome::Rejected, Some(format!("no customer for {key}")));
    let [x, twin, bad] = [(); 3].map(|_| Uuid::now_v7());

    // The fast path: the same id twice (applied once), a rejection twice (re-confirmed `rejected`).
    let (got, outcomes) =
        batch(&[(x, "x"), (twin, "twin"), (twin, "twin"), (bad, "bad-1"), (bad, "bad-1")], 5).await;
    assert_eq!(got, expect(2, 2, 1), "{label}");
    assert_eq!(outcomes[&x], (Outcome::Processed, None), "{label}");
    assert_eq!(outcomes[&twin], (Outcome::Processed, None), "{label}");
    assert_eq!(outcomes[&bad], rejected("bad-1"), "{label}");
    assert_eq!(outcomes.len(), 3, "{label}");

    // A failure in the middle: the batch is redone message by message, each committed once.
    let [o1, twin2, flaky, o2] = [(); 4].map(|_| Uuid::now_v7());
    let messages = [(o1, "o1"), (twin2, "twin2"), (flaky, "flaky-1"), (twin2, "twin2"), (o2, "o2")];
    let (got, outcomes) = batch(&messages, 5).await;
    assert_eq!(got, expect(4, 1, 0), "{label}");
    for id in [o1, twin2, flaky, o2] {
        assert_eq!(outcomes[&id], (Outcome::Processed, None), "{label}");
    }
    for key in ["o1", "twin2", "flaky-1", "o2"] {
        assert_eq!(points_rows(store, key).await, 1, "{label}: {key}");
    }
    // Up to the failure: applied, rolled back, applied again; after it: applied once.
    let counts = ["o1", "twin2", "flaky-1", "o2"].map(|key| calls_of(&calls, key));
    assert_eq!(counts, [2, 2, 2, 1], "{label}");

    // Duplicates of earlier batches, a rejection's among them.
    let (got, outcomes) = batch(&[(bad, "bad-1"), (bad, "bad-1"), (x, "x")], 3).await;
    assert_eq!(got, expect(0, 3, 0), "{label}");
    assert_eq!(outcomes[&bad], rejected("bad-1"), "{label}: a rejection's duplicate");
    assert_eq!(outcomes[&x], (Outcome::Duplicate, None), "{label}");
    assert_eq!(points_rows(store, "bad-1").await, 0, "{label}");
    assert_eq!(Inbox::new("points").counts(&store.pool).await.unwrap(), (7, 6), "{label}");
    assert_eq!(common::depth(&setup.channel, setup.queue).await, 0, "{label}");
}
