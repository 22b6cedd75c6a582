//! Build, then run: [`build`] does everything that can fail at start (store and
//! migrations, broker and topology, producer registry, listener), so
//! [`App::run`] only works until it is told to stop.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use recheck::{
    Publisher, SubscriptionConfig,
    message::now_ms,
    ops::{OpsServer, Readiness, report_health},
    shutdown::Loops,
    telemetry,
    tls::ServerTls,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::{
    Config,
    admin::AdminService,
    backlog::Backlog,
    breaker::Breakers,
    dashboard::Dashboard,
    ingest::{ConfirmIngest, IngestCounters},
    parking::ParkingRecovery,
    reconcile::{Policy, Reconciler},
    registry::ProducerRegistry,
    store::Store,
    sweeper::Sweeper,
};

/// How often `recheck_messages{status}` is refreshed from the store.
pub const STATUS_GAUGE_INTERVAL: Duration = Duration::from_secs(5);
/// The status gauge counts at most once in this many times as long as a count takes.
const STATUS_GAUGE_SHARE: u32 = 20;

/// A started callback service: store migrated, topology declared, listener bound.
pub struct App {
    config: Config,
    store: Arc<Store>,
    publisher: Publisher,
    registry: Arc<ProducerRegistry>,
    listener: TcpListener,
    grpc_addr: SocketAddr,
    tls: Option<ServerTls>,
    ops: OpsServer,
}

pub async fn build(config: Config) -> anyhow::Result<App> {
    let registry = Arc::new(ProducerRegistry::from_config(&config).context("reading the producer registry")?);
    let tls = config.tls.load().context("loading the gRPC server's TLS certificate")?;
    let store = Arc::new(Store::connect(&config.database_url).await.context("opening the store")?);
    let publisher = config.broker.connect("callback-service").await.context("connecting to RabbitMQ")?;

    let listener =
        TcpListener::bind(config.grpc_addr).await.with_context(|| format!("binding {}", config.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    let ops = config.ops.bind().await.with_context(|| format!("binding {}", config.ops.ops_addr))?;
    Ok(App { config, store, publisher, registry, listener, grpc_addr, tls, ops })
}

impl App {
    /// The bound gRPC address (the real port when the configured one was 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound ops HTTP address (`/metrics`, `/healthz`, `/readyz`, the dashboard).
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops.local_addr()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Consumes confirms and checks, serves `Admin` and health, purges old rows,
    /// until `shutdown`; then finishes in-flight batches and RPCs and closes.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let c = &self.config;
        let topology = c.topology();
        let mut reconciler = Reconciler::new(
            self.store.clone(),
            self.publisher.clone(),
            topology.clone(),
            self.registry.clone(),
            Policy {
                max_resends: c.max_resends,
                unreachable_deadline: c.unreachable_deadline,
                rpc_timeout: c.rpc_timeout,
                max_rpcs_per_producer: c.max_rpcs_per_producer,
                max_deferral: c.max_deferral,
                max_checks_in_flight: c.max_checks_in_flight,
                resend_batch: c.resend_batch,
            },
            c.limits(),
            Breakers::new(c.breaker()),
        );
        if !c.consumer_queues.is_empty() {
            let queues = c.consumer_queues.iter().cloned().collect();
            reconciler.backlog = Some(Backlog::new(self.publisher.clone(), queues, c.backlog_threshold));
        }
        let reconciler = Arc::new(reconciler);
        let ingest = ConfirmIngest {
            store: self.store.clone(),
            publisher: self.publisher.clone(),
            topology: topology.clone(),
            limits: c.limits(),
            counters: Arc::new(IngestCounters::default()),
            keys: c.confirm_keys.clone().unwrap_or_default(),
        };
        let checks = SubscriptionConfig {
            prefetch: c.check_prefetch,
            batch_size: usize::from(c.check_prefetch),
            batch_linger: Duration::ZERO,
            ..SubscriptionConfig::new(topology.checks_queue(), "callback-checks")
        };
        // A CONFIRM carries many ids: the batch is bounded by messages here and
        // by `confirm_batch` ids through the prefetch window.
        let confirms = SubscriptionConfig {
            prefetch: c.confirm_prefetch,
            batch_size: c.confirm_batch,
            batch_linger: c.confirm_linger,
            ..SubscriptionConfig::new(topology.confirms_queue(), "callback-confirms")
        };
        let sweeper = Sweeper {
            store: self.store.clone(),
            publisher: self.publisher.clone(),
            topology: topology.clone(),
            after: c.sweep_after,
            interval: c.sweep_interval,
            max_backlog: u32::from(c.check_prefetch),
            backlog: Backlog::new(self.publisher.clone(), Default::default(), 0),
            parking: ParkingRecovery::new(
                self.publisher.clone(),
                topology.clone(),
                c.limits(),
                c.sweep_after,
            ),
        };
        let admin = AdminService {
            store: self.store.clone(),
            publisher: self.publisher.clone(),
            topology: topology.clone(),
            checks: reconciler.counters.clone(),
        };
        let dashboard = Dashboard::new(
            self.store.clone(),
            self.publisher.clone(),
            topology.clone(),
            c.admin_tokens.clone().unwrap_or_default(),
        );
        let (health_reporter, health) = tonic_health::server::health_reporter();
        // A loop that dies fails readiness at once, then stops the others: the process exits
        // with the reason instead of serving gRPC and `/readyz` while no check is processed.
        let loops = Loops::default();
        let stop = shutdown.child_token();
        let readiness = Readiness::new()
            .broker(&self.publisher)
            .store(self.store.pool())
            .loops(&loops)
            .consuming("checks queue", &checks.consuming)
            .consuming("confirms queue", &confirms.consuming);
        let health_names = [recheck_proto::v1::admin_server::SERVICE_NAME];
        tracing::info!(grpc_addr = %self.grpc_addr, tls = ?self.tls, producers = self.registry.len(), "callback service started");

        let grpc = recheck::tls::server(self.tls.as_ref())?
            .add_service(health)
            .add_service(admin.into_server(c.admin_tokens.clone().unwrap_or_default()))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.listener),
                stop.clone().cancelled_owned(),
            );
        tokio::join!(
            loops.watch("gRPC", &stop, grpc),
            loops.watch("check processing", &stop, reconciler.run(checks, stop.clone())),
            loops.watch("confirm ingest", &stop, ingest.run(confirms, stop.clone())),
            loops.watch("sweeper", &stop, infallible(sweeper.run(&stop))),
            loops.watch(
                "retention",
                &stop,
                infallible(purge(&self.store, [c.retention, c.unused_retention], c.purge_interval, &stop))
            ),
            loops.watch(
                "ops endpoints",
                &stop,
                self.ops.routes(dashboard.router()).serve(readiness.clone(), stop.clone())
            ),
            loops.watch(
                "health",
                &stop,
                infallible(report_health(readiness, health_reporter, &health_names, stop.clone()))
            ),
            loops.watch("status gauge", &stop, infallible(status_gauge(&self.store, &stop))),
        );
        self.publisher.close().await;
        loops.result().map_err(anyhow::Error::msg)
    }
}

/// A loop without an error of its own: its ending early is the failure [`Loops`] watches for.
async fn infallible(run: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    run.await;
    Ok(())
}

/// `recheck_messages{status}`: the store's counts per status, and
/// `recheck_oldest_pending_age_seconds{producer}`, every [`STATUS_GAUGE_INTERVAL`], or every
/// [`STATUS_GAUGE_SHARE`] times as long as the last count took if that is longer: counting
/// 10 M stored rows takes about a second, which every 5 s would cost ingest half its rate.
async fn status_gauge(store: &Store, shutdown: &CancellationToken) {
    let mut producers = std::collections::HashSet::new();
    let mut wait = Duration::ZERO;
    while shutdown.run_until_cancelled(tokio::time::sleep(wait)).await.is_some() {
        let started = tokio::time::Instant::now();
        let counted = store.counts().await;
        wait = STATUS_GAUGE_INTERVAL.max(started.elapsed() * STATUS_GAUGE_SHARE);
        match counted {
            Ok(counts) => {
                for (status, n) in counts.by_status {
                    metrics::gauge!(telemetry::MESSAGES, "status" => status.as_str()).set(n as f64);
                }
                metrics::gauge!(telemetry::MESSAGES_AWAITING_CHECK).set(counts.awaiting_check as f64);
            }
            Err(e) => tracing::warn!(error = %e, "counting messages per status failed"),
        }
        match store.oldest_open().await {
            Ok(oldest) => {
                let now = now_ms();
                let mut seen = std::collections::HashSet::new();
                for (producer, published_at) in oldest {
                    let age = (now - published_at).max(0) as f64 / 1000.0;
                    metrics::gauge!(telemetry::OLDEST_PENDING_AGE_SECONDS, "producer" => producer.clone())
                        .set(age);
                    seen.insert(producer);
                }
                // A producer with nothing open any more reads 0, not its last age.
                for gone in producers.difference(&seen) {
                    metrics::gauge!(telemetry::OLDEST_PENDING_AGE_SECONDS, "producer" => gone.clone())
                        .set(0.0);
                }
                producers = seen;
            }
            Err(e) => tracing::warn!(error = %e, "reading the oldest open messages failed"),
        }
    }
}

/// Retention: deletes terminal rows older than `retention`, and `unused` rows older than
/// `unused_retention`, every `interval`. A purge of many rows takes minutes in paced batches
/// (`store/purge.rs`), so shutdown does not wait for it: the batch under way rolls back, the
/// ones before it stay committed.
async fn purge(
    store: &Store,
    [retention, unused_retention]: [Duration; 2],
    interval: Duration,
    shutdown: &CancellationToken,
) {
    let before = |d: Duration| now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let purged = tokio::select! {
            _ = shutdown.cancelled() => return,
            purged = store.purge(before(retention)) => purged,
        };
        match purged {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "retention purge"),
            Err(e) => tracing::warn!(error = %e, "retention purge failed"),
        }
        let purged = tokio::select! {
            _ = shutdown.cancelled() => return,
            purged = store.purge_unused(before(unused_retention)) => purged,
        };
        match purged {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "unused reservations purged"),
            Err(e) => tracing::warn!(error = %e, "purge of unused reservations failed"),
        }
    }
}
