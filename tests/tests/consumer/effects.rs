//! How failed effects end. A transient failure is retried in place — the delivery held unacked,
//! tried again after a growing delay — never handed back to the broker (which would count toward
//! the delivery limit before RabbitMQ 4.3, and loop hot from 4.3); at shutdown it is handed back.
//! A set-based effect ([`Effect::apply_batch`]) writes a batch in one statement; when one poison
//! message fails that statement, only that message is parked and the rest applied once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use lapin::types::AMQPValue;
use recheck::{
    Applied, Effect, Incoming, Transient,
    consume::BatchReport,
    db::Binds,
    message::{HEADER_PARK_REASON, Outcome},
};
use sqlx::{AnyConnection, AssertSqlSafe};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    common::{self, Drain, Store, fresh_stores, wait_for},
    setup::{
        CountedPoints, Outcomes, Points, PointsSetup, calls_of, confirms_until, confirms_until_quiet,
        points_rows,
    },
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_in_place_never_redelivered() {
    for store in fresh_stores().await {
        transient_in_place(&store).await;
    }
}

async fn transient_in_place(store: &Store) {
    let label = store.label;
    // `flaky-*` fails until released.
    let points = Points::failing(usize::MAX);
    let failures = points.failures.clone();
    let (effect, calls) = CountedPoints::new(points);
    let PointsSetup { _vhost, topology, channel, producer, consumer, queue, .. } =
        PointsSetup::new(store, "points.transient", effect).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    let mut confirms = Drain::new(&channel, &topology.confirms_queue()).await;
    let mut outcomes = Outcomes::new();

    // Failing: its batch, its redo alone, then tries in place.
    let flaky = Uuid::now_v7();
    producer.publish_business(flaky, "order.created", "flaky-1", b"{}", 0).await.unwrap();
    wait_for("tries in place", Duration::from_secs(20), || async {
        (calls_of(&calls, "flaky-1") >= 4).then_some(())
    })
    .await;
    // The loop goes on meanwhile: a later message is processed while the first is held.
    let ok = Uuid::now_v7();
    producer.publish_business(ok, "order.created", "ok-1", b"{}", 0).await.unwrap();
    confirms_until(&mut confirms, &mut outcomes, |o| o.contains_key(&ok)).await;
    assert!(!outcomes.contains_key(&flaky), "{label}: confirmed while failing");
    assert_eq!(points_rows(store, "flaky-1").await, 0, "{label}");

    // Released: the next try succeeds, once.
    failures.store(0, Ordering::SeqCst);
    confirms_until(&mut confirms, &mut outcomes, |o| o.contains_key(&flaky)).await;
    assert_eq!(outcomes[&flaky], [(Outcome::Processed, None)], "{label}");
    assert_eq!(points_rows(store, "flaky-1").await, 1, "{label}");
    let tries: Vec<_> = calls.lock().unwrap().iter().filter(|c| c.key == "flaky-1").cloned().collect();
    assert!(tries.iter().all(|c| !c.redelivered), "{label}: the broker redelivered it: {tries:?}");
    // Tries in place (after the batch and its redo) wait at least 100 ms between them: no hot loop.
    for pair in tries[1..].windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(100),
            "{label}: tries {gap:?} apart: {:?}",
            tries.iter().map(|c| c.at - tries[0].at).collect::<Vec<_>>()
        );
    }

    // Failing at shutdown: handed back to the queue, not parked.
    failures.store(usize::MAX, Ordering::SeqCst);
    let stuck = Uuid::now_v7();
    producer.publish_business(stuck, "order.created", "flaky-2", b"{}", 0).await.unwrap();
    wait_for("a held delivery", Duration::from_secs(20), || async {
        (calls_of(&calls, "flaky-2") >= 3).then_some(())
    })
    .await;
    stop.cancel();
    let report = running.await.unwrap().unwrap();
    assert_eq!(
        report,
        BatchReport { processed: 2, duplicates: 0, rejected: 0, parked: 0, retried: 2 },
        "{label}"
    );
    wait_for("the held delivery handed back", Duration::from_secs(10), || {
        let channel = channel.clone();
        async move { (common::depth(&channel, queue).await == 1).then_some(()) }
    })
    .await;
    assert_eq!(common::depth(&channel, &topology.parking_queue()).await, 0, "{label}: parked");
    assert!(
        calls.lock().unwrap().iter().all(|c| !c.redelivered),
        "{label}: a delivery came back from the broker"
    );
}

/// A set-based effect: each batch is one multi-row insert into `ledger`, whose amounts may not
/// be negative (the body is the amount). Counts its batch and single calls.
#[derive(Default)]
struct Ledger {
    batches: Arc<AtomicUsize>,
    singles: Arc<AtomicUsize>,
}

impl Ledger {
    async fn insert(tx: &mut AnyConnection, msgs: &[Incoming<'_>]) -> Result<Vec<Applied>, Transient> {
        let rows = Binds::of(tx).tuples(msgs.len(), &[None, None]);
        let mut query =
            sqlx::query(AssertSqlSafe(format!("INSERT INTO ledger (message_id, amount) VALUES {rows}")));
        for msg in msgs {
            let amount: i64 = std::str::from_utf8(msg.body)?.parse()?;
            query = query.bind(msg.headers.message_id.to_string()).bind(amount);
        }
        query.execute(&mut *tx).await?;
        Ok(vec![Applied::Processed; msgs.len()])
    }
}

impl Effect for Ledger {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Incoming<'_>) -> Result<Applied, Transient> {
        self.singles.fetch_add(1, Ordering::SeqCst);
        Ok(Self::insert(tx, std::slice::from_ref(msg)).await?.remove(0))
    }

    async fn apply_batch(
        &self,
        tx: &mut AnyConnection,
        msgs: &[Incoming<'_>],
    ) -> Result<Vec<Applied>, Transient> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        Self::insert(tx, msgs).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poison_message_in_a_set_based_batch_costs_only_itself() {
    for store in fresh_stores().await {
        poison_in_batch(&store).await;
    }
}

async fn poison_in_batch(store: &Store) {
    let label = store.label;
    sqlx::query("CREATE TABLE ledger (message_id TEXT NOT NULL, amount BIGINT NOT NULL CHECK (amount >= 0))")
        .execute(&store.pool)
        .await
        .unwrap();
    let ledger = Ledger::default();
    let (batches, singles) = (ledger.batches.clone(), ledger.singles.clone());
    let setup = PointsSetup::new(store, "points.ledger", ledger).await;
    let mut confirms = Drain::new(&setup.channel, &setup.topology.confirms_queue()).await;
    let rows = |id: Uuid| {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM ledger WHERE message_id = $1")
            .bind(id.to_string())
            .fetch_one(&store.pool)
    };

    // Twelve messages, the sixth with a negative amount: the batch's insert fails on it.
    let ids: Vec<Uuid> = (0..12).map(|_| Uuid::now_v7()).collect();
    let bodies: Vec<Vec<u8>> =
        (0..12).map(|i| if i == 5 { b"-1".to_vec() } else { i.to_string().into_bytes() }).collect();
    let messages: Vec<(Uuid, &str, &[u8])> =
        ids.iter().zip(&bodies).map(|(id, b)| (*id, "o", b.as_slice())).collect();
    let (subscription, deliveries) = setup.queued_batch(&messages, 12).await;
    let report = setup.consumer.handle_batch(deliveries, &CancellationToken::new()).await.unwrap();
    subscription.close().await;
    assert_eq!(
        report,
        BatchReport { processed: 11, duplicates: 0, rejected: 0, parked: 1, retried: 0 },
        "{label}"
    );
    // One batch call failed; the redo applied each message alone.
    assert_eq!((batches.load(Ordering::SeqCst), singles.load(Ordering::SeqCst)), (1, 12), "{label}");
    let outcomes = confirms_until_quiet(&mut confirms, Duration::from_millis(500)).await;
    for (i, id) in ids.iter().enumerate() {
        let (want_rows, want_confirms) =
            if i == 5 { (0, vec![]) } else { (1, vec![(Outcome::Processed, None)]) };
        assert_eq!(rows(*id).await.unwrap(), want_rows, "{label}: message {i}");
        assert_eq!(outcomes.get(id).cloned().unwrap_or_default(), want_confirms, "{label}: message {i}");
    }
    let parked =
        Drain::new(&setup.channel, &setup.topology.parking_queue()).await.next(Duration::from_secs(10)).await;
    assert_eq!(parked.data, b"-1", "{label}");
    let reason =
        match parked.properties.headers().as_ref().and_then(|h| h.inner().get(HEADER_PARK_REASON).cloned()) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).to_lowercase(),
            other => panic!("{label}: reason {other:?}"),
        };
    assert!(reason.starts_with("effect failed") && reason.contains("check"), "{label}: reason {reason}");

    // A clean batch takes the set-based path: one batch call, no single ones.
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let messages: Vec<(Uuid, &str, &[u8])> = ids.iter().map(|id| (*id, "o", &b"7"[..])).collect();
    let (subscription, deliveries) = setup.queued_batch(&messages, 6).await;
    let report = setup.consumer.handle_batch(deliveries, &CancellationToken::new()).await.unwrap();
    subscription.close().await;
    assert_eq!(report.processed, 6, "{label}");
    assert_eq!((batches.load(Ordering::SeqCst), singles.load(Ordering::SeqCst)), (2, 12), "{label}");
    for id in ids {
        assert_eq!(rows(id).await.unwrap(), 1, "{label}");
    }
    assert_eq!(common::depth(&setup.channel, setup.queue).await, 0, "{label}");
}
