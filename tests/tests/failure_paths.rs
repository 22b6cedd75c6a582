//! Failure paths of the callback service that end with a message nobody looks at again:
//! - a store that fails every statement is waited out in place: the check and confirm deliveries
//!   are neither requeued hot (which parks them at the delivery limit on RabbitMQ < 4.3) nor parked;
//! - a check whose CHECK never comes back (lost, or parked after it was recorded) is republished
//!   by the sweeper, and the message is reconciled;
//! - a CHECK the broker parked by the delivery limit is taken back from parking by the sweeper
//!   (up to three times), while what is parked for a reason stays there, unchanged.

#[macro_use]
mod common;
#[path = "callback/harness.rs"]
#[allow(dead_code)] // the callback suite uses the rest of it
mod harness;

use std::{collections::BTreeSet, time::Duration};

use callback_service::{parking::HEADER_RECOVERED, store::Status};
use harness::Env;
use lapin::{
    BasicProperties,
    options::BasicGetOptions,
    types::{AMQPValue, FieldTable},
};
use recheck::{
    Outgoing,
    message::{Check, CheckBatch, HEADER_PARK_REASON, now_ms},
};
use recheck_tests::metrics::{Metrics, get};
use uuid::Uuid;

use common::wait_for;

const SOON: Duration = Duration::from_secs(60);

async fn scrape(env: &Env) -> Metrics {
    let (status, body) = get(env.ops_addrs[0], "/metrics").await.unwrap();
    assert_eq!(status, 200);
    Metrics::parse(body).unwrap()
}

/// PostgreSQL answers every statement on the two tables with an error at once (the tables are
/// renamed away) while orders are published: their CONFIRMs and CHECKs arrive and fail on every
/// try. A hot requeue would reach the queues' delivery limit (10) within a second and park them;
/// in place, each delivery waits with a growing delay, and once the tables are back every order
/// is confirmed, its points applied once, and nothing is parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failing_every_statement_is_waited_out_in_place_and_nothing_is_parked() {
    let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
    let mut env = Env::start(&db.url, |_| {}).await;
    env.start_consumer().await;
    let store = env.store.pool().clone();
    let retries = |m: &Metrics, queue: &str| m.sum("recheck_delivery_retries_total", &[("queue", queue)]);
    let before = scrape(&env).await;
    let (checks_before, confirms_before) =
        (retries(&before, "recheck.checks"), retries(&before, "recheck.confirms"));

    sqlx::query("ALTER TABLE messages RENAME TO messages_away").execute(&store).await.unwrap();
    sqlx::query("ALTER TABLE confirms RENAME TO confirms_away").execute(&store).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(env.order(&format!("o-outage-{i}"), true).await);
    }
    // Both readers have failed several times (a hot loop would have parked them by now).
    wait_for("both queue readers retrying in place", SOON, || async {
        let m = scrape(&env).await;
        (retries(&m, "recheck.checks") >= checks_before + 4.0
            && retries(&m, "recheck.confirms") >= confirms_before + 4.0)
            .then_some(())
    })
    .await;
    let channel = env.publisher.create_channel().await.unwrap();
    assert_eq!(common::depth(&channel, "recheck.parking").await, 0, "nothing parked during the outage");

    sqlx::query("ALTER TABLE messages_away RENAME TO messages").execute(&store).await.unwrap();
    sqlx::query("ALTER TABLE confirms_away RENAME TO confirms").execute(&store).await.unwrap();
    for id in &ids {
        env.wait_status(*id, Status::Confirmed, SOON).await;
        assert_eq!(env.points(*id).await, 1, "{id}: the effect once");
    }
    assert_eq!(common::depth(&channel, "recheck.parking").await, 0, "nothing parked after it");
    env.shutdown().await;
}

on_both_stores!(
    a_recorded_check_whose_check_never_comes_back_is_swept_and_reconciled,
    concurrent_redrives_of_one_message_redrive_it_once,
    bulk_redrive_is_bounded_and_idempotent_and_recheck_checks_now,
);

/// The store has recorded a message's first CHECK (the check was being handled) but the CHECK
/// itself is gone: parked by the delivery limit, or lost with a queue. Only the sweeper can bring
/// it back: it republishes the CHECK once the check is `sweep_after` overdue, the hook resends the
/// committed order, the consumer confirms it, and a second sweep finds nothing.
async fn a_recorded_check_whose_check_never_comes_back_is_swept_and_reconciled(url: &str) {
    let mut env = Env::start(url, |c| {
        c.sweep_after = Duration::from_secs(2);
        c.sweep_interval = Duration::from_millis(200);
    })
    .await;
    env.start_consumer().await;
    let id = Uuid::now_v7();
    env.orders.0.lock().unwrap().insert(id, b"{\"order\":\"o-swept\"}".to_vec());
    let check = Check {
        message_id: id,
        routing_key: "order.created".into(),
        business_key: "o-swept".into(),
        attempt: 1,
        published_at: now_ms(),
        expect: Some(vec!["points".into()]),
        traceparent: None,
        reserved: false,
    };
    // Recorded as the reconciler records a first CHECK, never published: nothing else has it.
    env.store.record_first_checks("orders", &[&check]).await.unwrap();
    assert_eq!(env.row(id).await.unwrap().status, Status::Pending);

    env.wait_status(id, Status::Confirmed, SOON).await;
    assert_eq!(env.hook.calls_for(id), vec![(1, 1)], "one resend, from the swept CHECK");
    assert_eq!(env.points(id).await, 1);
    assert!(scrape(&env).await.sum("recheck_checks_swept_total", &[]) >= 1.0);
    // Confirmed rows are not overdue: the next sweep takes nothing.
    let overdue = env.store.claim_overdue(now_ms() + 60_000, now_ms() + 60_000, 10).await.unwrap();
    assert!(overdue.is_empty(), "{overdue:?}");
    env.shutdown().await;
}

/// Eight redrives of one failed message at once (two operators, a retried click): exactly one
/// wins and writes its history row; the others are refused as not redrivable, and the message,
/// failed after its resends went nowhere (no consumer yet), ends confirmed with its effect once.
async fn concurrent_redrives_of_one_message_redrive_it_once(url: &str) {
    let mut env = Env::start(url, |_| {}).await;
    let id = env.order("o-redriven", false).await;
    env.wait_status(id, Status::Failed, SOON).await;
    let id_text = id.to_string();
    let redrives =
        (0..8).map(|_| callback_service::admin::redrive(&env.store, &env.publisher, &env.topology, &id_text));
    let results = futures_util::future::join_all(redrives).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(callback_service::admin::RedriveError::NotRedrivable(_))))
        .count();
    assert_eq!((won, refused), (1, 7), "{results:?}");
    env.start_consumer().await;
    env.wait_status(id, Status::Confirmed, SOON).await;
    let (_, _, history) = env.store.details(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(history.iter().filter(|t| t.reason == "redrive").count(), 1, "{history:?}");
    assert_eq!(env.points(id).await, 1);
    env.shutdown().await;
}

/// The operators' bulk tools over the Admin API. Three messages fail (their resends went nowhere):
/// `RedriveMany` with a limit of 2 takes two and says more match, the next call the last one, a
/// third finds nothing; each ends confirmed with one redrive in its history. `Recheck` publishes
/// the CHECK of a pending message whose check would otherwise not come for ten minutes (its
/// CHECK is lost; the sweeper waits `sweep_after`): it is resent and confirmed at once.
async fn bulk_redrive_is_bounded_and_idempotent_and_recheck_checks_now(url: &str) {
    use recheck_proto::v1::{MessageStatus, RecheckRequest, RedriveManyRequest};
    let mut env = Env::start(url, |_| {}).await;
    let mut admin =
        recheck_proto::v1::admin_client::AdminClient::connect(format!("http://{}", env.admin_addrs[0]))
            .await
            .unwrap();
    let mut failed = Vec::new();
    for i in 0..3 {
        failed.push(env.order(&format!("o-bulk-{i}"), false).await);
    }
    for id in &failed {
        env.wait_status(*id, Status::Failed, SOON).await;
    }
    let bulk =
        |limit| RedriveManyRequest { status: MessageStatus::Failed.into(), limit, ..Default::default() };
    let first = admin.redrive_many(bulk(2)).await.unwrap().into_inner();
    assert_eq!((first.message_ids.len(), first.more), (2, true), "{first:?}");
    let second = admin.redrive_many(bulk(2)).await.unwrap().into_inner();
    assert_eq!((second.message_ids.len(), second.more), (1, false), "{second:?}");
    let mut redriven: Vec<String> = first.message_ids.into_iter().chain(second.message_ids).collect();
    redriven.sort();
    let mut expected: Vec<String> = failed.iter().map(Uuid::to_string).collect();
    expected.sort();
    assert_eq!(redriven, expected);
    let again = admin.redrive_many(bulk(2)).await.unwrap().into_inner();
    assert!(again.message_ids.is_empty() && !again.more, "nothing failed is left: {again:?}");
    let refused = admin
        .redrive_many(RedriveManyRequest { status: MessageStatus::Pending.into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // A pending message whose CHECK is gone; only `Recheck` (or, ten minutes on, the sweeper) checks it.
    let lost = Uuid::now_v7();
    env.orders.0.lock().unwrap().insert(lost, b"{\"order\":\"o-lost-check\"}".to_vec());
    let check = Check {
        message_id: lost,
        routing_key: "order.created".into(),
        business_key: "o-lost-check".into(),
        attempt: 1,
        published_at: now_ms(),
        expect: Some(vec!["points".into()]),
        traceparent: None,
        reserved: false,
    };
    env.store.record_first_checks("orders", &[&check]).await.unwrap();
    let missing = admin.recheck(RecheckRequest { producer: String::new(), limit: 0 }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    let rechecked =
        admin.recheck(RecheckRequest { producer: "orders".into(), limit: 0 }).await.unwrap().into_inner();
    assert!(rechecked.message_ids.contains(&lost.to_string()), "{rechecked:?}");

    env.start_consumer().await;
    for id in failed.iter().chain([&lost]) {
        env.wait_status(*id, Status::Confirmed, SOON).await;
        assert_eq!(env.points(*id).await, 1, "{id}: the effect once");
    }
    for id in &failed {
        let (_, _, history) = env.store.details(&id.to_string()).await.unwrap().unwrap();
        assert_eq!(history.iter().filter(|t| t.reason == "redrive").count(), 1, "{history:?}");
    }
    assert_eq!(env.hook.calls_for(lost), vec![(1, 1)], "the rechecked message resent once");
    env.shutdown().await;
}

/// What the sweeper takes back from parking, and what it leaves. Five messages sit in parking as
/// the broker and the services park them: a CHECK dead-lettered by the checks queue's delivery
/// limit (`x-death` as the broker writes it, the latest death first, after the delay tier's
/// expiry); the same with `x-recheck-recovered: 3` (recovered three times already); a body that
/// does not decode, dead-lettered the same way; a CHECK the callback parked itself
/// (`x-recheck-park-reason`); a business message a consumer queue's delivery limit dead-lettered.
/// Only the first comes back: its message, which the store never saw, is resent and confirmed.
/// The other four stay parked, their headers as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_parked_by_the_delivery_limit_comes_back_and_the_rest_stays_parked() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/callback.db?mode=rwc", dir.path().display());
    let mut env = Env::start(&url, |c| c.sweep_interval = Duration::from_millis(200)).await;
    env.start_consumer().await;
    let check_of = |id: Uuid, key: &str| {
        env.orders.0.lock().unwrap().insert(id, format!("{{\"order\":\"{key}\"}}").into_bytes());
        let check = Check {
            message_id: id,
            routing_key: "order.created".into(),
            business_key: key.into(),
            attempt: 1,
            published_at: now_ms(),
            expect: Some(vec!["points".into()]),
            traceparent: None,
            reserved: false,
        };
        serde_json::to_vec(&CheckBatch::new("orders", vec![check])).unwrap()
    };
    let (id, spent_id) = (Uuid::now_v7(), Uuid::now_v7());
    let (body, spent) = (check_of(id, "o-parked"), check_of(spent_id, "o-spent"));
    let tier = "recheck.checks.delay.1s";
    let by_limit = |queue: &str| deaths(&[(queue, "delivery_limit"), (tier, "expired")]);
    let mut recovered = by_limit("recheck.checks");
    recovered.insert(HEADER_RECOVERED.into(), AMQPValue::LongLongInt(3));
    let mut own = deaths(&[(tier, "expired")]);
    own.insert(HEADER_PARK_REASON.into(), AMQPValue::LongString("invalid JSON".into()));
    let stay: [(&[u8], FieldTable); 4] = [
        (&spent, recovered),
        (b"{not json", by_limit("recheck.checks")),
        (b"{\"v\":1,\"producer\":\"orders\",\"checks\":[]}", own),
        (b"{\"order\":\"o-poison\"}", by_limit("points.orders")),
    ];
    for (body, headers) in [(body.as_slice(), by_limit("recheck.checks"))].into_iter().chain(stay.clone()) {
        let properties = BasicProperties::default().with_headers(headers);
        let parked = Outgoing { exchange: "recheck.parking", routing_key: "", body, properties };
        env.publisher.publish(parked).await.unwrap();
    }

    env.wait_status(id, Status::Confirmed, SOON).await;
    assert_eq!(env.hook.calls_for(id), vec![(1, 1)], "one resend, from the recovered CHECK");
    assert_eq!(env.points(id).await, 1);
    let channel = env.publisher.create_channel().await.unwrap();
    wait_for("the other four left in parking", SOON, || async {
        (common::depth(&channel, "recheck.parking").await == 4).then_some(())
    })
    .await;
    // A pass may hold one for a moment (and put a copy back): poll until all four were read.
    let mut left = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + SOON;
    while left.len() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "read back {} of the four", left.len());
        let options = BasicGetOptions { no_ack: true };
        let Some(got) = channel.basic_get("recheck.parking".into(), options).await.unwrap() else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut headers = got.delivery.properties.headers().clone().unwrap_or_default().inner().clone();
        // The broker's count of this delivery, not part of the message.
        headers.remove("x-delivery-count");
        let headers = FieldTable::from(headers);
        let expected = stay.iter().find(|(body, _)| *body == got.delivery.data.as_slice());
        let (_, sent) = expected.unwrap_or_else(|| panic!("{:?} in parking", got.delivery.data));
        assert_eq!(&headers, sent, "headers changed in parking");
        left.insert(got.delivery.data);
    }
    assert!(env.hook.calls_for(spent_id).is_empty(), "a CHECK recovered three times came back");
    env.shutdown().await;
}

/// `x-death` as the broker writes it: one entry per (queue, reason), the latest first, and the
/// `x-first-death-*` of the last one.
fn deaths(latest_first: &[(&str, &str)]) -> FieldTable {
    let entries = latest_first.iter().map(|(queue, reason)| {
        let mut death = FieldTable::default();
        death.insert("queue".into(), AMQPValue::LongString((*queue).into()));
        death.insert("reason".into(), AMQPValue::LongString((*reason).into()));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        AMQPValue::FieldTable(death)
    });
    let mut headers = FieldTable::default();
    headers.insert("x-death".into(), AMQPValue::FieldArray(entries.collect::<Vec<_>>().into()));
    let (queue, reason) = latest_first.last().expect("a death");
    headers.insert("x-first-death-queue".into(), AMQPValue::LongString((*queue).into()));
    headers.insert("x-first-death-reason".into(), AMQPValue::LongString((*reason).into()));
    headers
}
