//! `expect` with several consumers, in every arrival order, end to end: a real broker, the real
//! callback service on SQLite and PostgreSQL, CHECKs and CONFIRMs published as an integrating
//! team's producer and consumers would (no SDK consumer), and a producer hook that counts its
//! calls. The rule under test (README "When a message counts as confirmed"): a confirm never
//! settles a message whose CHECK has not arrived; the CHECK weighs the confirms stored meanwhile.

mod common;
#[path = "callback/harness.rs"]
#[allow(dead_code)] // the callback suite uses the rest
mod harness;

use std::time::Duration;

use callback_service::store::{MessageRow, Status};
use harness::Env;
use recheck::message::{Check, CheckBatch, Confirm, ConfirmBatch, Outcome, now_ms};
use recheck_proto::v1 as pb;
use uuid::Uuid;

use common::wait_for;

const SOON: Duration = Duration::from_secs(30);
/// Messages of the concurrent-confirms test: enough CONFIRM batches that both instances ingest
/// for seconds, side by side.
const MANY: usize = 3_000;
/// Ids per CONFIRM batch there.
const PER_BATCH: usize = 100;

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}/callback.db?mode=rwc", dir.path().display());
                super::$name(&url, 1).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
                super::$name(&db.url, 1).await;
            })*
        }
        /// The same with two callback instances on one PostgreSQL store: the CHECK and each
        /// CONFIRM may be taken by either.
        mod two_instances {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
                super::$name(&db.url, 2).await;
            })*
        }
    };
}

on_both_stores!(
    confirms_before_the_check,
    one_confirm_before_the_check_is_not_enough,
    the_check_before_the_confirms,
    one_confirm_before_the_check_the_other_after,
    a_rejection_by_one_of_two,
    without_expect_one_confirm_before_the_check_suffices,
);

async fn env(url: &str, instances: usize) -> Env {
    let mut env = Env::start(url, |_| {}).await;
    for _ in 1..instances {
        env.start_callback_service(|_| {}).await;
    }
    env
}

/// A committed order the hook can resend, with no CHECK published yet.
fn committed(env: &Env) -> Uuid {
    let id = Uuid::now_v7();
    env.orders.0.lock().unwrap().insert(id, b"{\"order\":\"o\"}".to_vec());
    id
}

async fn check(env: &Env, id: Uuid, expect: &[&str]) {
    let check = Check { business_key: format!("key-{id}"), ..recheck_tests::first_check(id, expect) };
    let batch = CheckBatch::new("orders", vec![check]);
    recheck::broker::control::publish_checks(&env.publisher, &env.topology, &batch, Duration::from_secs(1))
        .await
        .unwrap();
}

async fn confirm(env: &Env, consumer: &str, id: Uuid, outcome: Outcome) {
    let detail = (outcome == Outcome::Rejected).then(|| "no such customer".to_owned());
    let batch = ConfirmBatch::new(
        consumer,
        vec![Confirm { message_id: id, outcome, detail, processed_at: now_ms() }],
    );
    publish_confirms(env, &batch).await;
}

async fn publish_confirms(env: &Env, batch: &ConfirmBatch) {
    let body = serde_json::to_vec(batch).unwrap();
    env.publisher
        .publish(recheck::Outgoing {
            exchange: &env.topology.confirms_exchange(),
            routing_key: "",
            body: &body,
            properties: lapin::BasicProperties::default()
                .with_content_type(recheck::message::CONTENT_TYPE_JSON.into()),
        })
        .await
        .unwrap();
}

/// Waits until the store holds `n` confirms of the message.
async fn stored_confirms(env: &Env, id: Uuid, n: usize) -> MessageRow {
    wait_for(&format!("{n} confirms of {id} stored"), SOON, || async {
        let (row, confirms, _) = env.store.details(&id.to_string()).await.unwrap()?;
        (confirms.len() >= n).then_some(row)
    })
    .await
}

/// Waits until the CHECK has been taken (the row knows its producer).
async fn checked(env: &Env, id: Uuid) -> MessageRow {
    wait_for(&format!("the check of {id} taken"), SOON, || async {
        env.row(id).await.filter(|r| r.checked() && (r.status != Status::Pending || r.attempt > 0))
    })
    .await
}

async fn admin(env: &Env) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
    pb::admin_client::AdminClient::connect(format!("http://{}", env.admin_addrs[0])).await.unwrap()
}

/// Why the message is where it is: the reason of its latest history row into its current status
/// (a resend recorded after the message was settled, during its RPC, comes later and does not
/// count).
async fn last_reason(env: &Env, id: Uuid) -> String {
    let id = id.to_string();
    env.store.latest_reasons(&[id.as_str()]).await.unwrap().remove(&id).unwrap_or_default()
}

/// Both expected consumers answer before the CHECK: the CHECK confirms, with no RPC. Until then
/// the message is pending, shown as awaiting its check, and the row learns the CHECK's fields.
async fn confirms_before_the_check(url: &str, instances: usize) {
    let env = env(url, instances).await;
    let id = committed(&env);
    confirm(&env, "a", id, Outcome::Processed).await;
    // An original and its resend in one CONFIRM: folded, not parked.
    let twice = ConfirmBatch::new(
        "b",
        vec![
            Confirm { message_id: id, outcome: Outcome::Processed, detail: None, processed_at: now_ms() },
            Confirm { message_id: id, outcome: Outcome::Duplicate, detail: None, processed_at: now_ms() },
        ],
    );
    publish_confirms(&env, &twice).await;
    let row = stored_confirms(&env, id, 2).await;
    assert_eq!(row.status, Status::Pending, "confirmed before its CHECK said who is expected");
    assert!(row.awaiting_check());
    let shown = admin(&env).await.get_message(pb::GetMessageRequest { message_id: id.to_string() }).await;
    let shown = shown.unwrap().into_inner().message.unwrap();
    assert!(shown.awaiting_check && shown.status == pb::MessageStatus::Pending as i32, "{shown:?}");
    let stats = admin(&env).await.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.awaiting_check, 1);

    check(&env, id, &["a", "b"]).await;
    let row = env.wait_status(id, Status::Confirmed, SOON).await;
    assert_eq!(env.hook.total_calls(), 0, "a confirmed message was resent");
    assert_eq!((row.producer.as_str(), row.routing_key.as_str()), ("orders", "order.created"));
    assert_eq!(row.business_key, format!("key-{id}"));
    assert!(row.published_at > 0 && row.expect == Some(vec!["a".into(), "b".into()]), "{row:?}");
    assert_eq!(last_reason(&env, id).await, "confirmed by a, b at its check (the confirms came first)");
    let stats = admin(&env).await.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.awaiting_check, 0);
    env.shutdown().await;
}

/// The reported defect: `a` confirms, `b` never does. The CHECK finds `b` missing and resends; the
/// message stays unconfirmed until `b` answers.
async fn one_confirm_before_the_check_is_not_enough(url: &str, instances: usize) {
    let env = env(url, instances).await;
    let id = committed(&env);
    confirm(&env, "a", id, Outcome::Processed).await;
    stored_confirms(&env, id, 1).await;
    check(&env, id, &["a", "b"]).await;
    let row = env.wait_status(id, Status::Resent, SOON).await;
    assert_eq!(row.expect, Some(vec!["a".into(), "b".into()]));
    assert_eq!(env.hook.calls_for(id), vec![(1, 1)], "one resend, numbered 1");
    confirm(&env, "b", id, Outcome::Processed).await;
    env.wait_status(id, Status::Confirmed, SOON).await;
    assert_eq!(last_reason(&env, id).await, "confirmed by b");
    env.shutdown().await;
}

async fn the_check_before_the_confirms(url: &str, instances: usize) {
    let env = env(url, instances).await;
    let id = committed(&env);
    check(&env, id, &["a", "b"]).await;
    checked(&env, id).await;
    confirm(&env, "a", id, Outcome::Processed).await;
    let row = stored_confirms(&env, id, 1).await;
    assert!(matches!(row.status, Status::Pending | Status::Resent), "{:?} on a alone", row.status);
    confirm(&env, "b", id, Outcome::Duplicate).await;
    env.wait_status(id, Status::Confirmed, SOON).await;
    assert_eq!(last_reason(&env, id).await, "confirmed by b");
    env.shutdown().await;
}

async fn one_confirm_before_the_check_the_other_after(url: &str, instances: usize) {
    let env = env(url, instances).await;
    let id = committed(&env);
    confirm(&env, "b", id, Outcome::Processed).await;
    stored_confirms(&env, id, 1).await;
    check(&env, id, &["a", "b"]).await;
    let row = checked(&env, id).await;
    assert_ne!(row.status, Status::Confirmed, "b alone confirmed it");
    confirm(&env, "a", id, Outcome::Processed).await;
    env.wait_status(id, Status::Confirmed, SOON).await;
    assert_eq!(last_reason(&env, id).await, "confirmed by a");
    env.shutdown().await;
}

/// A rejection settles in any order: before the CHECK (which then finds it rejected and makes no
/// RPC), and after it.
async fn a_rejection_by_one_of_two(url: &str, instances: usize) {
    let env = env(url, instances).await;
    let before = committed(&env);
    confirm(&env, "a", before, Outcome::Processed).await;
    confirm(&env, "b", before, Outcome::Rejected).await;
    env.wait_status(before, Status::Rejected, SOON).await;
    // No producer to name yet: a redrive must wait for the CHECK.
    let redrive = pb::RedriveRequest { message_id: before.to_string() };
    let refused = admin(&env).await.redrive(redrive.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    check(&env, before, &["a", "b"]).await;
    let row = wait_for("the check to fill in the rejected row", SOON, || async {
        env.row(before).await.filter(MessageRow::checked)
    })
    .await;
    assert_eq!(row.status, Status::Rejected);
    assert_eq!(env.hook.calls_for(before), vec![], "a rejected message was resent");
    let redriven = admin(&env).await.redrive(redrive).await.unwrap().into_inner().message.unwrap();
    assert_eq!((redriven.producer.as_str(), redriven.status), ("orders", pb::MessageStatus::Pending as i32));

    let after = committed(&env);
    check(&env, after, &["a", "b"]).await;
    checked(&env, after).await;
    confirm(&env, "b", after, Outcome::Rejected).await;
    env.wait_status(after, Status::Rejected, SOON).await;
    assert_eq!(last_reason(&env, after).await, "rejected by b: no such customer");
    env.shutdown().await;
}

async fn without_expect_one_confirm_before_the_check_suffices(url: &str, instances: usize) {
    let env = env(url, instances).await;
    let id = committed(&env);
    confirm(&env, "a", id, Outcome::Processed).await;
    let row = stored_confirms(&env, id, 1).await;
    assert_eq!(row.status, Status::Pending);
    check(&env, id, &[]).await;
    env.wait_status(id, Status::Confirmed, SOON).await;
    assert_eq!(env.hook.total_calls(), 0);
    assert_eq!(last_reason(&env, id).await, "confirmed by a at its check (the confirms came first)");
    env.shutdown().await;
}

/// Two consumers confirm thousands of messages at once, one instance ingesting each consumer's
/// confirms (the CONFIRMs alternate a, b, a, b…, which the queue hands out in turn), after every
/// CHECK was taken and its next check put an hour away. Each message is confirmed by whichever
/// transaction commits second: it waits for the first one's row lock, then reads both confirms.
/// Without the lock (`insert_or_lock` as `ON CONFLICT DO NOTHING`) each transaction reads only its
/// own confirm, decides "b missing" / "a missing", and the message waits for its next check and a
/// resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_confirms_of_two_consumers_at_once_settle_without_a_resend() {
    let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
    let env = env(&db.url, 2).await;
    let ids: Vec<Uuid> = (0..MANY).map(|_| committed(&env)).collect();
    let checks: Vec<Check> = ids.iter().map(|id| recheck_tests::first_check(*id, &["a", "b"])).collect();
    // What a CHECK delivery records when none of its confirms came first, then what a deferral
    // writes: the row expects a and b, pending, its next check an hour away.
    let refs: Vec<&Check> = checks.iter().collect();
    env.store.record_first_checks("orders", &refs).await.unwrap();
    let texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    env.store.reschedule(&text_refs, now_ms() + 3_600_000).await.unwrap();

    let batch = |consumer: &str, ids: &[Uuid]| {
        ConfirmBatch::new(consumer, ids.iter().copied().map(recheck_tests::processed).collect())
    };
    let batches: Vec<ConfirmBatch> =
        ids.chunks(PER_BATCH).flat_map(|chunk| [batch("a", chunk), batch("b", chunk)]).collect();
    futures_util::future::join_all(batches.iter().map(|b| publish_confirms(&env, b))).await;

    let (store, _) = recheck::db::connect(&db.url).await.unwrap();
    let count = |sql: &'static str| {
        let store = store.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&store).await.unwrap() as usize }
    };
    // Each ingest commits its confirms and the moves they make together: once every confirm is
    // stored, every message they settle is settled.
    let stored = wait_for("every confirm stored", Duration::from_secs(120), || async {
        let n = count("SELECT COUNT(*) FROM confirms").await;
        (n == 2 * MANY).then_some(n)
    })
    .await;
    let confirmed = count("SELECT COUNT(*) FROM messages WHERE status = 'confirmed'").await;
    assert_eq!(
        confirmed,
        MANY,
        "{} of {MANY} left for their next check ({stored} confirms)",
        MANY - confirmed
    );
    assert_eq!(env.hook.total_calls(), 0, "a message was resent");
    // Both instances ingested, so their transactions could meet.
    for addr in &env.ops_addrs {
        let (_, text) = recheck_tests::metrics::get(*addr, "/metrics").await.unwrap();
        let metrics = recheck_tests::metrics::Metrics::parse(text).unwrap();
        let ingested = metrics.sum(recheck::telemetry::CONFIRMS, &[]);
        assert!(ingested > 0.0, "the instance at {addr} ingested no confirm");
    }
    store.close().await;
    env.shutdown().await;
}
