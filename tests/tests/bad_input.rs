//! Bad input: every queue the callback service and the SDK's consumer loop read
//! is fed the malformed variants of `bad_input/rows.rs`, each between two good
//! messages. Every bad message must be parked once with a reason naming the
//! problem; the good ones around it must still reconcile; the service must still
//! be running afterwards, and nothing in the process may panic.

mod common;
#[allow(dead_code)] // shared with the callback suite, which uses all of it
#[path = "callback/harness.rs"]
mod harness;
#[path = "bad_input/rows.rs"]
mod rows;

use std::{
    collections::HashMap,
    sync::{
        Once,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use callback_service::store::Status;
use common::{Drain, Store, depth, fresh_broker, fresh_stores, wait_for};
use harness::{Env, Points};
use lapin::{message::Delivery, types::AMQPValue};
use recheck::{
    Confirmer, ConsumerConfig, ConsumerLoop, GroupCommitConfig, Inbox, Outgoing, Producer, ProducerConfig,
    Publisher, Topology,
    message::{Confirm, ConfirmBatch, HEADER_PARK_REASON, HEADER_PARK_SOURCE, Outcome, now_ms},
};
use rows::{Expect, Queue, Row};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SOON: Duration = Duration::from_secs(45);
const BUSINESS_QUEUE: &str = "points.orders";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_queues_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    callback_queues(&format!("sqlite://{}/callback.db?mode=rwc", dir.path().display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_queues_on_postgres() {
    let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
    callback_queues(&db.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_queue_on_both_stores() {
    for store in fresh_stores().await {
        business_queue(&store).await;
    }
}

/// The CONFIRM and CHECK queues of one callback service instance.
async fn callback_queues(url: &str) {
    count_panics();
    let mut env = Env::start(url, |c| {
        c.max_body_bytes = rows::MAX_BODY;
        // Deferral reads the check's timestamps too: keep that path in play.
        c.consumer_queues = vec![("points".into(), BUSINESS_QUEUE.into())];
        // Bad confirms then share ingest batches (one store transaction) with good ones.
        c.confirm_linger = Duration::from_millis(100);
    })
    .await;
    env.start_consumer().await;
    let channel = env.publisher.create_channel().await.unwrap();
    let mut parking = Drain::new(&channel, &env.topology.parking_queue()).await;
    let started = Instant::now();

    let rows = rows::callback_rows();
    let mut good = Vec::new();
    for row in &rows {
        good.push(good_callback_message(&env, row.queue).await);
        publish(&env.publisher, &env.topology, row, &row.tag("callback")).await;
        good.push(good_callback_message(&env, row.queue).await);
    }
    let source = |q| match q {
        Queue::Confirms => env.topology.confirms_queue(),
        _ => env.topology.checks_queue(),
    };
    let mut problems = collect_parked(&mut parking, [("callback", &rows[..])], source).await;
    for row in &rows {
        if let Expect::Failed(id, reason) = row.expect {
            let found = env.wait_status(id, Status::Failed, SOON).await;
            if found.last_error.as_deref() != Some(reason) {
                problems.push(format!(
                    "{}: failed with {:?}, not {reason:?}",
                    row.tag("callback"),
                    found.last_error
                ));
            }
        }
    }
    for id in good {
        env.wait_status(id, Status::Confirmed, SOON).await;
    }

    // Still serving: a last good pair reconciles, Admin answers, the queues are empty.
    for id in
        [good_callback_message(&env, Queue::Confirms).await, good_callback_message(&env, Queue::Checks).await]
    {
        env.wait_status(id, Status::Confirmed, SOON).await;
    }
    let addr = env.admin_addrs[0];
    let mut admin =
        recheck_proto::v1::admin_client::AdminClient::connect(format!("http://{addr}")).await.unwrap();
    admin.stats(recheck_proto::v1::StatsRequest {}).await.expect("Admin stats");
    for queue in [env.topology.checks_queue(), env.topology.confirms_queue()] {
        wait_for(&format!("{queue} to be empty"), SOON, || {
            let (channel, queue) = (channel.clone(), queue.clone());
            async move { (depth(&channel, &queue).await == 0).then_some(()) }
        })
        .await;
    }
    problems.extend(nothing_more_parked(&mut parking).await);
    assert!(problems.is_empty(), "bad input mishandled:\n{}", problems.join("\n"));
    assert_eq!(count_panics(), 0, "something panicked (see the output above)");
    eprintln!("{} callback rows in {:?}", rows.len(), started.elapsed());
    env.shutdown().await;
}

/// A good message for `queue` that reconciles only if that queue is still served:
/// a CONFIRM of a prepared order (its CHECK, due later, finds it), or a CHECK of an order whose
/// business message was never published (so only a resend the check drives gets it confirmed).
async fn good_callback_message(env: &Env, queue: Queue) -> Uuid {
    match queue {
        Queue::Checks => env.order("o-good", false).await,
        _ => {
            let id = env.order("o-good-confirm", false).await;
            let confirm =
                Confirm { message_id: id, outcome: Outcome::Processed, detail: None, processed_at: now_ms() };
            let body = serde_json::to_vec(&ConfirmBatch::new("points", vec![confirm])).unwrap();
            env.publisher
                .publish(Outgoing {
                    exchange: &env.topology.confirms_exchange(),
                    routing_key: "",
                    body: &body,
                    properties: lapin::BasicProperties::default(),
                })
                .await
                .unwrap();
            id
        }
    }
}

/// The SDK's consumer loop on a business queue: one round queued before it starts
/// (bad and good messages share its batches and transactions), one while it runs.
async fn business_queue(store: &Store) {
    count_panics();
    let label = store.label;
    let (_vhost, publisher, topology) = fresh_broker().await;
    let channel = publisher.create_channel().await.unwrap();
    topology.declare_consumer_queue(&channel, BUSINESS_QUEUE, &["order.created"]).await.unwrap();
    Inbox::migrate(&store.pool).await.unwrap();
    sqlx::query("CREATE TABLE points (message_id TEXT PRIMARY KEY)").execute(&store.pool).await.unwrap();
    let producer = Producer::new(publisher.clone(), topology.clone(), ProducerConfig::new("orders"));
    let mut parking = Drain::new(&channel, &topology.parking_queue()).await;
    let started = Instant::now();

    let (queued, live) = (rows::business_rows(), rows::business_rows());
    let mut good = Vec::new();
    publish_business_round(&producer, &topology, "queued", &queued, &mut good).await;
    let confirmer =
        Confirmer::new(publisher.clone(), topology.clone(), "points", GroupCommitConfig::default());
    let config = ConsumerConfig {
        max_body_bytes: Some(rows::MAX_BODY),
        ..ConsumerConfig::new("points", BUSINESS_QUEUE)
    };
    let consumer =
        ConsumerLoop::new(store.pool.clone(), publisher.clone(), topology.clone(), confirmer, Points, config);
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    publish_business_round(&producer, &topology, "live", &live, &mut good).await;

    let rounds = [("queued", &queued[..]), ("live", &live[..])];
    let mut problems = collect_parked(&mut parking, rounds, |_| BUSINESS_QUEUE.to_owned()).await;
    let processed: Vec<Uuid> = rounds
        .iter()
        .flat_map(|(_, rows)| rows.iter())
        .filter_map(|row| if let Expect::Processed(id) = row.expect { Some(id) } else { None })
        .collect();
    for id in good.iter().chain(&processed) {
        wait_for(&format!("{label}: {id} processed"), SOON, || async {
            (points(store, *id).await == 1).then_some(())
        })
        .await;
    }

    // Still running: a last good message is processed and the queue is empty.
    assert!(!running.is_finished(), "{label}: the consumer loop ended");
    let last = good_business_message(&producer).await;
    wait_for(&format!("{label}: the last message processed"), SOON, || async {
        (points(store, last).await == 1).then_some(())
    })
    .await;
    wait_for(&format!("{label}: an empty business queue"), SOON, || {
        let channel = channel.clone();
        async move { (depth(&channel, BUSINESS_QUEUE).await == 0).then_some(()) }
    })
    .await;
    problems.extend(nothing_more_parked(&mut parking).await);
    for id in &processed {
        let n = points(store, *id).await;
        if n != 1 {
            problems.push(format!("{id}: applied {n} times"));
        }
    }
    assert!(problems.is_empty(), "{label}: bad input mishandled:\n{}", problems.join("\n"));

    stop.cancel();
    let report = running.await.unwrap().unwrap();
    let parked_rows = rounds
        .iter()
        .flat_map(|(_, rows)| rows.iter())
        .filter(|r| matches!(r.expect, Expect::Parked(_)))
        .count();
    assert_eq!(report.parked, parked_rows, "{label}: {report:?}");
    assert_eq!(report.retried, 0, "{label}: {report:?}");
    assert_eq!(count_panics(), 0, "something panicked (see the output above)");
    eprintln!("{label}: 2 × {} business rows in {:?}", rounds[0].1.len(), started.elapsed());
}

/// Each row's message between two good ones; the good ids are added to `good`.
async fn publish_business_round(
    producer: &Producer,
    topology: &Topology,
    round: &str,
    rows: &[Row],
    good: &mut Vec<Uuid>,
) {
    for row in rows {
        good.push(good_business_message(producer).await);
        publish(producer.publisher(), topology, row, &row.tag(round)).await;
        good.push(good_business_message(producer).await);
    }
}

async fn good_business_message(producer: &Producer) -> Uuid {
    let id = Uuid::now_v7();
    producer.publish_business(id, "order.created", "o-good", b"{}", 0).await.unwrap();
    id
}

async fn points(store: &Store, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM points WHERE message_id = $1")
        .bind(id.to_string())
        .fetch_one(&store.pool)
        .await
        .unwrap()
}

/// Publishes a row's message where its queue gets it: CHECKs through the shortest
/// delay tier (so they arrive dead-lettered, as real ones do), tagged with `tag`.
async fn publish(publisher: &Publisher, topology: &Topology, row: &Row, tag: &str) {
    let (exchange, routing_key) = match row.queue {
        Queue::Confirms => (topology.confirms_exchange(), String::new()),
        Queue::Checks => (topology.delay_exchange(), topology.tier_routing_key(topology.tiers[0])),
        Queue::Business => (topology.events_exchange(), "order.created".to_owned()),
    };
    publisher
        .publish(Outgoing {
            exchange: &exchange,
            routing_key: &routing_key,
            body: &row.body,
            properties: row.properties.clone().with_correlation_id(tag.into()),
        })
        .await
        .unwrap_or_else(|e| panic!("publishing {tag}: {e}"));
}

/// Takes parked messages until every row of `rounds` expected to park has: each
/// copy must name a row, come from that row's queue and carry a reason with the
/// row's text. Returns what went wrong, one line per row.
async fn collect_parked<'a>(
    parking: &mut Drain,
    rounds: impl IntoIterator<Item = (&'a str, &'a [Row])>,
    source: impl Fn(Queue) -> String,
) -> Vec<String> {
    let mut want: HashMap<String, &Row> = HashMap::new();
    for (round, rows) in rounds {
        for row in rows.iter().filter(|r| matches!(r.expect, Expect::Parked(_))) {
            want.insert(row.tag(round), row);
        }
    }
    let mut problems = Vec::new();
    let deadline = Instant::now() + SOON;
    while !want.is_empty() {
        let Some(d) = parking.try_next(deadline.saturating_duration_since(Instant::now())).await else {
            let mut missing: Vec<_> = want.keys().map(|tag| format!("{tag}: never parked")).collect();
            missing.sort();
            problems.extend(missing);
            break;
        };
        let tag = tag_of(&d);
        let Some(row) = want.remove(&tag) else {
            problems.push(unexpected(&d));
            continue;
        };
        let Expect::Parked(needle) = row.expect else { unreachable!() };
        let reason = header(&d, HEADER_PARK_REASON);
        match reason.as_deref() {
            Some(r) if !r.is_empty() && r.contains(needle) => {}
            other => problems.push(format!("{tag}: park reason {other:?} does not say {needle:?}")),
        }
        let from = header(&d, HEADER_PARK_SOURCE);
        if from.as_deref() != Some(source(row.queue).as_str()) {
            problems.push(format!("{tag}: parked from {from:?}"));
        }
    }
    problems
}

/// Once everything expected has reconciled, anything still arriving in parking is
/// a good message parked, a row parked twice, or one parked by the delivery limit.
async fn nothing_more_parked(parking: &mut Drain) -> Vec<String> {
    let mut problems = Vec::new();
    while let Some(d) = parking.try_next(Duration::from_millis(500)).await {
        problems.push(unexpected(&d));
    }
    problems
}

fn unexpected(d: &Delivery) -> String {
    format!(
        "{}: parked unexpectedly (again?), reason {:?}, {} bytes",
        tag_of(d),
        header(d, HEADER_PARK_REASON),
        d.data.len()
    )
}

fn tag_of(d: &Delivery) -> String {
    d.properties.correlation_id().as_ref().map_or_else(|| "(untagged)".to_owned(), |t| t.to_string())
}

fn header(d: &Delivery, name: &str) -> Option<String> {
    match d.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// Installs (once) a hook counting panics anywhere in the process, spawned tasks
/// included, whose panics tokio would otherwise only log; returns the count.
fn count_panics() -> usize {
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
    PANICS.load(Ordering::SeqCst)
}
