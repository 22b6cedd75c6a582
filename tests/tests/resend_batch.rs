//! Batched check-back: the unconfirmed checks of one CHECK delivery reach their producer as one
//! `ResendBatch`, counted on the producer's side (its `ResendSource` sees one `load_many` with
//! every id, and no `load`); `--resend-batch=false` makes it one `Resend` per id; and a hook
//! that serves only `Resend` gets one `Resend` per id, asked for a batch only once.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use callback_service::{
    Config,
    store::{MessageRow, Status, Store},
};
use common::{Drain, fresh_broker, wait_for};
use recheck::{
    Lookup, Producer, ProducerConfig, Publisher, ResendHookService, ResendSource, Topology,
    broker::control::publish_checks,
    hook::BoxError,
    message::{BusinessHeaders, Check, CheckBatch, now_ms},
};
use recheck_proto::v1::{
    ResendBatchRequest, ResendBatchResponse, ResendRequest, ResendResponse,
    resend_hook_server::{ResendHook, ResendHookServer},
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status as GrpcStatus};
use uuid::Uuid;

/// Unconfirmed checks in one CHECK delivery.
const N: usize = 20;

/// The producer's committed orders; counts how the hook asked for them.
#[derive(Default)]
struct Orders {
    committed: Mutex<HashMap<Uuid, Vec<u8>>>,
    /// Ids per `load_many` call, in call order.
    batches: Mutex<Vec<usize>>,
    loads: AtomicUsize,
}

impl ResendSource for Orders {
    async fn load(&self, message_id: Uuid, _business_key: &str) -> Result<Lookup, BoxError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        let committed = self.committed.lock().unwrap();
        Ok(committed.get(&message_id).cloned().map_or(Lookup::NotCommitted, Lookup::Found))
    }

    async fn load_many(&self, ids: &[(Uuid, String)]) -> Result<HashMap<Uuid, Vec<u8>>, BoxError> {
        self.batches.lock().unwrap().push(ids.len());
        let committed = self.committed.lock().unwrap();
        Ok(ids.iter().filter_map(|(id, _)| Some((*id, committed.get(id)?.clone()))).collect())
    }
}

/// A hook written before `ResendBatch`: it answers UNIMPLEMENTED (counted), and serves `Resend`.
struct ResendOnly {
    sdk: ResendHookService<Orders>,
    batch_calls: AtomicUsize,
}

/// The served side of a shared [`ResendOnly`] (the test keeps the other).
struct Shared(Arc<ResendOnly>);

#[tonic::async_trait]
impl ResendHook for Shared {
    async fn resend(&self, request: Request<ResendRequest>) -> Result<Response<ResendResponse>, GrpcStatus> {
        let (outcome, reason) = self.0.sdk.handle(request.get_ref()).await?;
        Ok(Response::new(ResendResponse { outcome: outcome.into(), reason }))
    }

    async fn resend_batch(
        &self,
        _request: Request<ResendBatchRequest>,
    ) -> Result<Response<ResendBatchResponse>, GrpcStatus> {
        self.0.batch_calls.fetch_add(1, Ordering::SeqCst);
        Err(GrpcStatus::unimplemented("ResendBatch is not served here"))
    }
}

/// A broker, a producer with `orders`, its hook served by `serve`, and a callback service.
struct Env {
    _vhost: recheck_tests::Vhost,
    publisher: Publisher,
    topology: Topology,
    orders: Arc<Orders>,
    store: Store,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start(resend_batch: bool, serve: impl FnOnce(ResendHookService<Orders>) -> Router) -> Env {
        let (vhost, publisher, topology) = fresh_broker().await;
        let channel = publisher.create_channel().await.unwrap();
        topology.declare_consumer_queue(&channel, "points.orders", &["order.created"]).await.unwrap();
        let producer = Producer::new(publisher.clone(), topology.clone(), ProducerConfig::new("orders"));
        let orders = Arc::new(Orders::default());
        let hook = ResendHookService::new(orders.clone(), producer, Duration::ZERO);
        let stop = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook_addr = listener.local_addr().unwrap();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(serve(hook).serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()));

        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}/callback.db?mode=rwc", dir.path().display());
        let mut config = Config::for_tests(vhost.as_str(), database_url.as_str());
        config.broker.delay_tiers = topology.tiers.clone();
        config.producers = vec![format!("orders=http://{hook_addr}").parse().unwrap()];
        config.resend_batch = resend_batch;
        // Nobody confirms: the check after the first resend fails the message instead of
        // resending again, so every hook call a test counts is a first resend.
        config.max_resends = 1;
        let app = callback_service::build(config).await.unwrap();
        tokio::spawn(app.run(stop.clone()));
        let store = Store::connect(&database_url).await.unwrap();
        Env { _vhost: vhost, publisher, topology, orders, store, stop, _dir: dir }
    }

    /// `N` committed orders whose business messages were never published, their checks in one
    /// CHECK message (as the producer's group commit sends them), due in the shortest tier.
    async fn unconfirmed_delivery(&self) -> Vec<Uuid> {
        let ids: Vec<Uuid> = (0..N).map(|_| Uuid::now_v7()).collect();
        let mut committed = HashMap::new();
        let checks = ids
            .iter()
            .map(|id| {
                committed.insert(*id, format!("{{\"order\":\"{id}\"}}").into_bytes());
                Check {
                    message_id: *id,
                    routing_key: "order.created".into(),
                    business_key: format!("o-{id}"),
                    attempt: 0,
                    published_at: now_ms(),
                    expect: Some(vec!["points".into()]),
                    traceparent: None,
                    reserved: false,
                }
            })
            .collect();
        self.orders.committed.lock().unwrap().extend(committed);
        let batch = CheckBatch::new("orders", checks);
        publish_checks(&self.publisher, &self.topology, &batch, Duration::ZERO).await.unwrap();
        ids
    }

    /// Waits until every id was resent once, and its business message republished.
    async fn wait_resent(&self, ids: &[Uuid], drain: &mut Drain) {
        let texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        wait_for("every check resent", Duration::from_secs(30), || async {
            let rows = self.store.get_many(&texts).await.unwrap();
            let resent =
                |r: &MessageRow| r.resend_count == 1 && matches!(r.status, Status::Resent | Status::Failed);
            (rows.values().filter(|r| resent(r)).count() == ids.len()).then_some(())
        })
        .await;
        let mut republished: Vec<Uuid> = drain
            .take(ids.len(), Duration::from_secs(10))
            .await
            .iter()
            .map(|d| BusinessHeaders::from_properties(&d.properties).unwrap().message_id)
            .collect();
        republished.sort();
        let mut expected = ids.to_vec();
        expected.sort();
        assert_eq!(republished, expected);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Router = tonic::transport::server::Router;

fn sdk_hook(hook: ResendHookService<Orders>) -> Router {
    tonic::transport::Server::builder().add_service(hook.into_server())
}

async fn drain(env: &Env) -> Drain {
    Drain::new(&env.publisher.create_channel().await.unwrap(), "points.orders").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unconfirmed_checks_of_one_delivery_are_one_resend_batch() {
    let env = Env::start(true, sdk_hook).await;
    let mut drain = drain(&env).await;
    let ids = env.unconfirmed_delivery().await;
    env.wait_resent(&ids, &mut drain).await;
    assert_eq!(*env.orders.batches.lock().unwrap(), [N], "one ResendBatch holding every id");
    assert_eq!(env.orders.loads.load(Ordering::SeqCst), 0, "no Resend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_batch_false_calls_resend_per_id() {
    let env = Env::start(false, sdk_hook).await;
    let mut drain = drain(&env).await;
    let ids = env.unconfirmed_delivery().await;
    env.wait_resent(&ids, &mut drain).await;
    assert!(env.orders.batches.lock().unwrap().is_empty(), "a ResendBatch with --resend-batch=false");
    assert_eq!(env.orders.loads.load(Ordering::SeqCst), N, "one Resend per id");
}

/// A hook without `ResendBatch` gets one `Resend` per claimed id (none lost, none twice), and the
/// callback service remembers it: the second delivery goes per id without asking again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_without_resend_batch_gets_resend_per_id_and_is_asked_once() {
    let only = Arc::new(Mutex::new(None::<Arc<ResendOnly>>));
    let env = Env::start(true, |sdk| {
        let hook = Arc::new(ResendOnly { sdk, batch_calls: AtomicUsize::new(0) });
        *only.lock().unwrap() = Some(hook.clone());
        tonic::transport::Server::builder().add_service(ResendHookServer::new(Shared(hook)))
    })
    .await;
    let only = only.lock().unwrap().clone().unwrap();
    let mut drain = drain(&env).await;
    for round in 1..=2 {
        let ids = env.unconfirmed_delivery().await;
        env.wait_resent(&ids, &mut drain).await;
        assert_eq!(only.batch_calls.load(Ordering::SeqCst), 1, "round {round}: ResendBatch asked again");
        assert_eq!(env.orders.loads.load(Ordering::SeqCst), round * N, "round {round}: one Resend per id");
    }
    assert!(env.orders.batches.lock().unwrap().is_empty());
}
