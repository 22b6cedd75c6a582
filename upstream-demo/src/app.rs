//! Build, then run: [`build`] does everything that can fail at start (store,
//! broker, topology, listener), so [`App::run`] only serves until it is told to stop.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use recheck::{
    Producer, ResendHookService,
    ops::{OpsServer, Readiness, report_health},
    tls::ServerTls,
};
use recheck_proto::demo::v1::orders_server::OrdersServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::{Config, OrdersService, Store, resend::AuditedHook};

/// A started order service: store open, broker connected, topology declared, listener bound.
pub struct App {
    config: Config,
    store: Store,
    producer: Producer,
    listener: TcpListener,
    grpc_addr: SocketAddr,
    tls: Option<ServerTls>,
    ops: OpsServer,
}

/// Opens the store, connects to RabbitMQ, declares the topology and binds the gRPC listener.
pub async fn build(config: Config) -> anyhow::Result<App> {
    config.expected_consumers().map_err(anyhow::Error::msg)?;
    let tls = config.tls.load().context("loading the gRPC server's TLS certificate")?;
    let store = Store::connect(&config.database_url).await.context("opening the order store")?;

    let publisher = config.broker.connect("upstream-demo").await.context("connecting to RabbitMQ")?;
    let topology = config.topology();
    let producer = Producer::try_new(publisher, topology, config.producer().map_err(anyhow::Error::msg)?)?;

    let listener =
        TcpListener::bind(config.grpc_addr).await.with_context(|| format!("binding {}", config.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    let ops = config.ops.bind().await.with_context(|| format!("binding {}", config.ops.ops_addr))?;
    Ok(App { config, store, producer, listener, grpc_addr, tls, ops })
}

impl App {
    /// The bound gRPC address (the real port when the configured one was 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound ops HTTP address (`/metrics`, `/healthz`, `/readyz`).
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops.local_addr()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves `Orders`, `ResendHook` and health until `shutdown` is cancelled; in-flight
    /// requests finish first, then the broker connection closes.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // gRPC health and /readyz answer from the same probes: broker connected, store answering.
        let (health_reporter, health) = tonic_health::server::health_reporter();
        let readiness = Readiness::new().broker(self.producer.publisher()).store(self.store.pool());
        let health_names = [
            recheck_proto::demo::v1::orders_server::SERVICE_NAME,
            recheck_proto::v1::resend_hook_server::SERVICE_NAME,
        ];
        // Recheck: the hook the callback service calls for unconfirmed messages.
        let hook = AuditedHook::new(
            ResendHookService::new(Arc::new(self.store.clone()), self.producer.clone(), self.config.grace),
            self.store.clone(),
        );
        let expect = self.config.expected_consumers().map_err(anyhow::Error::msg)?;
        let orders = OrdersService::new(self.store.clone(), self.producer.clone(), expect);
        let auth = self.config.hook_tokens.clone().unwrap_or_default();
        if !auth.enabled() {
            tracing::warn!("ResendHook accepts unauthenticated calls: set RECHECK_HOOK_TOKENS in production");
        }

        tracing::info!(
            grpc_addr = %self.grpc_addr,
            tls = ?self.tls,
            producer = %self.config.producer_name,
            expect = ?self.config.expect,
            "upstream demo started"
        );
        let grpc = recheck::tls::server(self.tls.as_ref())?
            .add_service(health)
            .add_service(hook.into_server(auth))
            .add_service(OrdersServer::new(orders.clone()))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.listener),
                shutdown.clone().cancelled_owned(),
            );
        let (served, ops, ()) = tokio::join!(
            grpc,
            self.ops.serve(readiness.clone(), shutdown.clone()),
            report_health(readiness, health_reporter, &health_names, shutdown.clone()),
        );
        orders.flush().await;
        // The unused reservations go back in one RELEASE: no hook call is made for them.
        self.producer.close().await;
        self.producer.publisher().close().await;
        served.context("serving gRPC")?;
        ops.context("serving the ops endpoints")
    }
}
