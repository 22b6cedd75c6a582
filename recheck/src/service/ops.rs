//! The ops HTTP server every Recheck service runs beside its work (feature `service`):
//!
//! - `GET /metrics` — every metric of [`crate::telemetry`], Prometheus text format;
//! - `GET /healthz` — 200 while the process serves;
//! - `GET /readyz` — 200 when every [`Readiness`] probe passes (broker connected, store
//!   answering), else 503 with one `name: why` line per failing probe.
//!
//! The same probes drive the gRPC health service of a service that has one ([`report_health`]),
//! so HTTP and gRPC never disagree. Build, then run: [`OpsArgs::bind`] binds (port 0 picks a free
//! port), [`OpsServer::serve`] serves until the shutdown token is cancelled. A service adds routes
//! of its own with [`OpsServer::routes`] (the callback service's dashboard).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::AnyPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{broker::publisher::Publisher, telemetry};

/// Longest a readiness probe may take before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the gRPC health status is re-evaluated from the probes.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How often the metrics recorder drops idle state.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The ops listener of a service; `#[command(flatten)]` it into the service's config. Each
/// service gives it its own default port, so that they can share a host:
/// `#[command(mut_arg("ops_addr", |a| a.default_value("127.0.0.1:9051")))]`.
#[derive(Debug, Clone, clap::Args)]
pub struct OpsArgs {
    /// Address of the ops HTTP listener (`/metrics`, `/healthz`, `/readyz`); port 0 picks a free port.
    #[arg(long, env = "RECHECK_OPS_ADDR", default_value = "127.0.0.1:9464")]
    pub ops_addr: SocketAddr,
}

impl OpsArgs {
    /// Installs the metrics recorder (once per process) and binds the listener.
    pub async fn bind(&self) -> std::io::Result<OpsServer> {
        let metrics = metrics_handle();
        let listener = TcpListener::bind(self.ops_addr).await?;
        let addr = listener.local_addr()?;
        Ok(OpsServer { listener, addr, metrics, routes: Router::new() })
    }
}

/// A bound ops listener.
pub struct OpsServer {
    listener: TcpListener,
    addr: SocketAddr,
    metrics: PrometheusHandle,
    /// A service's own routes beside the ops endpoints ([`OpsServer::routes`]).
    routes: Router,
}

impl OpsServer {
    /// The bound address (the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds a service's own routes (e.g. the callback service's dashboard), served beside the ops
    /// endpoints with whatever authentication they bring; the ops endpoints themselves stay open.
    pub fn routes(mut self, routes: Router) -> Self {
        self.routes = self.routes.merge(routes);
        self
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` (from `readiness`) until `shutdown`.
    pub async fn serve(self, readiness: Readiness, shutdown: CancellationToken) -> std::io::Result<()> {
        tracing::info!(ops_addr = %self.addr, "ops endpoints: /metrics /healthz /readyz");
        let upkeep = {
            let (metrics, shutdown) = (self.metrics.clone(), shutdown.clone());
            async move {
                let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
                while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
                    metrics.run_upkeep();
                }
            }
        };
        let router = Router::new()
            .route("/metrics", get(render_metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .with_state(Ops { metrics: self.metrics, readiness })
            .merge(self.routes);
        let served = axum::serve(self.listener, router).with_graceful_shutdown(shutdown.cancelled_owned());
        let (served, ()) = tokio::join!(served.into_future(), upkeep);
        served
    }
}

#[derive(Clone)]
struct Ops {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

async fn render_metrics(State(ops): State<Ops>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], ops.metrics.render())
}

async fn ready(State(ops): State<Ops>) -> (StatusCode, String) {
    let failures = ops.readiness.failures().await;
    if failures.is_empty() {
        return (StatusCode::OK, "ready\n".into());
    }
    let body: String = failures.iter().map(|(name, why)| format!("{name}: {why}\n")).collect();
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

/// The process's metrics recorder: installed globally on first use, with Prometheus histogram
/// buckets for every histogram of the catalog. A process that already has another recorder gets
/// a handle that renders nothing (and a warning).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in telemetry::HISTOGRAMS {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
                    .expect("the catalog's buckets are not empty");
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => telemetry::describe(),
                Err(_) => tracing::warn!("another metrics recorder is installed; /metrics stays empty"),
            }
            handle
        })
        .clone()
}

type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Probe = Arc<dyn Fn() -> ProbeFuture + Send + Sync>;

/// Named probes that must all pass for the service to be ready. Cheap to clone.
#[derive(Clone, Default)]
pub struct Readiness {
    probes: Vec<(&'static str, Probe)>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.probes.iter().map(|(name, _)| name)).finish()
    }
}

impl Readiness {
    /// No probes (ready) until some are added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a probe: `Ok(())` = ready, `Err(why)` = not ready. Bounded by [`PROBE_TIMEOUT`].
    pub fn probe<F, Fut>(mut self, name: &'static str, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.probes.push((name, Arc::new(move || Box::pin(probe()))));
        self
    }

    /// `broker`: the publisher's connection is open.
    pub fn broker(self, publisher: &Publisher) -> Self {
        let publisher = publisher.clone();
        self.probe("broker", move || {
            let connected = publisher.is_connected();
            async move { if connected { Ok(()) } else { Err("not connected".into()) } }
        })
    }

    /// `loops`: fails once one of the service's loops ended unasked ([`crate::service::shutdown::Loops`]).
    pub fn loops(self, loops: &crate::service::shutdown::Loops) -> Self {
        let loops = loops.clone();
        self.probe("loops", move || {
            let failed = loops.result();
            async move { failed }
        })
    }

    /// `name`: the queue reader is consuming (subscribed on a live channel). A reader that lost
    /// its channel fails readiness until it consumes again; one that cannot, within its
    /// `give_up_after`, ends its loop and so the process ([`crate::broker::subscription::Subscription::next_batch`]).
    pub fn consuming(self, name: &'static str, consuming: &crate::broker::subscription::Consuming) -> Self {
        let consuming = consuming.clone();
        self.probe(name, move || {
            let up = consuming.get();
            async move { if up { Ok(()) } else { Err("not consuming".into()) } }
        })
    }

    /// `store`: the database answers `SELECT 1`.
    pub fn store(self, pool: &AnyPool) -> Self {
        let pool = pool.clone();
        self.probe("store", move || {
            let pool = pool.clone();
            async move { sqlx::query("SELECT 1").execute(&pool).await.map(drop).map_err(|e| e.to_string()) }
        })
    }

    /// The failing probes with their reasons, all probed at once; empty = ready.
    pub async fn failures(&self) -> Vec<(&'static str, String)> {
        let probes = self.probes.iter().map(|(name, probe)| async move {
            match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
                Ok(Ok(())) => None,
                Ok(Err(why)) => Some((*name, why)),
                Err(_) => Some((*name, format!("no answer within {PROBE_TIMEOUT:?}"))),
            }
        });
        futures_util::future::join_all(probes).await.into_iter().flatten().collect()
    }
}

/// Keeps a gRPC health service in step with `readiness`: the server (`""`) and each of `services`
/// are SERVING while every probe passes, NOT_SERVING otherwise and once `shutdown` is cancelled.
pub async fn report_health(
    readiness: Readiness,
    reporter: HealthReporter,
    services: &[&str],
    shutdown: CancellationToken,
) {
    let set = |status: ServingStatus| {
        let reporter = &reporter;
        async move {
            for name in std::iter::once("").chain(services.iter().copied()) {
                reporter.set_service_status(name, status).await;
            }
        }
    };
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    let mut last = None;
    while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
        let failures = readiness.failures().await;
        let status = if failures.is_empty() { ServingStatus::Serving } else { ServingStatus::NotServing };
        if last != Some(status) {
            if !failures.is_empty() {
                tracing::warn!(?failures, "not ready");
            }
            set(status).await;
            last = Some(status);
        }
    }
    set(ServingStatus::NotServing).await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// `GET path` over HTTP/1.0: (status, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness_until_shutdown() {
        let args = OpsArgs { ops_addr: "127.0.0.1:0".parse().unwrap() };
        let server = args.bind().await.unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probe = up.clone();
        let readiness = Readiness::new()
            .probe("always", || async { Ok(()) })
            .probe("broker", move || {
                let up = probe.load(std::sync::atomic::Ordering::SeqCst);
                async move { if up { Ok(()) } else { Err("not connected".into()) } }
            })
            .probe("slow", || async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(())
            });
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(server.serve(readiness, shutdown.clone()));

        metrics::counter!(telemetry::PARKED, "queue" => "q", "reason" => "invalid_json").increment(2);
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains(r#"recheck_parked_total{queue="q",reason="invalid_json"} 2"#), "{body}");
        assert!(body.contains("# HELP recheck_parked_total"), "{body}");

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await, (503, "broker: not connected\n".into()));
        up.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
        assert_eq!(get(addr, "/nothing").await.0, 404);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), served).await.unwrap().unwrap().unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still listening after shutdown");
    }

    #[tokio::test]
    async fn a_probe_that_hangs_fails_after_the_timeout() {
        let readiness = Readiness::new().probe("store", std::future::pending);
        let started = tokio::time::Instant::now();
        let failures = readiness.failures().await;
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, "store");
        assert!(started.elapsed() < PROBE_TIMEOUT + Duration::from_secs(1));
    }
}
