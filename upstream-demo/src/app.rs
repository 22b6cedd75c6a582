//! Build, then run: [`build`] does everything that can fail at start (broker,
//! topology, listener), so [`App::run`] only serves until it is told to stop.

use std::net::SocketAddr;

use anyhow::Context;
use lapin::Connection;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::Config;

/// A started upstream demo: connected, topology declared, listener bound.
pub struct App {
    config: Config,
    connection: Connection,
    listener: TcpListener,
    grpc_addr: SocketAddr,
}

/// Connects to RabbitMQ, declares the topology and binds the gRPC listener.
pub async fn build(config: Config) -> anyhow::Result<App> {
    // lapin retries an unreachable broker with backoff (minutes) before it fails.
    tracing::info!("connecting to RabbitMQ");
    let connection = recheck::publisher::connect(&config.amqp_url, "upstream-demo")
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    config.topology().declare(&channel).await.context("declaring the topology")?;
    channel.close(200, "topology declared".into()).await?;

    let listener =
        TcpListener::bind(config.grpc_addr).await.with_context(|| format!("binding {}", config.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    Ok(App { config, connection, listener, grpc_addr })
}

impl App {
    /// The bound gRPC address (the real port when the configured one was 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves gRPC until `shutdown` is cancelled, then closes the broker connection.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (_health_reporter, health) = tonic_health::server::health_reporter();
        tracing::info!(grpc_addr = %self.grpc_addr, "upstream demo started");
        let served = Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), shutdown.cancelled_owned())
            .await;
        if let Err(e) = self.connection.close(200, "shutting down".into()).await {
            tracing::debug!(error = %e, "closing the broker connection");
        }
        served.context("serving gRPC")
    }
}
