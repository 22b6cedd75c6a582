//! `AwardPoints` on a micro-batch, on SQLite and PostgreSQL: the whole batch in a fixed number of
//! statements (counted from sqlx's statement log), with the ledger and the per-customer balances
//! exactly what the orders imply — the balances are what the verdict compares with committed
//! orders, so a batch path that lost or doubled a customer's increment would show there.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use downstream_demo::{AwardPoints, config::FaultArgs, faults::Faults, store};
use recheck::{Applied, Effect, Incoming, message::BusinessHeaders};
use sqlx::{Acquire, AnyPool};
use tracing::{Event, Metadata, Subscriber, span};
use uuid::Uuid;

/// Statements sqlx logged (target `sqlx::query`, one event per statement) in this process.
static STATEMENTS: AtomicUsize = AtomicUsize::new(0);

/// A subscriber that only counts sqlx's statement events. Global: SQLite runs statements, and
/// logs them, on a worker thread of its own.
struct CountStatements;

impl Subscriber for CountStatements {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target() == "sqlx::query"
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        if event.metadata().target() == "sqlx::query" {
            STATEMENTS.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_costs_two_statements_and_balances_add_up() {
    tracing::subscriber::set_global_default(CountStatements).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}/points.db?mode=rwc", dir.path().display());
    let postgres = recheck_tests::kit().await.postgres.fresh_database().await.unwrap().url;
    for url in [sqlite, postgres.to_string()] {
        let pool = store::connect(&url).await.unwrap();
        batch_of_orders(&pool).await;
    }
}

async fn batch_of_orders(pool: &AnyPool) {
    // 200 orders of 7 customers, 20 of them malformed (rejected, never awarded).
    let orders: Vec<(BusinessHeaders, Vec<u8>)> = (0..200)
        .map(|i| {
            let headers = BusinessHeaders {
                message_id: Uuid::now_v7(),
                producer: "orders".into(),
                business_key: format!("o-{i}"),
                attempt: 0,
            };
            let body = if i % 10 == 9 {
                b"not json".to_vec()
            } else {
                format!(r#"{{"order_id":"o-{i}","customer":"c-{}","amount_cents":{}}}"#, i % 7, 100 * i)
                    .into_bytes()
            };
            (headers, body)
        })
        .collect();
    let msgs: Vec<Incoming<'_>> = orders
        .iter()
        .map(|(headers, body)| Incoming { headers, routing_key: "order.created", body, redelivered: false })
        .collect();
    let effect = AwardPoints::new(Arc::new(Faults::new(&FaultArgs::default())));

    let mut conn = pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let before = STATEMENTS.load(Ordering::SeqCst);
    let applied = effect.apply_batch(&mut tx, &msgs).await.unwrap();
    let statements = STATEMENTS.load(Ordering::SeqCst) - before;
    // One order alone costs as much (and shows the count is live).
    let one = Incoming {
        headers: &orders[0].0,
        routing_key: "order.created",
        body: b"{\"order_id\":\"x\",\"customer\":\"z\",\"amount_cents\":0}",
        redelivered: false,
    };
    let before_one = STATEMENTS.load(Ordering::SeqCst);
    assert_eq!(effect.apply(&mut tx, &one).await.unwrap(), Applied::Processed);
    let statements_one = STATEMENTS.load(Ordering::SeqCst) - before_one;
    tx.commit().await.unwrap();
    assert_eq!(statements, 2, "one ledger insert and one balance upsert for 200 orders");
    assert_eq!(statements_one, 2, "for one order");
    let rejected = applied
        .iter()
        .filter(|a| matches!(a, Applied::Rejected(r) if r.starts_with("malformed order")))
        .count();
    assert_eq!((applied.len(), rejected), (200, 20));

    let mut expected = BTreeMap::from([("z".to_owned(), (0, 1))]);
    for i in (0..200).filter(|i| i % 10 != 9) {
        let (points, orders) = expected.entry(format!("c-{}", i % 7)).or_default();
        *points += i; // 100 × i cents
        *orders += 1;
    }
    let balances: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT customer, points, orders FROM balances ORDER BY customer")
            .fetch_all(pool)
            .await
            .unwrap();
    let balances: BTreeMap<String, (i64, i64)> = balances.into_iter().map(|(c, p, o)| (c, (p, o))).collect();
    assert_eq!(balances, expected);
    let ledger: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM points").fetch_one(pool).await.unwrap();
    assert_eq!(ledger, 181);
}
