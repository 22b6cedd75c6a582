//! The SDK's `ResendHook` over a real gRPC connection and a real broker:
//! RESENT (republished, same id, attempt header), NOT_FOUND, RETRY_LATER; the same per id of a
//! `ResendBatch`, whose bad entries refuse the whole call.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Drain, fresh_broker};
use recheck::{
    Lookup, Producer, ProducerConfig, ResendHookService, ResendSource,
    hook::BoxError,
    message::{BusinessHeaders, now_ms},
};
use recheck_proto::v1::{
    ResendBatchEntry, ResendBatchRequest, ResendOutcome, ResendRequest, resend_hook_client::ResendHookClient,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A producer's store as the hook sees it: committed payloads, and one id whose lookup fails.
/// It has no `load_many`: a `ResendBatch` goes through the default, one `load` per id.
struct Orders {
    committed: HashMap<Uuid, Vec<u8>>,
    broken: Uuid,
    loads: AtomicUsize,
}

impl ResendSource for Orders {
    async fn load(&self, message_id: Uuid, _business_key: &str) -> Result<Lookup, BoxError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
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
    let source = Orders {
        committed: HashMap::from([(committed_id, b"{\"order\":1}".to_vec())]),
        broken,
        loads: AtomicUsize::new(0),
    };
    let producer = Producer::new(publisher.clone(), topology.clone(), ProducerConfig::new("orders"));
    let hook = ResendHookService::new(Arc::new(source), producer, Duration::from_secs(60));
    let (addr, stop, server) = serve(hook).await;
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

/// `ResendBatch`: each entry answered as `Resend` would answer it, in order and by id, after one
/// lookup for all (here the default `load_many`, one `load` per id); a batch with one bad entry
/// is refused whole, before any lookup or publish.
#[tokio::test]
async fn the_batch_answers_each_id_and_refuses_a_bad_entry() {
    let (_vhost, publisher, topology) = fresh_broker().await;
    let channel = publisher.create_channel().await.unwrap();
    topology.declare_consumer_queue(&channel, "points.orders", &["order.created"]).await.unwrap();
    let (a, b, broken) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let committed = HashMap::from([(a, b"{\"order\":\"a\"}".to_vec()), (b, b"{\"order\":\"b\"}".to_vec())]);
    let source = Arc::new(Orders { committed, broken, loads: AtomicUsize::new(0) });
    let producer = Producer::new(publisher.clone(), topology.clone(), ProducerConfig::new("orders"));
    let hook = ResendHookService::new(source.clone(), producer, Duration::from_secs(60));
    let (addr, stop, server) = serve(hook).await;
    let mut client = ResendHookClient::connect(format!("http://{addr}")).await.unwrap();
    let entry = |id: Uuid, published_at: i64| ResendBatchEntry {
        message_id: id.to_string(),
        producer: "orders".into(),
        routing_key: "order.created".into(),
        business_key: format!("key-{id}"),
        attempt: 3,
        published_at,
        traceparent: String::new(),
    };
    let batch = |entries: Vec<ResendBatchEntry>| ResendBatchRequest { entries };

    // Two committed (republished), one young and one old that never committed.
    let (young, old) = (Uuid::now_v7(), Uuid::now_v7());
    let entries =
        vec![entry(a, now_ms()), entry(young, now_ms()), entry(old, now_ms() - 61_000), entry(b, now_ms())];
    let answer = client.resend_batch(batch(entries)).await.unwrap().into_inner();
    let results: Vec<_> = answer.results.iter().map(|r| (r.message_id.clone(), r.outcome())).collect();
    let expected = [
        (a, ResendOutcome::Resent),
        (young, ResendOutcome::RetryLater),
        (old, ResendOutcome::NotFound),
        (b, ResendOutcome::Resent),
    ]
    .map(|(id, outcome)| (id.to_string(), outcome));
    assert_eq!(results, expected, "{answer:?}");
    assert_eq!(source.loads.load(Ordering::SeqCst), 4, "the default load_many asks load once per id");
    let mut drain = Drain::new(&channel, "points.orders").await;
    let mut republished = HashMap::new();
    for d in drain.take(2, Duration::from_secs(10)).await {
        let headers = BusinessHeaders::from_properties(&d.properties).unwrap();
        assert_eq!((headers.attempt, headers.business_key), (3, format!("key-{}", headers.message_id)));
        republished.insert(headers.message_id, d.data);
    }
    assert_eq!(
        republished,
        HashMap::from([(a, b"{\"order\":\"a\"}".to_vec()), (b, b"{\"order\":\"b\"}".to_vec())])
    );

    // A failing lookup fails the batch's lookup: every id RETRY_LATER, none NOT_FOUND.
    let entries = vec![entry(a, now_ms() - 3_600_000), entry(broken, now_ms() - 3_600_000)];
    let answer = client.resend_batch(batch(entries)).await.unwrap().into_inner();
    for r in &answer.results {
        assert_eq!(r.outcome(), ResendOutcome::RetryLater, "{r:?}");
        assert!(r.reason.contains("database is down"), "{r:?}");
    }

    // One bad entry refuses the whole call, naming it, and nothing is looked up or published.
    let loads = source.loads.load(Ordering::SeqCst);
    let mut bad_id = entry(a, now_ms());
    bad_id.message_id = "not-a-uuid".into();
    let mut other_producer = entry(b, now_ms());
    other_producer.producer = "billing".into();
    let mut bad_key = entry(b, now_ms());
    bad_key.routing_key = String::new();
    for (entries, says) in [
        (vec![entry(a, now_ms()), bad_id], "entry 1: message_id \"not-a-uuid\" is not a UUID"),
        (vec![other_producer, entry(a, now_ms())], "entry 0: this hook serves producer \"orders\""),
        (vec![entry(a, now_ms()), bad_key], "entry 1: routing_key"),
        (vec![entry(a, now_ms()), entry(a, now_ms())], "entry 1: message_id"),
    ] {
        let status = client.resend_batch(batch(entries)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(says), "{says}: {status:?}");
    }
    assert_eq!(source.loads.load(Ordering::SeqCst), loads, "a refused batch looked ids up");
    let oversized = (0..=recheck::hook::MAX_BATCH_ENTRIES).map(|_| entry(Uuid::now_v7(), now_ms())).collect();
    let status = client.resend_batch(batch(oversized)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(drain.try_next(Duration::from_millis(300)).await.is_none(), "a refused batch published");

    stop.cancel();
    server.await.unwrap().unwrap();
}

/// Serves `hook` on a free port until the token is cancelled.
async fn serve<S: ResendSource>(
    hook: ResendHookService<S>,
) -> (std::net::SocketAddr, CancellationToken, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
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
    (addr, stop, server)
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
