//! One callback service with a fake producer hook and (optionally) a points
//! consumer, on a fresh vhost and a fresh store.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use callback_service::{
    Config,
    store::{MessageRow, Status, Store},
};
use recheck::{
    Applied, Confirmer, ConsumerConfig, ConsumerLoop, Effect, Event, GroupCommitConfig, Inbox, Incoming,
    Lookup, Producer, ProducerConfig, Publisher, PublisherConfig, ResendHookService, ResendSource, Topology,
    Transient, hook::BoxError, topology::parse_tiers,
};
use recheck_proto::v1::{
    ResendOutcome, ResendRequest, ResendResponse,
    resend_hook_server::{ResendHook, ResendHookServer},
};
use sqlx::{AnyConnection, AnyPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::wait_for;

/// What the fake producer's hook answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Look the order up and republish it (the SDK's real hook).
    Real = 0,
    RetryLater = 1,
    /// The hook fails as a process that is going down would (gRPC UNAVAILABLE).
    Down = 2,
}

/// The producer's committed orders.
#[derive(Default)]
pub struct Orders(pub Mutex<HashMap<Uuid, Vec<u8>>>);

impl ResendSource for Orders {
    async fn load(&self, message_id: Uuid, _key: &str) -> Result<Lookup, BoxError> {
        Ok(self.0.lock().unwrap().get(&message_id).cloned().map_or(Lookup::NotCommitted, Lookup::Found))
    }
}

/// The producer's hook: counts calls per (message, attempt), then answers per [`Mode`].
pub struct Hook {
    pub calls: Mutex<HashMap<(String, u32), u32>>,
    pub mode: AtomicU8,
    real: ResendHookService<Orders>,
}

impl Hook {
    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn calls_for(&self, id: Uuid) -> Vec<(u32, u32)> {
        let calls = self.calls.lock().unwrap();
        let mut v: Vec<_> =
            calls.iter().filter(|((m, _), _)| *m == id.to_string()).map(|((_, a), n)| (*a, *n)).collect();
        v.sort();
        v
    }

    pub fn total_calls(&self) -> u32 {
        self.calls.lock().unwrap().values().sum()
    }
}

/// Arc wrapper so the service can be shared with the test.
pub struct SharedHook(pub Arc<Hook>);

#[tonic::async_trait]
impl ResendHook for SharedHook {
    async fn resend(
        &self,
        request: tonic::Request<ResendRequest>,
    ) -> Result<tonic::Response<ResendResponse>, tonic::Status> {
        let req = request.into_inner();
        *self.0.calls.lock().unwrap().entry((req.message_id.clone(), req.attempt)).or_default() += 1;
        let mode = self.0.mode.load(Ordering::SeqCst);
        let (outcome, reason) = if mode == Mode::RetryLater as u8 {
            (ResendOutcome::RetryLater, "maintenance".to_owned())
        } else if mode == Mode::Down as u8 {
            return Err(tonic::Status::unavailable("shutting down"));
        } else {
            self.0.real.handle(&req).await?
        };
        Ok(tonic::Response::new(ResendResponse { outcome: outcome.into(), reason }))
    }
}

/// Awards points once per order; rejects orders whose key starts with `bad-`.
pub struct Points;

impl Effect for Points {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Incoming<'_>) -> Result<Applied, Transient> {
        if msg.headers.business_key.starts_with("bad-") {
            return Ok(Applied::Rejected("no such customer".into()));
        }
        sqlx::query("INSERT INTO points (message_id) VALUES ($1)")
            .bind(msg.headers.message_id.to_string())
            .execute(&mut *tx)
            .await?;
        Ok(Applied::Processed)
    }
}

pub struct Env {
    pub vhost: recheck_tests::Vhost,
    pub publisher: Publisher,
    pub topology: Topology,
    pub producer: Producer,
    pub orders: Arc<Orders>,
    pub hook: Arc<Hook>,
    pub hook_addr: String,
    pub store: Arc<Store>,
    pub database_url: String,
    pub consumer_db: AnyPool,
    /// gRPC (`Admin`) address of each callback service instance started.
    pub admin_addrs: Vec<std::net::SocketAddr>,
    /// Ops HTTP address (`/metrics`, health, the dashboard) of each instance started.
    pub ops_addrs: Vec<std::net::SocketAddr>,
    stop: CancellationToken,
    consumer_stop: Option<CancellationToken>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub const TIERS: &str = "1s,2s";

impl Env {
    /// A broker vhost, a hook on a free port, and a callback service on `database_url`.
    pub async fn start(database_url: &str, tune: impl FnOnce(&mut Config)) -> Env {
        recheck_tests::init_tracing();
        let kit = recheck_tests::kit().await;
        let vhost = kit.rabbit.fresh_vhost().await.unwrap();
        let topology = Topology::new("recheck", parse_tiers(TIERS).unwrap());
        let publisher =
            Publisher::connect(PublisherConfig::new(vhost.as_str(), "test-producer")).await.unwrap();
        topology.declare(&publisher.create_channel().await.unwrap()).await.unwrap();
        let channel = publisher.create_channel().await.unwrap();
        topology.declare_consumer_queue(&channel, "points.orders", &["order.created"]).await.unwrap();
        let producer_config =
            ProducerConfig { check_delay: Duration::from_secs(1), ..ProducerConfig::new("orders") };
        let producer = Producer::new(publisher.clone(), topology.clone(), producer_config);

        let orders = Arc::new(Orders::default());
        let hook = Arc::new(Hook {
            calls: Mutex::default(),
            mode: AtomicU8::new(Mode::Real as u8),
            real: ResendHookService::new(orders.clone(), producer.clone(), Duration::ZERO),
        });
        let stop = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook_addr = format!("http://{}", listener.local_addr().unwrap());
        let serve = tonic::transport::Server::builder()
            .add_service(ResendHookServer::new(SharedHook(hook.clone())))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        let mut tasks = vec![tokio::spawn(async move { serve.await.unwrap() })];

        let mut env = Env {
            vhost,
            publisher,
            topology,
            producer,
            orders,
            hook,
            hook_addr,
            store: Arc::new(Store::connect(database_url).await.unwrap()),
            database_url: database_url.to_owned(),
            consumer_db: consumer_db().await,
            admin_addrs: Vec::new(),
            ops_addrs: Vec::new(),
            stop,
            consumer_stop: None,
            tasks: Vec::new(),
        };
        env.start_callback_service(tune).await;
        tasks.append(&mut env.tasks);
        env.tasks = tasks;
        env
    }

    pub fn config(&self) -> Config {
        let mut config = Config::for_tests(self.vhost.as_str(), self.database_url.as_str());
        config.broker.delay_tiers = parse_tiers(TIERS).unwrap();
        config.producers = vec![format!("orders={}", self.hook_addr).parse().unwrap()];
        config.max_resends = 2;
        config.rpc_timeout = Duration::from_secs(2);
        config
    }

    /// Starts (another) callback service instance on the same broker and store.
    pub async fn start_callback_service(&mut self, tune: impl FnOnce(&mut Config)) {
        let mut config = self.config();
        tune(&mut config);
        let app = callback_service::build(config).await.unwrap();
        self.admin_addrs.push(app.grpc_addr());
        self.ops_addrs.push(app.ops_addr());
        let stop = self.stop.clone();
        self.tasks.push(tokio::spawn(async move { app.run(stop).await.unwrap() }));
    }

    /// Starts the points consumer (inbox + effect + confirm).
    pub async fn start_consumer(&mut self) {
        let confirmer = Confirmer::new(
            self.publisher.clone(),
            self.topology.clone(),
            "points",
            GroupCommitConfig::default(),
        );
        let consumer = ConsumerLoop::new(
            self.consumer_db.clone(),
            self.publisher.clone(),
            self.topology.clone(),
            confirmer,
            Points,
            ConsumerConfig::new("points", "points.orders"),
        );
        let stop = CancellationToken::new();
        self.consumer_stop = Some(stop.clone());
        self.tasks.push(tokio::spawn(async move {
            consumer.run(stop).await.unwrap();
        }));
    }

    /// Creates an order the safe way: check, commit, then (optionally) publish.
    pub async fn order(&self, key: &str, publish: bool) -> Uuid {
        let event = Event {
            routing_key: "order.created".into(),
            business_key: key.into(),
            payload: format!("{{\"order\":\"{key}\"}}").into_bytes(),
            expect: Some(vec!["points".into()]),
        };
        let prepared = self.producer.prepare(event).await.unwrap();
        let id = prepared.message_id;
        self.orders.0.lock().unwrap().insert(id, prepared.event.payload.clone());
        if publish {
            prepared.publish().await.unwrap();
        }
        id
    }

    pub async fn row(&self, id: Uuid) -> Option<MessageRow> {
        self.store.get(&id.to_string()).await.unwrap()
    }

    /// Waits until the message reaches `status`, returning its row.
    pub async fn wait_status(&self, id: Uuid, status: Status, within: Duration) -> MessageRow {
        wait_for(&format!("{id} to be {status:?}"), within, || async move {
            self.row(id).await.filter(|r| r.status == status)
        })
        .await
    }

    pub async fn points(&self, id: Uuid) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM points WHERE message_id = $1")
            .bind(id.to_string())
            .fetch_one(&self.consumer_db)
            .await
            .unwrap()
    }

    pub async fn shutdown(self) {
        if let Some(stop) = &self.consumer_stop {
            stop.cancel();
        }
        self.stop.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), t).await.expect("a task did not stop").unwrap();
        }
    }
}

/// The consumer's own store (SQLite; the callback store is what varies per test).
async fn consumer_db() -> AnyPool {
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().unwrap().keep();
    let pool = AnyPool::connect(&format!("sqlite://{}/points.db?mode=rwc", dir.display())).await.unwrap();
    Inbox::migrate(&pool).await.unwrap();
    sqlx::query("CREATE TABLE points (message_id TEXT PRIMARY KEY)").execute(&pool).await.unwrap();
    pool
}
