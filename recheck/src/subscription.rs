//! A consumer that stays subscribed: micro-batches of deliveries from one
//! queue, across lapin's auto-recover and, when that stalls, across a new
//! connection. Every loop that reads a queue (consumer step, callback service)
//! uses this one.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    Channel, Consumer,
    message::Delivery,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::{Error, Publisher, Result};

/// How deliveries are taken: the prefetch window and the batch shape.
#[derive(Debug, Clone)]
pub struct SubscriptionConfig {
    pub queue: String,
    /// Consumer tag prefix, shown in the broker's consumer list.
    pub tag: String,
    pub prefetch: u16,
    /// Most deliveries in one batch.
    pub batch_size: usize,
    /// How long to wait for more deliveries before returning a partial batch.
    pub batch_linger: Duration,
}

pub struct Subscription {
    publisher: Publisher,
    config: SubscriptionConfig,
    channel: Channel,
    deliveries: Consumer,
}

impl Subscription {
    pub async fn new(publisher: Publisher, config: SubscriptionConfig) -> Result<Self> {
        let (channel, deliveries) = subscribe(&publisher, &config).await?;
        Ok(Self { publisher, config, channel, deliveries })
    }

    /// The next batch (in delivery-tag order), or `None` once `shutdown` is
    /// cancelled. Deliveries of one batch all come from one channel, so the
    /// last one's `ack(multiple)` settles them all.
    pub async fn next_batch(&mut self, shutdown: &CancellationToken) -> Option<Vec<Delivery>> {
        let recovery = self.publisher.config().recovery_timeout;
        // When the channel was first seen down with nothing on the stream to say so.
        let mut down_since: Option<Instant> = None;
        let first = loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return None,
                next = self.deliveries.next() => next,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    // lapin may never report a connection whose recovery stalled.
                    if self.channel.status().connected() {
                        down_since = None;
                    } else if down_since.get_or_insert_with(Instant::now).elapsed() > recovery {
                        self.resubscribe(shutdown).await.ok()?;
                        down_since = None;
                    }
                    continue;
                }
            };
            match next {
                Some(Ok(d)) => break d,
                Some(Err(e)) => {
                    tracing::warn!(queue = %self.config.queue, error = %e, "consumer interrupted");
                    if !matches!(timeout(recovery, self.channel.wait_for_recovery(e)).await, Ok(Ok(()))) {
                        self.resubscribe(shutdown).await.ok()?;
                    }
                }
                // The broker cancelled the consumer (queue deleted, node down): start over.
                None => self.resubscribe(shutdown).await.ok()?,
            }
        };
        let mut batch = vec![first];
        let deadline = Instant::now() + self.config.batch_linger;
        while batch.len() < self.config.batch_size {
            match timeout_at(deadline, self.deliveries.next()).await {
                Ok(Some(Ok(d))) => batch.push(d),
                // An error here is seen again by the next call.
                _ => break,
            }
        }
        Some(batch)
    }

    /// A new channel and consumer, on a new connection if the old one is gone;
    /// retries until it works or `shutdown`.
    async fn resubscribe(&mut self, shutdown: &CancellationToken) -> Result<()> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let within = self.publisher.config().publish_timeout;
            let attempt = async {
                self.publisher.ensure_connected(Instant::now() + within).await?;
                subscribe(&self.publisher, &self.config).await
            };
            // Bounded, and given up at shutdown: lapin can leave a channel or consume request on
            // a half-recovered connection unanswered for good (a service then hung on SIGTERM).
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return Err(Error::Closed),
                attempt = timeout(within, attempt) => attempt.unwrap_or(Err(Error::Timeout(within))),
            };
            match attempt {
                Ok((channel, deliveries)) => {
                    tracing::info!(queue = %self.config.queue, "consuming again");
                    let old = std::mem::replace(&mut self.channel, channel);
                    self.deliveries = deliveries;
                    // If lapin brings the old channel back, its consumer would take a share of
                    // the queue (up to the prefetch) that nobody reads: close it whenever it is up.
                    let status = old.status().clone();
                    crate::publisher::retire_when_up(
                        move || status.connected(),
                        move || {
                            let old = old.clone();
                            async move {
                                let _ = old.close(200, "resubscribed".into()).await;
                            }
                        },
                    );
                    return Ok(());
                }
                Err(e) => tracing::warn!(queue = %self.config.queue, error = %e, ?backoff, "resubscribing"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(Error::Closed),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Stops consuming; unacked deliveries go back to the queue.
    pub async fn close(self) {
        // Bounded, like `Publisher::close`: a channel on a stuck connection may never answer.
        let closing = self.channel.close(200, "shutdown".into());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), closing).await;
    }
}

async fn subscribe(publisher: &Publisher, config: &SubscriptionConfig) -> Result<(Channel, Consumer)> {
    let channel = publisher.create_channel().await?;
    channel.basic_qos(config.prefetch, BasicQosOptions::default()).await?;
    let deliveries = channel
        .basic_consume(
            config.queue.as_str().into(),
            format!("{}-{}", config.tag, uuid::Uuid::now_v7()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, deliveries))
}
