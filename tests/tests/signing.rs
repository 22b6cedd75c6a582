//! Signed CONFIRMs, end to end with the real binaries: the consumer signs, the callback service
//! requires signatures, and forged CONFIRMs (unsigned, or signed with another key) for every order
//! are parked with a reason and never stop a resend — an order whose business message was never
//! published is still resent and reaches the consumer.

use std::path::PathBuf;
use std::time::Duration;

use recheck::{
    Outgoing, Publisher, PublisherConfig, Topology,
    message::{Confirm, ConfirmBatch, Outcome, now_ms},
    signing::SigningKey,
    topology::parse_tiers,
};
use recheck_tests::deploy::{DeployOptions, Deployment, LoadOptions};

const KEY: &str = "points-signing-key-0123456789";
const ORDERS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_confirms_are_parked_and_never_stop_a_resend() {
    recheck_tests::init_tracing();
    let kit = recheck_tests::kit().await;
    let vhost = kit.rabbit.fresh_vhost().await.unwrap();
    let mut opts =
        DeployOptions::new(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("signing"), vhost.url.clone());
    opts.check_delay = "5s".into();
    opts.callback_env.push(("RECHECK_CONFIRM_KEYS".into(), format!("points={KEY}")));
    opts.consumers[0].env.push(("RECHECK_CONFIRM_KEY".into(), KEY.into()));
    let deployment = Deployment::start(&recheck_tests::demo::bin_dir().unwrap(), &opts).await.unwrap();

    let load = LoadOptions { skip_publish_rate: 0.2, ..LoadOptions::new(ORDERS) };
    let running = deployment.spawn_load(&load).unwrap();
    deployment.wait_committed(ORDERS, Duration::from_secs(60)).await.unwrap();

    // Forge a "processed" CONFIRM for every order before its first check is due (5 s): once
    // unsigned, once signed with a key the callback service does not hold for `points`.
    let orders = recheck::db::connect(&deployment.orders_db).await.unwrap().0;
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT message_id FROM orders").fetch_all(&orders).await.unwrap();
    let confirms: Vec<Confirm> = ids
        .iter()
        .map(|(id,)| Confirm {
            message_id: id.parse().unwrap(),
            outcome: Outcome::Processed,
            detail: None,
            processed_at: now_ms(),
        })
        .collect();
    let body = serde_json::to_vec(&ConfirmBatch::new("points", confirms)).unwrap();
    let topology = Topology::new("recheck", parse_tiers(&opts.tiers).unwrap());
    let publisher = Publisher::connect(PublisherConfig::new(vhost.url.clone(), "forger")).await.unwrap();
    let exchange = topology.confirms_exchange();
    let json = lapin::BasicProperties::default().with_content_type("application/json".into());
    let wrong_key = SigningKey::new("not-the-points-key-at-all").unwrap();
    for properties in [json.clone(), wrong_key.sign_properties(&body, json)] {
        publisher
            .publish(Outgoing { exchange: &exchange, routing_key: "", body: &body, properties })
            .await
            .unwrap();
    }

    let report = recheck_tests::deploy::finish_load(running).await.unwrap();
    let skipped = report["skipped_publish"].as_u64().unwrap();
    assert!(skipped > 0);
    let verdict = deployment.wait_settled(Duration::from_secs(120)).await.unwrap();
    assert_eq!(verdict.lost, 0, "a forged confirm stopped a resend: {verdict:?}");
    assert_eq!(verdict.resent_messages, skipped, "{verdict:?}");
    verdict.exactly_once().unwrap();
    assert_eq!(verdict.confirmed, ORDERS, "the consumer's signed confirms were not all accepted");

    // Both forgeries parked, each with its reason.
    let channel = publisher.create_channel().await.unwrap();
    let mut parked = Vec::new();
    while let Some(message) = channel
        .basic_get(topology.parking_queue().into(), lapin::options::BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let headers = message.delivery.properties.headers().clone().unwrap_or_default();
        match headers.inner().get(recheck::message::HEADER_PARK_REASON) {
            Some(lapin::types::AMQPValue::LongString(reason)) => parked.push(reason.to_string()),
            other => panic!("parked without a reason header: {other:?}"),
        }
    }
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert!(parked.iter().any(|r| r.contains("unsigned")), "{parked:?}");
    assert!(parked.iter().any(|r| r.contains("bad signature")), "{parked:?}");
    publisher.close().await;
    orders.close().await;
    deployment.stop().await.unwrap();
}
