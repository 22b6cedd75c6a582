//! The SDK's `ResendHook` over a real gRPC connection and a real broker:
//! RESENT (republished, same id, attempt header), NOT_FOUND, RETRY_LATER.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{Drain, fresh_broker};
use recheck::{
    Lookup, Producer, ProducerConfig, ResendHookService, ResendSource,
    hook::BoxError,
    message::{BusinessHeaders, now_ms},
};
use recheck_proto::v1::{ResendOutcome, ResendRequest, resend_hook_client::ResendHookClient};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A producer's store as the hook sees it: committed payloads, and one id whose lookup fails.
struct Orders {
    committed: HashMap<Uuid, Vec<u8>>,
    broken: Uuid,
}

impl ResendSource for Orders {
    async fn load(&self, message_id: Uuid, _business_key: &str) -> Result<Lookup, BoxError> {
        if message_id == self.broken {
            return Err("database is down".into());
        }
        Ok(self.committed.get(&message_id).cloned().map_or(Lookup::NotCommitted, Lookup::Found))
    }
}

#[tokio::test]
async fn the_hook_answers_all_three_outcomes_over_grpc() {
    let (_vhost, publisher, topology) = fresh_broker().await;
    let channel = publisher.create_channel().await.unwrap();
    topology.declare_consumer_queue(&channel, "points.orders", &["order.created"]).await.unwrap();

    let (committed_id, broken) = (Uuid::now_v7(), Uuid::now_v7());
    let source = Orders { committed: HashMap::from([(committed_id, b"{\"order\":1}".to_vec())]), broken };
    let producer = Producer::new(publisher.clone(), topology.clone(), ProducerConfig::new("orders"));
    let hook = ResendHookService::new(Arc::new(source), producer, Duration::from_secs(60));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        tonic::transport::Server::builder().add_service(hook.into_server()).serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move { stop.cancelled().await },
        )
    });
    let mut client = ResendHookClient::connect(format!("http://{addr}")).await.unwrap();
    let request = |id: Uuid, published_at: i64| ResendRequest {
        message_id: id.to_string(),
        producer: "orders".into(),
        routing_key: "order.created".into(),
        business_key: "o-1".into(),
        attempt: 2,
        published_at,
    };

    // Committed → republished with the same id and the attempt header, then RESENT.
    let resent = client.resend(request(committed_id, now_ms())).await.unwrap().into_inner();
    assert_eq!(resent.outcome(), ResendOutcome::Resent, "{}", resent.reason);
    let d = Drain::new(&channel, "points.orders").await.next(Duration::from_secs(10)).await;
    let headers = BusinessHeaders::from_properties(&d.properties).unwrap();
    assert_eq!((headers.message_id, headers.attempt, headers.producer.as_str()), (committed_id, 2, "orders"));
    assert_eq!(d.data, b"{\"order\":1}");

    // Not committed and younger than the grace period → RETRY_LATER; older → NOT_FOUND.
    let young = client.resend(request(Uuid::now_v7(), now_ms())).await.unwrap().into_inner();
    assert_eq!(young.outcome(), ResendOutcome::RetryLater, "{}", young.reason);
    let old = client.resend(request(Uuid::now_v7(), now_ms() - 61_000)).await.unwrap().into_inner();
    assert_eq!(old.outcome(), ResendOutcome::NotFound, "{}", old.reason);

    // A failing lookup is RETRY_LATER with the reason, never NOT_FOUND.
    let failing = client.resend(request(broken, now_ms() - 3_600_000)).await.unwrap().into_inner();
    assert_eq!(failing.outcome(), ResendOutcome::RetryLater);
    assert!(failing.reason.contains("database is down"), "{}", failing.reason);

    // Malformed requests are refused with a status, not a guess.
    let mut bad = request(committed_id, now_ms());
    bad.message_id = "not-a-uuid".into();
    let status = client.resend(bad).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // A routing key AMQP cannot carry is refused before any publish (lapin would panic in a
    // debug build and write a corrupt frame in a release one).
    for key in [String::new(), "k".repeat(256)] {
        let mut bad = request(committed_id, now_ms());
        bad.routing_key = key.clone();
        let status = client.resend(bad).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{} bytes: {status:?}", key.len());
        assert!(status.message().contains("routing_key"), "{status:?}");
    }

    stop.cancel();
    server.await.unwrap().unwrap();
}

/// `prepare` refuses an event the callback service would park (its CHECK would be lost after
/// `prepare` answered Ok), before anything is published.
#[tokio::test]
async fn prepare_refuses_what_the_callback_would_park() {
    let (_vhost, publisher, topology) = fresh_broker().await;
    let producer = Producer::new(publisher.clone(), topology.clone(), ProducerConfig::new("orders"));
    let event = |routing_key: String, business_key: &str, expect: Option<Vec<String>>| recheck::Event {
        routing_key,
        business_key: business_key.into(),
        payload: b"{}".to_vec(),
        expect,
    };
    let refused = [
        event("k".repeat(256), "o", None),
        event(String::new(), "o", None),
        event("order.created".into(), "o\u{0}", None),
        event("order.created".into(), "o", Some(vec!["a,b".into()])),
        event("order.created".into(), "o", Some(vec![String::new()])),
    ];
    for e in refused {
        let err = producer.prepare(e.clone()).await.unwrap_err();
        assert!(matches!(err, recheck::Error::Invalid(_)), "{e:?}: {err}");
    }
    let channel = publisher.create_channel().await.unwrap();
    for tier in &topology.tiers {
        let passive = lapin::options::QueueDeclareOptions::durable().passive();
        let queue = topology.tier_queue(*tier);
        let declared =
            channel.queue_declare(queue.as_str().into(), passive, Default::default()).await.unwrap();
        assert_eq!(declared.message_count(), 0, "a refused event published a CHECK to {queue}");
    }
    producer.prepare(event("order.created".into(), "o", Some(vec!["points".into()]))).await.unwrap();
}
