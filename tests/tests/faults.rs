//! The fault matrix, small: each row runs the real binaries under load — two consumers, `points`
//! and `shipping`, every order expecting both — injects one fault mid-load, and asserts from the
//! stores that nothing committed was lost, each consumer applied every confirmed order exactly
//! once (its ledger and its balances), everything settled and no resend number was answered
//! RESENT twice for one message. `scripts/chaos` runs the same rows big.
//!
//! The rows run one at a time: several break the shared broker (restart, memory alarm), and two
//! cores cannot run two deployments under load side by side anyway.

use std::{path::PathBuf, time::Duration};

use recheck_tests::faults::{self, Broker, Fault, Outcome, POINTS, SHIPPING, Scenario};
use tokio::sync::Mutex;

const ORDERS: u64 = 2_000;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn row(fault: Fault, tune: impl FnOnce(&mut Scenario)) -> Outcome {
    recheck_tests::init_tracing();
    let _turn = ONE_AT_A_TIME.lock().await;
    let kit = recheck_tests::kit().await;
    let postgres_url = match fault.needs_postgres() {
        true => Some(kit.postgres.fresh_database().await.unwrap().url),
        false => None,
    };
    let cluster = match fault {
        Fault::NodeKilled => Some(
            tokio::task::spawn_blocking(|| recheck_tests::RabbitCluster::start_private(3))
                .await
                .unwrap()
                .unwrap(),
        ),
        _ => None,
    };
    let broker = Broker { rabbit: &kit.rabbit, cluster: cluster.as_ref(), postgres_url };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("faults-{fault:?}"));
    let mut scenario = Scenario::new(fault, ORDERS, dir);
    tune(&mut scenario);
    let outcome = faults::run(&broker, &recheck_tests::demo::bin_dir().unwrap(), &scenario).await.unwrap();
    if let Some(cluster) = cluster {
        tokio::task::spawn_blocking(move || cluster.shutdown()).await.unwrap().unwrap();
    }
    eprintln!("{}", serde_json::to_string_pretty(&outcome).unwrap());
    outcome.check().unwrap();
    assert!(
        outcome.committed_at_fault < outcome.verdict.committed,
        "the fault fired after the load ended ({} of {} committed)",
        outcome.committed_at_fault,
        outcome.verdict.committed
    );
    outcome
}

/// Never published: both consumers miss it. Lost on the way to shipping only: points applies and
/// confirms it within milliseconds, seconds before its CHECK, and the message must still be
/// resent until shipping has it too (points absorbs that resend as a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_message_dropped_for_all_or_for_one_consumer() {
    let o = row(Fault::BusinessDropped, |_| {}).await;
    let skipped = o.load["skipped_publish"].as_u64().unwrap();
    assert!(skipped > 0, "no publish was skipped");
    assert!(o.verdict.resent_messages > skipped, "a message lost for shipping only was not resent");
    assert!(o.consumer(POINTS).duplicates_absorbed > 0, "points saw no resend of a message it had");
}

/// Only shipping's confirms are lost; points' arrive. A message is confirmed only by both, so
/// shipping's missing confirm must bring a resend, which both inboxes absorb.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_dropped_by_one_consumer() {
    let o = row(Fault::ConfirmDropped, |_| {}).await;
    assert!(o.verdict.resent_messages > 0, "no resend after shipping's dropped confirms");
    for name in [POINTS, SHIPPING] {
        assert!(o.consumer(name).duplicates_absorbed > 0, "{name} absorbed no resend");
    }
}

/// points killed: shipping's confirms come first for the orders in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_mid_batch() {
    row(Fault::ConsumerKilled, |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_service_killed_mid_batch() {
    row(Fault::CallbackKilled, |_| {}).await;
}

/// Orders committed but not yet published when the producer dies are resent by their checks. It
/// dies with its pool of reserved CHECKs full (no RELEASE): those ids are settled `unused` by
/// their checks, and none of them shows as `failed` (a committed one `void` or `unused` would be
/// lost, which `check` refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_killed_mid_load() {
    let o = row(Fault::ProducerKilled, |_| {}).await;
    assert!(o.verdict.unused > 0, "no reservation of the killed producer was settled unused");
    assert_eq!(o.verdict.failed, 0, "a message failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_hook_down_for_several_check_rounds() {
    let o = row(Fault::HookDown, |_| {}).await;
    assert_eq!(o.verdict.failed, 0, "a message failed although the hook came back");
    assert!(o.verdict.resent_messages > 0, "nothing was resent after the hook came back");
}

/// A hook that accepts and never answers: every call is a timeout until the circuit opens; the
/// checks wait (deferred, not failed) and everything is resent once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_hook_hangs_for_several_check_rounds() {
    let o = row(Fault::HookHangs, |_| {}).await;
    assert_eq!(o.verdict.failed, 0, "a message failed although the hook came back");
    assert!(o.verdict.resent_messages > 0, "nothing was resent after the hook answered again");
}

/// The callback's PostgreSQL away for longer than sqlx's acquire timeout: checks and confirms
/// wait in place (a hot requeue would park them at the delivery limit) and all reconcile after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_store_down_mid_load() {
    let o = row(Fault::StoreDown, |_| {}).await;
    assert_eq!(o.verdict.failed, 0, "a message failed over a store outage");
    assert_eq!(o.parked, 0, "messages parked during the store outage");
}

/// CHECKs the broker parked by the delivery limit before the callback recorded a row of them:
/// nothing in the store says they exist, so only the sweeper's pass over the parking queue can
/// bring them back. Without it their messages stay pending (their confirms wait for a CHECK).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_parked_by_the_delivery_limit_are_recovered_from_parking() {
    let o = row(Fault::ChecksParked, |_| {}).await;
    assert_eq!(o.verdict.failed, 0, "a message failed although its CHECK was recovered");
    assert_eq!(o.parked, 0, "a CHECK or CONFIRM left in parking");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_load() {
    row(Fault::BrokerRestart, |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_mid_load() {
    row(Fault::MemoryAlarm, |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_broker_connections_cut_mid_load() {
    row(Fault::ConnectionsCut, |_| {}).await;
}

/// A black hole: bytes stop, sockets stay open, then traffic flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_broker_connections_stalled_mid_load() {
    row(Fault::ConnectionsStalled, |_| {}).await;
}

/// Quorum queues replicated on three nodes; the node every service is connected to dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cluster_node_killed_mid_load() {
    row(Fault::NodeKilled, |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_callback_services_on_one_postgres_store() {
    let o = row(Fault::TwoCallbacks, |_| {}).await;
    assert!(o.verdict.hook_calls > 0, "no hook calls: nothing tested the two instances' claims");
}

/// No resend storm: shipping is down for longer than the check delay (3 s) while the load goes on
/// and points confirms; with the backlog deferral, the checks waiting on shipping wait instead of
/// resending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_down_longer_than_the_check_delay_no_resend_storm() {
    let o = row(Fault::ConsumerDown, |_| {}).await;
    assert!(o.resent_share() <= 0.01, "resent {:.2} % of messages", o.resent_share() * 100.0);
}

/// Shipping down for 25 s, longer than a max deferral of 10 s: past the bound a check still waits
/// while shipping's queue has no consumer, since a resend there could not be read any sooner. With
/// the bound counted from the message's preparation alone, the checks coming due after 10 s
/// resent nearly every message shipping missed (a storm the long outages of `chaos --long` hit at
/// the default 10 min).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_down_longer_than_the_max_deferral_no_resend_storm() {
    let o = row(Fault::ConsumerDown, |s| {
        s.outage = Duration::from_secs(25);
        s.callback_env.push(("RECHECK_MAX_DEFERRAL".into(), "10s".into()));
        s.dir.set_file_name("faults-ConsumerDown-past-max-deferral");
    })
    .await;
    assert_eq!(o.verdict.failed, 0, "a message failed");
    assert!(o.resent_share() <= 0.01, "resent {:.2} % of messages", o.resent_share() * 100.0);
}

/// The same outage without the deferral: the checks that come due while shipping is down resend
/// into its backlog (points' confirms do not settle them). Shows the storm test above measures
/// the deferral, not luck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_down_without_deferral_resends_into_the_backlog() {
    let o = row(Fault::ConsumerDown, |s| {
        s.deferral = false;
        s.dir.set_file_name("faults-ConsumerDown-no-deferral");
    })
    .await;
    assert!(o.resent_share() > 0.05, "only {:.2} % resent without the deferral", o.resent_share() * 100.0);
}
