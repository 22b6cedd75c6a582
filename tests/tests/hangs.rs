//! Things that never answer, and the bounds that keep the callback service going:
//! - a producer hook that accepts calls and never answers gets no more calls once its circuit
//!   opens, not even from the checks already waiting for an RPC slot;
//! - an ack the connection can never take gives up after `SETTLE_TIMEOUT` (lapin's own never does).

#[macro_use]
mod common;
#[path = "callback/harness.rs"]
#[allow(dead_code)] // the callback suite uses the rest of it
mod harness;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use harness::Env;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use recheck::{
    Outgoing, Publisher, PublisherConfig, Subscription, SubscriptionConfig,
    broker::control::publish_checks,
    message::{Check, CheckBatch, now_ms},
    subscription::SETTLE_TIMEOUT,
};
use recheck_proto::v1::{
    ResendRequest, ResendResponse,
    resend_hook_server::{ResendHook, ResendHookServer},
};
use recheck_tests::{
    metrics::{Metrics, get},
    proxy::FaultProxy,
};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SOON: Duration = Duration::from_secs(60);

async fn scrape(env: &Env) -> Metrics {
    let (status, body) = get(env.ops_addrs[0], "/metrics").await.unwrap();
    assert_eq!(status, 200);
    Metrics::parse(body).unwrap()
}

/// A producer hook that takes every `Resend` call and never answers; counts the calls that reach
/// it. It serves nothing else (a hook written before `ResendBatch`).
struct Hangs(Arc<AtomicU32>);

#[tonic::async_trait]
impl ResendHook for Hangs {
    async fn resend(
        &self,
        _: tonic::Request<ResendRequest>,
    ) -> Result<tonic::Response<ResendResponse>, tonic::Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

/// One CHECK of 200 open messages for a hook that accepts calls and never answers, with 4 RPC
/// slots, a 1 s RPC timeout and one `Resend` per check: the first two rounds of calls time out
/// and the fifth failure opens the circuit. The checks still waiting for a slot then defer
/// without calling, so the calls that reach the hook stop at the ones made before it opened
/// (threshold + slots), and when the deferred checks come round again only the half-open probes
/// get through. Were the circuit looked at before the slot, all 200 would call, one timeout each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_never_answers_gets_no_more_calls_once_its_circuit_opens() {
    hook_that_never_answers(false).await;
}

/// The same hook with `ResendBatch` on (the default): it answers the batch UNIMPLEMENTED, and
/// the delivery's claimed checks fall back to `Resend` per id. Those calls must stop once the
/// circuit opens too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_never_answers_gets_no_more_calls_once_its_circuit_opens_after_a_batch() {
    hook_that_never_answers(true).await;
}

async fn hook_that_never_answers(resend_batch: bool) {
    const CHECKS: u32 = 200;
    const SLOTS: u32 = 4;
    const THRESHOLD: u32 = 5;
    let calls = Arc::new(AtomicU32::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = listener.local_addr().unwrap();
    // Aborted at the end: a graceful stop would wait for calls that never end.
    let hook = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ResendHookServer::new(Hangs(calls.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let db = recheck_tests::kit().await.postgres.fresh_database().await.unwrap();
    let env = Env::start(&db.url, |c| {
        c.producers = vec![format!("orders=http://{hook_addr}").parse().unwrap()];
        c.rpc_timeout = Duration::from_secs(1);
        c.max_rpcs_per_producer = SLOTS as usize;
        c.breaker_threshold = THRESHOLD;
        c.resend_batch = resend_batch;
    })
    .await;
    let deferred = |m: &Metrics| m.sum("recheck_checks_deferred_total", &[("reason", "circuit")]) as u32;
    let before = deferred(&scrape(&env).await);
    let checks = (0..CHECKS)
        .map(|i| Check {
            message_id: Uuid::now_v7(),
            routing_key: "order.created".into(),
            business_key: format!("o-hangs-{i}"),
            attempt: 1,
            published_at: now_ms(),
            expect: Some(vec!["points".into()]),
            traceparent: None,
            reserved: false,
        })
        .collect();
    let batch = CheckBatch::new("orders", checks);
    publish_checks(&env.publisher, &env.topology, &batch, Duration::from_secs(1)).await.unwrap();

    // Every check of the delivery has called or deferred.
    let called = common::wait_for("each check called or deferred", SOON, || async {
        let (n, d) = (calls.load(Ordering::SeqCst), deferred(&scrape(&env).await) - before);
        (n + d >= CHECKS).then_some(n)
    })
    .await;
    assert!(
        called <= THRESHOLD + SLOTS,
        "{called} calls reached the hook; the circuit opened after {THRESHOLD}"
    );
    // The deferred checks come round again (1–2 s later) and defer again: only probes call.
    let again = 2 * (CHECKS - called) - 2;
    common::wait_for("the deferred checks deferred a second time", SOON, || async {
        (deferred(&scrape(&env).await) - before >= again).then_some(())
    })
    .await;
    let probes = calls.load(Ordering::SeqCst) - called;
    eprintln!("{called} calls until the circuit opened, {probes} after");
    assert!(probes <= 2, "{probes} calls after the circuit opened (one probe per open period)");
    env.shutdown().await;
    hook.abort();
}

/// A connection that takes no more bytes: the proxy black-holes it, and publishes on it fill
/// the socket buffers and lapin's send buffer until one cannot be written within a second.
/// lapin resolves an ack only once its frame is written, so its own ack stays pending;
/// `subscription::ack` gives up after `SETTLE_TIMEOUT`, and the loop that called it goes on
/// (to find the channel lost and resubscribe) instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_the_connection_cannot_take_gives_up_after_the_settle_timeout() {
    recheck_tests::init_tracing();
    let vhost = recheck_tests::kit().await.rabbit.fresh_vhost().await.unwrap();
    let proxy = FaultProxy::start_for(&vhost.url).unwrap();
    let publisher =
        Publisher::connect(PublisherConfig::new(proxy.url_for(&vhost.url), "ack-bound")).await.unwrap();
    let channel = publisher.create_channel().await.unwrap();
    let queue = "ack-bound";
    channel.queue_declare(queue.into(), Default::default(), Default::default()).await.unwrap();
    for _ in 0..2 {
        let body = b"held";
        let msg = Outgoing { exchange: "", routing_key: queue, body, properties: Default::default() };
        publisher.publish(msg).await.unwrap();
    }
    let config = SubscriptionConfig {
        batch_linger: Duration::from_millis(200),
        ..SubscriptionConfig::new(queue, queue)
    };
    let mut subscription = Subscription::new(publisher.clone(), config).await.unwrap();
    let mut held = Vec::new();
    while held.len() < 2 {
        held.extend(subscription.next_batch(&CancellationToken::new()).await.unwrap().unwrap());
    }

    proxy.stall();
    let body = vec![0u8; 1 << 20];
    let mut written = 0;
    loop {
        let publish = channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &body,
            Default::default(),
        );
        if timeout(Duration::from_secs(1), publish).await.is_err() {
            break;
        }
        written += 1;
        assert!(written < 512, "512 MiB written into a black-holed connection");
    }
    eprintln!("{written} MiB written before the connection stopped taking bytes");
    let acker = held[0].acker.clone();
    let unbounded = tokio::spawn(async move { acker.ack(BasicAckOptions::default()).await });
    let started = Instant::now();
    let within = SETTLE_TIMEOUT + Duration::from_secs(2);
    let bounded = timeout(within, recheck::subscription::ack(&held[1], false)).await;
    let bounded = bounded.unwrap_or_else(|_| panic!("subscription::ack still waiting after {within:?}"));
    let took = started.elapsed();
    assert!(matches!(bounded, Err(recheck::Error::Timeout(_))), "{bounded:?} after {took:?}");
    assert!(!unbounded.is_finished(), "lapin's own ack finished: {:?}", unbounded.await);
    unbounded.abort();
    drop(proxy);
}
