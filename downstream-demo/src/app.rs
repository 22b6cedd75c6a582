//! Build, then run: [`build`] does everything that can fail at start (broker,
//! topology, the consumer's queue), so [`App::run`] only works until told to stop.

use anyhow::Context;
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::Config;

/// The event type (routing key) this consumer handles.
pub const EVENT: &str = "order.created";

/// A started downstream demo: connected, topology and consumer queue declared.
pub struct App {
    config: Config,
    connection: Connection,
}

/// Connects to RabbitMQ and declares the topology and the consumer's queue.
pub async fn build(config: Config) -> anyhow::Result<App> {
    // lapin retries an unreachable broker with backoff (minutes) before it fails.
    tracing::info!("connecting to RabbitMQ");
    let connection = recheck::publisher::connect(&config.amqp_url, "downstream-demo")
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    let topology = config.topology();
    topology.declare(&channel).await.context("declaring the topology")?;
    topology
        .declare_consumer_queue(&channel, &config.queue, &[EVENT])
        .await
        .with_context(|| format!("declaring the consumer queue {}", config.queue))?;
    channel.close(200, "topology declared".into()).await?;
    Ok(App { config, connection })
}

impl App {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs until `shutdown` is cancelled, then closes the broker connection.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(consumer = %self.config.consumer, queue = %self.config.queue, "downstream demo started");
        shutdown.cancelled().await;
        if let Err(e) = self.connection.close(200, "shutting down".into()).await {
            tracing::debug!(error = %e, "closing the broker connection");
        }
        Ok(())
    }
}
