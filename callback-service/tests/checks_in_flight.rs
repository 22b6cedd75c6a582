//! `--max-checks-in-flight` bounds the checks decided at once over all CHECK deliveries (a hook
//! that holds each call sees no more at once than the bound), and a delivery with more ids than
//! the bound still goes through (alone).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use callback_service::{Config, store::Status};
use recheck::{
    Publisher, PublisherConfig, Topology,
    broker::control::publish_checks,
    message::{Check, CheckBatch, now_ms},
    topology::parse_tiers,
};
use recheck_proto::v1::{
    ResendOutcome, ResendRequest, ResendResponse,
    resend_hook_server::{ResendHook, ResendHookServer},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a hook that holds every call a while saw: how many it held at once, at most.
#[derive(Default)]
struct Holding {
    now: AtomicUsize,
    peak: AtomicUsize,
    calls: AtomicUsize,
}

struct Hook(Arc<Holding>);

#[tonic::async_trait]
impl ResendHook for Hook {
    async fn resend(
        &self,
        _: tonic::Request<ResendRequest>,
    ) -> Result<tonic::Response<ResendResponse>, tonic::Status> {
        let now = self.0.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.peak.fetch_max(now, Ordering::SeqCst);
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.0.now.fetch_sub(1, Ordering::SeqCst);
        let answer = ResendResponse { outcome: ResendOutcome::NotFound.into(), reason: "held".into() };
        Ok(tonic::Response::new(answer))
    }
}

fn checks(n: usize) -> Vec<Check> {
    (0..n)
        .map(|_| Check {
            message_id: Uuid::now_v7(),
            routing_key: "order.created".into(),
            business_key: "o".into(),
            attempt: 0,
            published_at: now_ms(),
            expect: None,
            traceparent: None,
            reserved: false,
        })
        .collect()
}

/// Eight one-check deliveries, all due at once, against a hook that holds each call 300 ms:
/// with the bound at 3 the hook never holds more than 3 (and does hold 3: the bound, not the
/// load, is what stops it), with RPC slots per producer far above it. With the bound at 300 it
/// held all 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_decided_at_once_never_exceed_the_bound() {
    let vhost = recheck_tests::kit().await.rabbit.fresh_vhost().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hook = Arc::new(Holding::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ResendHookServer::new(Hook(hook.clone())))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    let mut config =
        Config::for_tests(vhost.as_str(), format!("sqlite://{}/callback.db?mode=rwc", dir.path().display()));
    config.broker.delay_tiers = parse_tiers("100ms").unwrap();
    config.producers = vec![format!("orders={hook_url}").parse().unwrap()];
    config.max_checks_in_flight = 3;
    config.max_rpcs_per_producer = 32;
    let app = callback_service::build(config).await.unwrap();
    let store = app.store().clone();
    let running = tokio::spawn(app.run(stop.clone()));

    let publisher = Publisher::connect(PublisherConfig::new(vhost.as_str(), "test")).await.unwrap();
    let topology = Topology::new("recheck", parse_tiers("100ms").unwrap());
    let mut ids = Vec::new();
    for _ in 0..8 {
        let batch = CheckBatch::new("orders", checks(1));
        ids.extend(batch.checks.iter().map(|c| c.message_id.to_string()));
        publish_checks(&publisher, &topology, &batch, Duration::from_millis(100)).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = store.get_many(&ids).await.unwrap();
        if rows.len() == ids.len() && rows.values().all(|r| r.status == Status::Void) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "checks left undecided: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(hook.calls.load(Ordering::SeqCst), 8, "one call per check");
    assert_eq!(hook.peak.load(Ordering::SeqCst), 3, "calls held at once");
    stop.cancel();
    running.await.unwrap().unwrap();
    serving.await.unwrap().unwrap();
    publisher.close().await;
}

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
        let batch = CheckBatch::new("ghost", checks(size));
        ids.extend(batch.checks.iter().map(|c| c.message_id.to_string()));
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
