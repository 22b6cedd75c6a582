//! Build, then run: [`build`] does everything that can fail at start (store,
//! broker, topology, the consumer's queue), so [`App::run`] only consumes
//! until told to stop.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use recheck::{
    Confirmer, ConsumerConfig, ConsumerLoop, GroupCommitConfig, Publisher, Topology,
    ops::{OpsServer, Readiness},
    shutdown::Loops,
};
use sqlx::AnyPool;
use tokio_util::sync::CancellationToken;

use crate::{Config, effect::AwardPoints, faults::Faults, store};

/// The event type (routing key) this consumer handles.
pub const EVENT: &str = "order.created";

/// A started downstream demo: store open, broker connected, queues declared.
pub struct App {
    config: Config,
    pool: AnyPool,
    publisher: Publisher,
    topology: Topology,
    ops: OpsServer,
}

/// Opens the store, connects to RabbitMQ, declares the topology and the consumer's queue.
pub async fn build(config: Config) -> anyhow::Result<App> {
    let pool = store::connect(&config.store.database_url).await?;
    let publisher = config.broker.connect("downstream-demo").await.context("connecting to RabbitMQ")?;
    let channel = publisher.create_channel().await?;
    let topology = config.topology();
    topology
        .declare_consumer_queue(&channel, &config.queue, &[crate::EVENT])
        .await
        .with_context(|| format!("declaring the consumer queue {}", config.queue))?;
    channel.close(200, "topology declared".into()).await?;
    let ops = config.ops.bind().await.with_context(|| format!("binding {}", config.ops.ops_addr))?;
    Ok(App { config, pool, publisher, topology, ops })
}

impl App {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The bound ops HTTP address (`/metrics`, `/healthz`, `/readyz`).
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops.local_addr()
    }

    /// The points store (tests and `stats` read it).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Consumes until `shutdown` is cancelled; the batch in hand is finished
    /// (committed, confirmed, acked) first, the rest is left to redelivery.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let c = &self.config;
        let faults = Arc::new(Faults::new(&c.faults));
        if faults.any() {
            tracing::warn!(faults = ?c.faults, seed = faults.seed(), "fault injection on");
        }
        let mut consumer = ConsumerConfig::new(&c.store.consumer, &c.queue);
        consumer.prefetch = c.prefetch;
        consumer.batch_size = usize::from(c.batch_size);
        consumer.max_body_bytes = Some(c.max_body_bytes);
        let confirmer = Confirmer::signed(
            self.publisher.clone(),
            self.topology.clone(),
            &c.store.consumer,
            GroupCommitConfig::default(),
            c.confirm_key.clone(),
        );
        let subscription = consumer.subscription();
        let mut consumer = ConsumerLoop::new(
            self.pool.clone(),
            self.publisher.clone(),
            self.topology.clone(),
            confirmer,
            AwardPoints::new(faults.clone()),
            consumer,
        );
        if faults.drops_confirms() {
            let faults = faults.clone();
            consumer = consumer.dropping_confirms(move |_| faults.drop_confirm_now());
        }
        if faults.drops_messages() {
            let faults = faults.clone();
            consumer = consumer.dropping_messages(move |h| faults.drop_message(h.message_id, h.attempt));
        }

        tracing::info!(consumer = %c.store.consumer, queue = %c.queue, "downstream demo started");
        // A consumer loop that dies fails readiness and stops the service with the reason,
        // instead of leaving `/readyz` green over a queue nobody reads.
        let loops = Loops::default();
        let stop = shutdown.child_token();
        let readiness = Readiness::new()
            .broker(&self.publisher)
            .store(&self.pool)
            .loops(&loops)
            .consuming("consuming", &subscription.consuming);
        let consuming = async {
            let report = consumer.run(stop.clone()).await?;
            tracing::info!(?report, "consumer stopped");
            Ok::<(), recheck::Error>(())
        };
        tokio::join!(
            loops.watch("consuming", &stop, consuming),
            loops.watch("ops endpoints", &stop, self.ops.serve(readiness, stop.clone())),
        );
        self.publisher.close().await;
        self.pool.close().await;
        loops.result().map_err(anyhow::Error::msg)
    }
}
