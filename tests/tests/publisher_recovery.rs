//! Broker-confirmed publishing across a broker restart (`stop_app` / `start_app`)
//! in the middle of a stream: every publish returns Ok, and every message is on
//! the queue afterwards (duplicates allowed, counted).

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Drain, wait_for};
use recheck::{
    Outgoing, Publisher, PublisherConfig, Topology, message::BusinessHeaders, topology::parse_tiers,
};
use uuid::Uuid;

/// At least this many messages, and the stream runs on until the broker is back.
const MESSAGES: usize = 3_000;
const TASKS: usize = 30;
/// Each task goes on publishing this many messages once the broker is back.
const AFTER_RESTART: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_survive_a_broker_restart_mid_stream() {
    recheck_tests::init_tracing();
    // A broker of its own: a restart must not disturb suites sharing the kit's broker.
    let rabbit = tokio::task::spawn_blocking(recheck_tests::Rabbit::start_private).await.unwrap().unwrap();
    let vhost = rabbit.fresh_vhost().await.unwrap();
    let topology = Topology::new("recheck", parse_tiers("1s").unwrap());
    let setup = Publisher::connect(PublisherConfig::new(vhost.as_str(), "setup")).await.unwrap();
    let channel = setup.create_channel().await.unwrap();
    topology.declare(&channel).await.unwrap();
    topology.declare_consumer_queue(&channel, "restart.test", &["restart.#"]).await.unwrap();
    setup.close().await;

    let mut config = PublisherConfig::new(vhost.as_str(), "restart-test");
    config.publish_timeout = Duration::from_secs(120);
    config.confirm_timeout = Duration::from_secs(5);
    let publisher = Publisher::connect(config).await.unwrap();
    let confirmed = Arc::new(AtomicUsize::new(0));
    let restarted = Arc::new(AtomicBool::new(false));
    let exchange = topology.events_exchange();

    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (publisher, confirmed, exchange, restarted) =
                (publisher.clone(), confirmed.clone(), exchange.clone(), restarted.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                // Publish until the broker is back and the stream has gone on a while.
                let mut after_restart = 0;
                for i in 0.. {
                    if restarted.load(Ordering::Relaxed) {
                        after_restart += 1;
                        if after_restart > AFTER_RESTART && i >= MESSAGES / TASKS {
                            break;
                        }
                    }
                    let headers = BusinessHeaders {
                        message_id: Uuid::now_v7(),
                        producer: "restart".into(),
                        business_key: format!("{t}-{i}"),
                        attempt: 0,
                    };
                    let body = headers.business_key.clone().into_bytes();
                    let msg = Outgoing {
                        exchange: &exchange,
                        routing_key: "restart.x",
                        body: &body,
                        properties: headers.to_properties(),
                    };
                    publisher.publish(msg).await.unwrap_or_else(|e| panic!("publish {t}-{i}: {e}"));
                    confirmed.fetch_add(1, Ordering::Relaxed);
                    ids.push(headers.message_id);
                }
                ids
            })
        })
        .collect();

    // Restart the broker while the stream is flowing.
    wait_for("a quarter of the stream", Duration::from_secs(60), || {
        let n = confirmed.load(Ordering::Relaxed);
        async move { (n >= MESSAGES / 4).then_some(()) }
    })
    .await;
    tracing::info!("stop_app");
    rabbit.stop_app().await.unwrap();
    tracing::info!("stopped");
    let at_stop = confirmed.load(Ordering::Relaxed);
    rabbit.start_app().await.unwrap();
    restarted.store(true, Ordering::Relaxed);
    tracing::info!("started");

    let mut published = Vec::new();
    for t in tasks {
        published.extend(t.await.unwrap());
    }
    let total = published.len();
    tracing::info!(total, "publishers done");
    assert!(total >= at_stop + TASKS * AFTER_RESTART, "too little was published after the restart");

    // Count what the queue holds, by message id.
    let consumer = publisher.create_channel().await.unwrap();
    let mut drain = Drain::new(&consumer, "restart.test").await;
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    while seen.len() < total {
        let d = drain.next(Duration::from_secs(30)).await;
        let id = BusinessHeaders::from_properties(&d.properties).unwrap().message_id;
        *seen.entry(id).or_default() += 1;
    }
    // Late duplicates still count.
    while let Some(d) = drain.try_next(Duration::from_secs(1)).await {
        *seen.entry(BusinessHeaders::from_properties(&d.properties).unwrap().message_id).or_default() += 1;
    }
    let missing = published.iter().filter(|id| !seen.contains_key(id)).count();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "restart after {at_stop} confirms: {total} published, {missing} missing, {duplicates} duplicates"
    );
    assert_eq!(missing, 0);
    publisher.close().await;
    tokio::task::spawn_blocking(move || rabbit.shutdown()).await.unwrap().unwrap();
}
