//! The order service in-process against a real broker: each fault does what the
//! load report assumes, and the resend hook finds committed orders (and only those).

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use recheck_proto::{
    demo::v1::{CreateOrderRequest, CreateOrderResponse, Fault, orders_client::OrdersClient},
    v1::{ResendOutcome, ResendRequest, resend_hook_client::ResendHookClient},
};
use tokio_util::sync::CancellationToken;
use upstream_demo::{Config, build};

const QUEUE: &str = "points.order-created";

#[tokio::test]
async fn faults_commit_publish_and_resend_as_the_report_assumes() {
    let vhost = recheck_tests::kit().await.rabbit.fresh_vhost().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        broker: recheck::service::BrokerArgs {
            amqp_url: vhost.url.clone().into(),
            prefix: "recheck".into(),
            delay_tiers: vec![Duration::from_secs(5), Duration::from_secs(30)],
            tls: Default::default(),
        },
        database_url: format!("sqlite://{}?mode=rwc", dir.path().join("orders.db").display()).into(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        tls: Default::default(),
        producer_name: "orders".into(),
        expect: vec!["points".into(), "shipping".into()],
        check_delay: Duration::from_secs(30),
        grace: Duration::ZERO,
        reserve: true,
        reserve_max_age: Duration::from_secs(15),
        reserve_ahead: Duration::from_secs(1),
        reserve_max_pool: 2000,
        hook_tokens: None,
        ops: recheck::ops::OpsArgs { ops_addr: "127.0.0.1:0".parse().unwrap() },
        log: None,
        trace: Default::default(),
    };
    let app = build(config).await.unwrap();
    let (addr, store) = (app.grpc_addr(), app.store().clone());
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run(stop.clone()));

    // The consumer's queue, so the business message is routable.
    let connection = recheck::publisher::connect(&vhost.url, "test").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    recheck::Topology::new("recheck", vec![Duration::from_secs(5)])
        .declare_consumer_queue(&channel, QUEUE, &["order.created"])
        .await
        .unwrap();
    let queued = || async {
        let q =
            channel.queue_declare(QUEUE.into(), QueueDeclareOptions::default().passive(), Default::default());
        q.await.unwrap().message_count()
    };

    let mut orders = OrdersClient::connect(format!("http://{addr}")).await.unwrap();
    let mut create = async |fault: Fault| -> CreateOrderResponse {
        let request = CreateOrderRequest { customer: "ada".into(), amount_cents: 1250, fault: fault.into() };
        orders.create_order(request).await.unwrap().into_inner()
    };
    let plain = create(Fault::None).await;
    assert!(plain.committed && plain.published && !plain.order_id.is_empty());
    let skipped = create(Fault::SkipPublish).await;
    assert!(skipped.committed && !skipped.published);
    let aborted = create(Fault::AbortAfterCheck).await;
    assert!(!aborted.committed && !aborted.published && aborted.order_id.is_empty());
    assert!(!aborted.message_id.is_empty());
    assert_eq!(store.count().await.unwrap(), 2);
    // The publish finishes after the answer: wait for it (the skipped one never comes).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while queued().await < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the business message never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(queued().await, 1);

    // Every CHECK expects both consumers (`--expect`): the three orders' and the reserved ones
    // the pool holds (the service reserves by default, so there may be hundreds), all in the
    // 30 s tier.
    let tier =
        recheck::Topology::new("recheck", vec![Duration::from_secs(30)]).tier_queue(Duration::from_secs(30));
    let mut ids = std::collections::HashSet::new();
    while let Some(check) =
        channel.basic_get(tier.as_str().into(), lapin::options::BasicGetOptions::default()).await.unwrap()
    {
        let body: serde_json::Value = serde_json::from_slice(&check.delivery.data).unwrap();
        for c in body["checks"].as_array().unwrap() {
            assert_eq!(c["expect"], serde_json::json!(["points", "shipping"]), "{c}");
            ids.insert(c["message_id"].as_str().unwrap().to_owned());
        }
    }
    for order in [&plain, &skipped, &aborted] {
        assert!(ids.contains(&order.message_id), "no CHECK for {} among {}", order.message_id, ids.len());
    }

    let mut hook = ResendHookClient::connect(format!("http://{addr}")).await.unwrap();
    let mut resend = async |r: &CreateOrderResponse| -> ResendOutcome {
        let request = ResendRequest {
            message_id: r.message_id.clone(),
            producer: "orders".into(),
            routing_key: "order.created".into(),
            business_key: r.order_id.clone(),
            attempt: 1,
            published_at: 1,
        };
        hook.resend(request).await.unwrap().into_inner().outcome()
    };
    assert_eq!(resend(&skipped).await, ResendOutcome::Resent);
    assert_eq!(queued().await, 2);
    // Rolled back and past the (zero) grace period: never committed, so void.
    assert_eq!(resend(&aborted).await, ResendOutcome::NotFound);

    stop.cancel();
    server.await.unwrap().unwrap();
    connection.close(200, "done".into()).await.ok();
}
