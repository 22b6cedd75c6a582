//! A 3-node RabbitMQ cluster, a publisher given every node's URL, and `kill -9` of the node it is
//! connected to in the middle of a steady stream: the publisher moves to another node, the
//! subscription on its connection follows, and every confirmed message is consumed (duplicates
//! allowed, counted). The SDK's quorum queues are replicated on all three nodes.

mod common;

use std::collections::HashMap;
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};
use std::time::{Duration, Instant};

use common::wait_for;
use lapin::options::BasicAckOptions;
use recheck::{
    Outgoing, Publisher, PublisherConfig, Subscription, SubscriptionConfig, Topology,
    message::BusinessHeaders, topology::parse_tiers,
};
use recheck_tests::RabbitCluster;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const QUEUE: &str = "cluster.test";
const TASKS: usize = 8;
/// Messages confirmed before the kill, and by each task after the publisher moved.
const BEFORE_KILL: usize = 400;
const AFTER_MOVE: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_message() {
    recheck_tests::init_tracing();
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(|| RabbitCluster::start_private(3)).await.unwrap().unwrap();
    let booted = started.elapsed();
    let vhost = cluster.fresh_vhost().await.unwrap();
    let topology = Topology::new("recheck", parse_tiers("1s").unwrap());

    let mut config = PublisherConfig::with_urls(vhost.urls.clone(), "cluster-test");
    // Failover waits this long for lapin's recovery (which keeps trying the dead node) first.
    config.recovery_timeout = Duration::from_secs(3);
    config.confirm_timeout = Duration::from_secs(5);
    config.publish_timeout = Duration::from_secs(60);
    let publisher = Publisher::connect(config).await.unwrap();
    let channel = publisher.create_channel().await.unwrap();
    topology.declare(&channel).await.unwrap();
    topology.declare_consumer_queue(&channel, QUEUE, &["cluster.#"]).await.unwrap();
    channel.close(200, "declared".into()).await.unwrap();
    for queue in [QUEUE.to_owned(), topology.checks_queue(), topology.confirms_queue()] {
        let members = cluster.quorum_members(0, &vhost.name, &queue).await.unwrap();
        assert_eq!(members.len(), 3, "{queue} must be replicated on every node: {members:?}");
    }

    // The consumer, on the publisher's connection as in every service.
    let seen: Arc<Mutex<HashMap<Uuid, usize>>> = Arc::default();
    let shutdown = CancellationToken::new();
    let subscription_config = SubscriptionConfig {
        prefetch: 200,
        batch_size: 100,
        batch_linger: Duration::from_millis(5),
        ..SubscriptionConfig::new(QUEUE, "cluster-test")
    };
    let mut subscription = Subscription::new(publisher.clone(), subscription_config).await.unwrap();
    let consumer = tokio::spawn({
        let (seen, shutdown) = (seen.clone(), shutdown.clone());
        async move {
            while let Some(batch) = subscription.next_batch(&shutdown).await.unwrap() {
                {
                    let mut seen = seen.lock().unwrap();
                    for delivery in &batch {
                        let id = BusinessHeaders::from_properties(&delivery.properties).unwrap().message_id;
                        *seen.entry(id).or_default() += 1;
                    }
                }
                let last = batch.last().expect("batches are never empty");
                // A lost ack means a redelivery: a duplicate, which is allowed.
                let _ = last.ack(BasicAckOptions { multiple: true }).await;
            }
        }
    });

    // A steady stream from a few tasks until told to stop.
    let confirmed = Arc::new(AtomicUsize::new(0));
    let moved = Arc::new(AtomicBool::new(false));
    let exchange = topology.events_exchange();
    let publishers: Vec<_> = (0..TASKS)
        .map(|t| {
            let (publisher, confirmed, moved, exchange) =
                (publisher.clone(), confirmed.clone(), moved.clone(), exchange.clone());
            tokio::spawn(async move {
                let (mut ids, mut after_move) = (Vec::new(), 0);
                for i in 0.. {
                    if moved.load(Ordering::Relaxed) {
                        after_move += 1;
                        if after_move > AFTER_MOVE {
                            break;
                        }
                    }
                    let headers = BusinessHeaders {
                        message_id: Uuid::now_v7(),
                        producer: "cluster".into(),
                        business_key: format!("{t}-{i}"),
                        attempt: 0,
                    };
                    let msg = Outgoing {
                        exchange: &exchange,
                        routing_key: "cluster.x",
                        body: headers.business_key.as_bytes(),
                        properties: headers.to_properties(),
                    };
                    publisher.publish(msg).await.unwrap_or_else(|e| panic!("publish {t}-{i}: {e}"));
                    ids.push(headers.message_id);
                    confirmed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                ids
            })
        })
        .collect();

    wait_for("the stream to flow", Duration::from_secs(60), || {
        let n = confirmed.load(Ordering::Relaxed);
        async move { (n >= BEFORE_KILL).then_some(()) }
    })
    .await;
    let victim = cluster.node_of(&publisher.config().amqp_urls[publisher.address()]).unwrap();
    let generation = publisher.generation();
    let at_kill = confirmed.load(Ordering::Relaxed);
    let killed_at = Instant::now();
    cluster.kill(victim).await.unwrap();
    eprintln!("killed node {victim} ({}) after {at_kill} confirms", cluster.node_name(victim));

    wait_for("the publisher to move to a live node", Duration::from_secs(60), || {
        let now = (publisher.generation(), publisher.address());
        async move { (now.0 != generation).then_some(now) }
    })
    .await;
    let failover = killed_at.elapsed();
    let now_on = cluster.node_of(&publisher.config().amqp_urls[publisher.address()]).unwrap();
    assert_ne!(now_on, victim, "the publisher reconnected to the dead node");
    moved.store(true, Ordering::Relaxed);

    let mut published = Vec::new();
    for task in publishers {
        published.extend(task.await.unwrap());
    }
    let total = published.len();
    assert!(total >= at_kill + TASKS * AFTER_MOVE);

    let missing = wait_for("every confirmed message to be consumed", Duration::from_secs(60), || {
        let seen = seen.lock().unwrap();
        let missing = published.iter().filter(|id| !seen.contains_key(id)).count();
        async move { (missing == 0).then_some(missing) }
    })
    .await;
    let duplicates: usize = seen.lock().unwrap().values().map(|n| n - 1).sum();
    eprintln!(
        "{total} published, {missing} missing, {duplicates} duplicates; booted in {booted:?}, moved \
         from node {victim} to {now_on} in {failover:?}"
    );

    // The queue keeps its three members while one is down, and the node comes back into them.
    let members = cluster.quorum_members(now_on, &vhost.name, QUEUE).await.unwrap();
    assert_eq!(members.len(), 3, "{members:?}");
    cluster.restart(victim).await.unwrap();
    let members = cluster.quorum_members(victim, &vhost.name, QUEUE).await.unwrap();
    assert!(members.iter().any(|m| m == cluster.node_name(victim)), "{members:?}");

    shutdown.cancel();
    consumer.await.unwrap();
    publisher.close().await;
    tokio::task::spawn_blocking(move || cluster.shutdown()).await.unwrap().unwrap();
    eprintln!("cluster test took {:?}", started.elapsed());
}
