//! The backlog deferral: a check whose consumer's queue lags waits instead of resending into
//! it, and past the max deferral a queue nobody reads still waits; once it is read again, a
//! message that never arrived is resent.

use std::time::Duration;

use crate::{SOON, common::wait_for, harness::Env};
use callback_service::store::Status;

on_both_stores!(a_lagging_consumer_defers_checks_instead_of_resending);

async fn a_lagging_consumer_defers_checks_instead_of_resending(url: &str) {
    let mut env = Env::start(url, |c| {
        c.consumer_queues = vec![("points".into(), "points.orders".into())];
        c.backlog_threshold = 5;
        c.max_deferral = Duration::from_secs(60);
    })
    .await;
    // The consumer is down: 30 published orders pile up in its queue.
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(env.order(&format!("o-{i}"), true).await);
    }
    // Every first check has been decided once its row carries the producer.
    for id in &ids {
        wait_for("the first check", SOON, || async { env.row(*id).await.filter(|r| r.producer == "orders") })
            .await;
    }
    assert_eq!(env.hook.total_calls(), 0, "resent into a backlog");
    env.start_consumer().await;
    for id in &ids {
        let row = env.wait_status(*id, Status::Confirmed, SOON).await;
        assert_eq!(row.resend_count, 0);
    }
    assert_eq!(env.hook.total_calls(), 0);

    // Past the max deferral a queue nobody reads still defers (a resend would only join the
    // backlog); once its consumer drains it, the message that never arrived is resent.
    env.shutdown().await;
    let mut env = Env::start(url, |c| {
        c.consumer_queues = vec![("points".into(), "points.orders".into())];
        c.backlog_threshold = 0;
        c.max_deferral = Duration::from_secs(3);
    })
    .await;
    let lost = env.order("o-lost", false).await;
    for i in 0..3 {
        env.order(&format!("o-queued-{i}"), true).await;
    }
    // Deferred again after the bound: a deferral waits at most a tier (3 s), so a due time 6 s
    // past the preparation was decided more than 3 s after it.
    let row = wait_for("a deferral past the max deferral", SOON, || async {
        env.row(lost).await.filter(|r| r.next_check_at > r.published_at + 6_000)
    })
    .await;
    assert_eq!(row.resend_count, 0, "resent into a queue nobody reads");
    assert!(env.hook.calls_for(lost).is_empty());
    env.start_consumer().await;
    wait_for("a resend once the queue is read", SOON, || async {
        env.row(lost).await.filter(|r| r.resend_count >= 1)
    })
    .await;
    let first_call = env.hook.calls_for(lost);
    assert!(!first_call.is_empty());
    env.shutdown().await;
}
