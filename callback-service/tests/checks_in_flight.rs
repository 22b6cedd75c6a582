//! `--max-checks-in-flight` bounds the checks decided at once over all CHECK deliveries, and a
//! delivery with more ids than the bound still goes through (alone).

use std::time::Duration;

use callback_service::{Config, store::Status};
use recheck::{
    Publisher, PublisherConfig, Topology,
    message::{Check, CheckBatch, now_ms},
    producer::publish_checks,
    topology::parse_tiers,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_bigger_than_the_bound_still_go_through() {
    let vhost = recheck_tests::kit().await.rabbit.fresh_vhost().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        Config::for_tests(vhost.as_str(), format!("sqlite://{}/callback.db?mode=rwc", dir.path().display()));
    config.broker.delay_tiers = parse_tiers("100ms").unwrap();
    config.max_checks_in_flight = 3;
    let app = callback_service::build(config).await.unwrap();
    let store = app.store().clone();
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run(stop.clone()));

    // No hook for producer "ghost": each check ends `failed`, so each was decided.
    let publisher = Publisher::connect(PublisherConfig::new(vhost.as_str(), "test")).await.unwrap();
    let topology = Topology::new("recheck", parse_tiers("100ms").unwrap());
    let mut ids = Vec::new();
    for size in [10, 1, 3, 7] {
        let checks: Vec<Check> = (0..size)
            .map(|_| Check {
                message_id: Uuid::now_v7(),
                routing_key: "order.created".into(),
                business_key: "o".into(),
                attempt: 0,
                published_at: now_ms(),
                expect: None,
                traceparent: None,
            })
            .collect();
        ids.extend(checks.iter().map(|c| c.message_id.to_string()));
        let batch = CheckBatch::new("ghost", checks);
        publish_checks(&publisher, &topology, &batch, Duration::from_millis(100)).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = store.get_many(&ids).await.unwrap();
        if rows.len() == ids.len() && rows.values().all(|r| r.status == Status::Failed) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "checks left undecided: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    running.await.unwrap().unwrap();
    publisher.close().await;
}
