//! Topology and producer-side checks against a real broker.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{Drain, depth, fresh_broker};
use recheck::{
    Event, Producer, ProducerConfig, Topology,
    message::{CONTENT_TYPE_JSON, CheckBatch, Limits},
};
use tokio::time::Instant;

fn event(key: &str) -> Event {
    Event {
        routing_key: "order.created".into(),
        business_key: key.into(),
        payload: format!("{{\"order\":\"{key}\"}}").into_bytes(),
        expect: Some(vec!["points".into()]),
    }
}

#[tokio::test]
async fn declaring_twice_is_harmless_and_every_queue_is_quorum() {
    let (vhost, publisher, topology) = fresh_broker().await;
    let channel = publisher.create_channel().await.unwrap();
    topology.declare(&channel).await.expect("second declare");
    topology.declare_consumer_queue(&channel, "points.orders", &["order.*"]).await.unwrap();
    topology.declare_consumer_queue(&channel, "points.orders", &["order.*"]).await.unwrap();

    let listed = recheck_tests::kit()
        .await
        .rabbit
        .ctl(&["list_queues", "-q", "--no-table-headers", "-p", &vhost.name, "name", "type"])
        .await
        .unwrap();
    let types: HashMap<&str, &str> =
        listed.lines().filter_map(|l| l.split_once('\t')).map(|(n, t)| (n.trim(), t.trim())).collect();
    let mut expected = vec![
        "recheck.checks",
        "recheck.confirms",
        "recheck.parking",
        "recheck.checks.delay.1s",
        "recheck.checks.delay.3s",
    ];
    expected.push("points.orders");
    for queue in expected {
        assert_eq!(types.get(queue), Some(&"quorum"), "{queue} in {listed}");
    }
    assert_eq!(types.len(), 6, "unexpected queues: {listed}");

    // A changed definition is refused, not silently applied.
    let other = Topology { delivery_limit: 99, ..topology.clone() };
    let fresh = publisher.create_channel().await.unwrap();
    assert!(other.declare(&fresh).await.is_err(), "changed x-delivery-limit was accepted");
}

#[tokio::test]
async fn a_check_on_the_1s_tier_reaches_the_checks_queue_after_its_delay() {
    let (_vhost, publisher, topology) = fresh_broker().await;
    let config = ProducerConfig { check_delay: Duration::from_secs(1), ..ProducerConfig::new("orders") };
    let producer = Producer::new(publisher.clone(), topology.clone(), config);

    let started = Instant::now();
    let prepared = producer.prepare(event("o-1")).await.unwrap();
    let channel = publisher.create_channel().await.unwrap();
    assert_eq!(depth(&channel, &topology.checks_queue()).await, 0, "check arrived without delay");

    let d = Drain::new(&channel, &topology.checks_queue()).await.next(Duration::from_secs(20)).await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(1), "check arrived after {elapsed:?}");
    assert_eq!(d.properties.content_type().as_ref().map(|c| c.as_str()), Some(CONTENT_TYPE_JSON));
    let batch = CheckBatch::decode(&d.data, Some(CONTENT_TYPE_JSON), Limits::default()).unwrap();
    assert_eq!(batch.producer, "orders");
    assert_eq!(batch.checks.len(), 1);
    assert_eq!(batch.checks[0].message_id, prepared.message_id);
    assert_eq!(batch.checks[0].business_key, "o-1");
    assert_eq!(batch.checks[0].expect.as_deref(), Some(&["points".to_owned()][..]));
}

#[tokio::test]
async fn concurrent_prepares_share_check_messages() {
    let (_vhost, publisher, topology) = fresh_broker().await;
    let mut config = ProducerConfig { check_delay: Duration::from_secs(1), ..ProducerConfig::new("orders") };
    config.group_commit.spacing = Duration::from_millis(20);
    let producer = Producer::new(publisher.clone(), topology.clone(), config);

    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let producer = producer.clone();
            tokio::spawn(async move { producer.prepare(event(&format!("o-{i}"))).await.unwrap().message_id })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }

    // Wait until every id is on the checks queue, then count the messages they came in.
    let channel = publisher.create_channel().await.unwrap();
    let mut seen = HashMap::new();
    let mut messages = 0;
    let mut checks = Drain::new(&channel, &topology.checks_queue()).await;
    while seen.len() < ids.len() {
        let d = checks.next(Duration::from_secs(20)).await;
        messages += 1;
        for c in CheckBatch::decode(&d.data, None, Limits::default()).unwrap().checks {
            *seen.entry(c.message_id).or_insert(0) += 1;
        }
    }
    assert!(ids.iter().all(|id| seen.get(id) == Some(&1)), "an id is missing or repeated");
    assert!(messages <= 20, "200 prepares took {messages} CHECK messages: no group commit");
}
