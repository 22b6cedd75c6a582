//! The callback service end to end: a real broker, a real store (SQLite and
//! PostgreSQL), a producer hook over gRPC that counts its calls per
//! (message, attempt), and the SDK's consumer.

#[macro_use]
mod common;
#[path = "callback/deferral.rs"]
mod deferral;
#[path = "callback/harness.rs"]
mod harness;
#[path = "callback/retention.rs"]
mod retention;

use std::time::Duration;

use callback_service::store::Status;
use harness::{Env, Mode};
use lapin::types::AMQPValue;
use recheck::message::{Check, CheckBatch, ConfirmBatch, HEADER_PARK_REASON, now_ms};
use recheck_proto::v1 as pb;
use uuid::Uuid;

use common::{Drain, wait_for};

const SOON: Duration = Duration::from_secs(30);

on_both_stores!(
    confirmed_before_the_check_needs_no_rpc,
    an_unpublished_message_is_resent_once_and_confirmed,
    not_found_is_void,
    retry_later_and_a_down_hook_are_rechecked_then_resent,
    an_unreachable_producer_fails_after_the_deadline,
    no_confirm_means_max_resends_then_failed_and_redrive_recovers,
    rejected_stops_resending_and_a_late_confirm_recovers_a_failed_message,
    duplicated_checks_and_two_instances_resend_each_attempt_once,
    malformed_bodies_are_parked_and_the_rest_still_reconciles,
    thousands_of_confirms_take_few_transactions,
    an_unknown_producer_fails_visibly,
    the_admin_api_requires_its_token,
);

async fn the_admin_api_requires_its_token(url: &str) {
    let env =
        Env::start(url, |c| c.admin_tokens = Some(recheck::BearerAuth::new(["adm1n".to_owned()]))).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", env.admin_addrs[0]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = |token: Option<&str>| {
        pb::admin_client::AdminClient::with_interceptor(
            channel.clone(),
            recheck::auth::AttachToken::new(token).unwrap(),
        )
    };
    for token in [None, Some("wrong"), Some("adm1")] {
        let status = client(token).stats(pb::StatsRequest {}).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token:?}");
    }
    let stats = client(Some("adm1n")).stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.total, 0);
    // Health stays open to probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let answer = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
    assert!(answer.is_ok(), "{answer:?}");
    env.shutdown().await;
}

async fn confirmed_before_the_check_needs_no_rpc(url: &str) {
    let mut env = Env::start(url, |_| {}).await;
    env.start_consumer().await;
    let id = env.order("o-1", true).await;
    env.wait_status(id, Status::Confirmed, SOON).await;
    // The check (1 s tier) comes due after the confirm, which alone could not settle the message
    // (only the CHECK says who is expected); the check confirms it without an RPC. Handled =
    // acked: no check queue holds a message, ready or unacked.
    let kit = recheck_tests::kit().await;
    wait_for("the check to be handled", SOON, || async {
        let listed = kit
            .rabbit
            .ctl(&["list_queues", "-q", "--no-table-headers", "-p", &env.vhost.name, "name", "messages"])
            .await
            .unwrap();
        let checks: u64 = listed
            .lines()
            .filter(|l| l.starts_with("recheck.checks"))
            .filter_map(|l| l.split('\t').nth(1)?.trim().parse::<u64>().ok())
            .sum();
        let due = env.row(id).await.is_some_and(|r| now_ms() - r.created_at > 2_500);
        (due && checks == 0).then_some(())
    })
    .await;
    assert_eq!(env.hook.total_calls(), 0);
    assert_eq!(env.points(id).await, 1);
    env.shutdown().await;
}

async fn an_unpublished_message_is_resent_once_and_confirmed(url: &str) {
    let mut env = Env::start(url, |_| {}).await;
    env.start_consumer().await;
    let id = env.order("o-lost", false).await;
    env.wait_status(id, Status::Confirmed, SOON).await;
    // The confirm may land while the RPC is still returning: the resend is counted then.
    wait_for("the resend to be counted", SOON, || async {
        env.row(id).await.filter(|r| r.resend_count == 1 && r.scheduled_attempt == 1)
    })
    .await;
    assert_eq!(env.hook.calls_for(id), vec![(1, 1)], "one call, for attempt 1");
    assert_eq!(env.points(id).await, 1);
    env.shutdown().await;
}

async fn not_found_is_void(url: &str) {
    let env = Env::start(url, |_| {}).await;
    let id = env.order("o-rolled-back", false).await;
    env.orders.0.lock().unwrap().remove(&id); // the transaction rolled back
    let row = env.wait_status(id, Status::Void, SOON).await;
    assert!(row.last_error.unwrap_or_default().contains("not committed"));
    assert_eq!(env.hook.total_calls(), 1);
    env.shutdown().await;
}

async fn retry_later_and_a_down_hook_are_rechecked_then_resent(url: &str) {
    let mut env = Env::start(url, |_| {}).await;
    env.hook.set_mode(Mode::RetryLater);
    let id = env.order("o-busy", false).await;
    let calls = || env.hook.calls_for(id).iter().map(|(_, n)| n).sum::<u32>();
    wait_for("two RETRY_LATER answers", SOON, || async { (calls() >= 2).then_some(()) }).await;
    let row = env.row(id).await.unwrap();
    assert_eq!((row.status, row.resend_count), (Status::Pending, 0), "RETRY_LATER is not a resend");
    assert!(row.last_error.unwrap_or_default().contains("maintenance"));
    // Then the hook is down for a round: an RPC error, also re-checked.
    env.hook.set_mode(Mode::Down);
    wait_for("an RPC error recorded", SOON, || async {
        env.row(id).await.filter(|r| r.last_error.as_deref().unwrap_or_default().contains("shutting down"))
    })
    .await;
    assert_eq!(env.row(id).await.unwrap().status, Status::Pending);
    env.hook.set_mode(Mode::Real);
    env.start_consumer().await;
    env.wait_status(id, Status::Confirmed, SOON).await;
    wait_for("one counted resend", SOON, || async { env.row(id).await.filter(|r| r.resend_count == 1) })
        .await;
    // The hook's attempt is the resend number: RETRY_LATER answers and failed calls are not
    // resends, so every call, the real resend included, asked for resend #1.
    let calls = env.hook.calls_for(id);
    assert!(calls.len() == 1 && calls[0].0 == 1 && calls[0].1 >= 3, "calls per resend number: {calls:?}");
    env.shutdown().await;
}

async fn an_unreachable_producer_fails_after_the_deadline(url: &str) {
    let env = Env::start(url, |c| {
        // Nothing listens there.
        c.producers = vec!["orders=http://127.0.0.1:9".parse().unwrap()];
        c.unreachable_deadline = Duration::from_secs(3);
    })
    .await;
    let id = env.order("o-nobody-home", false).await;
    let row = env.wait_status(id, Status::Failed, SOON).await;
    assert!(row.last_error.as_deref().unwrap_or_default().starts_with("producer unreachable"), "{row:?}");
    assert!(row.attempt >= 2, "failed before re-checking: {row:?}");
    env.shutdown().await;
}

async fn no_confirm_means_max_resends_then_failed_and_redrive_recovers(url: &str) {
    let mut env = Env::start(url, |_| {}).await; // max_resends = 2, no consumer
    let id = env.order("o-ignored", false).await;
    let row = env.wait_status(id, Status::Failed, SOON).await;
    assert_eq!(row.resend_count, 2);
    assert_eq!(env.hook.calls_for(id), vec![(1, 1), (2, 1)]);

    let mut admin = admin_client(&env).await;
    let failed = pb::MessageStatus::Failed as i32;
    let listed = admin
        .list_messages(pb::ListMessagesRequest { status: failed, page_size: 10, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.messages.iter().map(|m| m.message_id.clone()).collect::<Vec<_>>(), [id.to_string()]);
    let stats = admin.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert!(stats.counts.iter().any(|c| c.status == failed && c.count == 1), "{stats:?}");
    let shown =
        admin.get_message(pb::GetMessageRequest { message_id: id.to_string() }).await.unwrap().into_inner();
    assert_eq!(shown.history.len(), 3, "two resends and the failure: {shown:?}");
    let redriven = admin
        .redrive(recheck_proto::v1::RedriveRequest { message_id: id.to_string() })
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    assert_eq!(redriven.status(), recheck_proto::v1::MessageStatus::Pending);
    env.start_consumer().await;
    let row = env.wait_status(id, Status::Confirmed, SOON).await;
    assert_eq!(env.points(id).await, 1);
    let history = env.store.details(&id.to_string()).await.unwrap().unwrap().2;
    let path: Vec<_> = history.iter().map(|t| t.to).collect();
    // The copies resent before the consumer existed are still queued: the confirm may
    // come from one of them, before or after the redrive's own resend.
    assert_eq!(path[..4], [Status::Resent, Status::Resent, Status::Failed, Status::Pending], "{row:?}");
    assert_eq!(path.last(), Some(&Status::Confirmed));
    env.shutdown().await;
}

async fn rejected_stops_resending_and_a_late_confirm_recovers_a_failed_message(url: &str) {
    let mut env = Env::start(url, |c| c.max_resends = 0).await;
    // max_resends 0: an unconfirmed message fails at its first check.
    let late = env.order("o-late", false).await;
    env.wait_status(late, Status::Failed, SOON).await;
    env.start_consumer().await;
    let bad = env.order("bad-1", true).await;
    let row = env.wait_status(bad, Status::Rejected, SOON).await;
    assert_eq!(row.resend_count, 0);

    // The consumer finally sees the late one (a manual republish): failed → confirmed.
    let payload = env.orders.0.lock().unwrap()[&late].clone();
    env.producer.publish_business(late, "order.created", "o-late", &payload, 0).await.unwrap();
    env.wait_status(late, Status::Confirmed, SOON).await;
    let history = env.store.details(&late.to_string()).await.unwrap().unwrap().2;
    assert!(history.last().unwrap().reason.contains("recovered"), "{history:?}");
    assert_eq!(env.hook.total_calls(), 0, "rejected or failed messages were resent");
    env.shutdown().await;
}

async fn duplicated_checks_and_two_instances_resend_each_attempt_once(url: &str) {
    let mut env = Env::start(url, |_| {}).await;
    env.start_callback_service(|_| {}).await; // a second instance, same broker and store
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(env.order(&format!("o-{i}"), false).await);
    }
    // Every check also arrives a second time.
    for id in &ids {
        let row = wait_for("the row", SOON, || async { env.row(*id).await }).await;
        let check = Check {
            message_id: *id,
            routing_key: "order.created".into(),
            business_key: row.business_key.clone(),
            attempt: 0,
            published_at: row.published_at.max(now_ms()),
            expect: Some(vec!["points".into()]),
            traceparent: None,
            reserved: false,
        };
        recheck::broker::control::publish_checks(
            &env.publisher,
            &env.topology,
            &CheckBatch::new("orders", vec![check]),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    }
    env.start_consumer().await;
    for id in &ids {
        env.wait_status(*id, Status::Confirmed, SOON).await;
        for (attempt, calls) in env.hook.calls_for(*id) {
            assert_eq!(calls, 1, "{id} attempt {attempt} resent {calls} times");
        }
    }
    env.shutdown().await;
}

async fn malformed_bodies_are_parked_and_the_rest_still_reconciles(url: &str) {
    let mut env = Env::start(url, |_| {}).await;
    env.start_consumer().await;
    let bodies: [&[u8]; 4] = [b"", b"{not json", br#"{"v":2,"producer":"orders","checks":[]}"#, b"[]"];
    for body in bodies {
        for exchange in [env.topology.confirms_exchange(), env.topology.delay_exchange()] {
            let routing_key = if exchange.ends_with("delay") { "1s" } else { "" };
            env.publisher
                .publish(recheck::Outgoing {
                    exchange: &exchange,
                    routing_key,
                    body,
                    properties: lapin::BasicProperties::default(),
                })
                .await
                .unwrap();
        }
    }
    let good = env.order("o-good", false).await;
    env.wait_status(good, Status::Confirmed, SOON).await;
    let channel = env.publisher.create_channel().await.unwrap();
    let parked = Drain::new(&channel, &env.topology.parking_queue()).await.take(8, SOON).await;
    for d in parked {
        let reason = d.properties.headers().as_ref().and_then(|h| h.inner().get(HEADER_PARK_REASON).cloned());
        assert!(matches!(reason, Some(AMQPValue::LongString(_))), "parked without a reason");
    }
    env.shutdown().await;
}

async fn thousands_of_confirms_take_few_transactions(url: &str) {
    let env = Env::start(url, |_| {}).await;
    let before = env.store.transactions();
    let ids: Vec<Uuid> = (0..3000).map(|_| Uuid::now_v7()).collect();
    for chunk in ids.chunks(100) {
        let batch =
            ConfirmBatch::new("points", chunk.iter().copied().map(recheck_tests::processed).collect());
        let body = serde_json::to_vec(&batch).unwrap();
        env.publisher
            .publish(recheck::Outgoing {
                exchange: &env.topology.confirms_exchange(),
                routing_key: "",
                body: &body,
                properties: lapin::BasicProperties::default(),
            })
            .await
            .unwrap();
    }
    // No CHECK yet: stored, each message awaiting its check.
    wait_for("every confirm stored", SOON, || async {
        (env.store.counts().await.unwrap().awaiting_check == 3000).then_some(())
    })
    .await;
    let transactions = env.store.transactions() - before;
    eprintln!("3000 confirms in {transactions} transactions");
    assert!(transactions <= 30, "3000 confirms took {transactions} transactions");

    // Their CHECKs, 500 a message: one transaction each fills the rows in and confirms them all.
    let before = env.store.transactions();
    for chunk in ids.chunks(500) {
        let checks = chunk.iter().map(|id| recheck_tests::first_check(*id, &[])).collect();
        let batch = CheckBatch::new("orders", checks);
        recheck::broker::control::publish_checks(
            &env.publisher,
            &env.topology,
            &batch,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    }
    wait_for("every message confirmed at its check", SOON, || async {
        let counts = env.store.counts().await.unwrap();
        (counts.by_status.iter().find(|(s, _)| *s == Status::Confirmed).unwrap().1 == 3000).then_some(())
    })
    .await;
    let transactions = env.store.transactions() - before;
    assert!(transactions <= 6, "6 CHECK messages took {transactions} transactions");
    assert_eq!(env.hook.total_calls(), 0);
    env.shutdown().await;
}

async fn an_unknown_producer_fails_visibly(url: &str) {
    let env = Env::start(url, |_| {}).await;
    let id = Uuid::now_v7();
    let check = Check {
        message_id: id,
        routing_key: "order.created".into(),
        business_key: "g-1".into(),
        attempt: 0,
        published_at: now_ms(),
        expect: None,
        traceparent: None,
        reserved: false,
    };
    let batch = CheckBatch::new("ghost", vec![check]);
    recheck::broker::control::publish_checks(&env.publisher, &env.topology, &batch, Duration::from_secs(1))
        .await
        .unwrap();
    let row = env.wait_status(id, Status::Failed, SOON).await;
    assert_eq!(row.last_error.as_deref(), Some("unknown producer \"ghost\""));
    assert_eq!(env.hook.total_calls(), 0);
    env.shutdown().await;
}

async fn admin_client(env: &Env) -> recheck_proto::v1::admin_client::AdminClient<tonic::transport::Channel> {
    let addr = env.admin_addrs[0];
    recheck_proto::v1::admin_client::AdminClient::connect(format!("http://{addr}")).await.unwrap()
}

/// PostgreSQL, READ COMMITTED: a confirm that commits while the reconciler's `finish` waits for
/// the row lock must survive — `finish` re-checks the status in its UPDATE. (Found by the chaos
/// run: a `resent` overwrote `confirmed` and the message stayed unsettled with no check left.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_committing_during_finish_is_not_overwritten() {
    use callback_service::store::{AttemptOutcome, Store};
    use sqlx::{Connection, Executor};

    let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
    let store = std::sync::Arc::new(Store::connect(&db).await.unwrap());
    let id = Uuid::now_v7();
    let check: Check = serde_json::from_value(serde_json::json!({
        "message_id": id, "routing_key": "order.created", "business_key": "o-1",
        "attempt": 0, "published_at": now_ms(),
    }))
    .unwrap();
    store.record_check("orders", &check).await.unwrap();
    assert_eq!(store.claim(&id.to_string(), 0).await.unwrap(), Some(0));

    // The confirm's transaction holds the row, not committed yet.
    let mut confirm = sqlx::PgConnection::connect(&db).await.unwrap();
    confirm.execute("BEGIN").await.unwrap();
    sqlx::query("UPDATE messages SET status = 'confirmed' WHERE message_id = $1")
        .bind(id.to_string())
        .execute(&mut confirm)
        .await
        .unwrap();
    let finishing = tokio::spawn({
        let (store, id) = (store.clone(), id.to_string());
        async move { store.finish(&id, 1, &AttemptOutcome::Resent { next_check_at: now_ms() }).await }
    });
    // `finish` has read `pending` and now waits for the row lock.
    let probe = sqlx::PgPool::connect(&db).await.unwrap();
    wait_for("finish to wait for the row lock", Duration::from_secs(10), || async {
        let (waiting,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM pg_locks WHERE NOT granted")
            .fetch_one(&probe)
            .await
            .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    confirm.execute("COMMIT").await.unwrap();
    assert!(finishing.await.unwrap().unwrap(), "the resend happened and must count");

    let row = store.get(&id.to_string()).await.unwrap().unwrap();
    assert_eq!(row.status, Status::Confirmed, "the confirm was overwritten");
    assert_eq!(row.resend_count, 1);
}
