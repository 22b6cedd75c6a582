//! A consumer that stays subscribed: micro-batches of deliveries from one
//! queue, across lapin's auto-recover and, when that stalls, across a new
//! connection. Every loop that reads a queue (consumer step, callback service)
//! uses this one.
//!
//! Acks and nacks go through [`ack`] and [`nack`], bounded: lapin resolves one only once its
//! frame is handed to the connection, and a connection whose recovery stalled never takes it.
//! An unbounded ack there stopped confirm ingest for good after a broker restart (and the
//! service then ignored SIGTERM): the loop waited on it and never read again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    Channel, Consumer,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::{
    broker::publisher::Publisher,
    error::{Error, Result},
};

/// How deliveries are taken: the prefetch window and the batch shape.
#[derive(Debug, Clone)]
pub struct SubscriptionConfig {
    /// The queue to consume.
    pub queue: String,
    /// Consumer tag prefix, shown in the broker's consumer list.
    pub tag: String,
    /// Unacked deliveries the broker hands over at once (AMQP `basic.qos`).
    pub prefetch: u16,
    /// Most deliveries in one batch.
    pub batch_size: usize,
    /// How long to wait for more deliveries before returning a partial batch.
    pub batch_linger: Duration,
    /// Cleared while the subscription is not consuming; readiness shows it.
    pub consuming: Consuming,
    /// How long a lost subscription is tried again before [`Subscription::next_batch`] fails
    /// (and, through the service's loops, the process, for its supervisor to restart).
    pub give_up_after: Duration,
}

impl SubscriptionConfig {
    /// Defaults for `queue`: prefetch 256, batches of up to 128 gathered for 5 ms, given up
    /// after 5 minutes without consuming.
    pub fn new(queue: impl Into<String>, tag: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            tag: tag.into(),
            prefetch: 256,
            batch_size: 128,
            batch_linger: Duration::from_millis(5),
            consuming: Consuming::default(),
            give_up_after: Duration::from_secs(300),
        }
    }
}

/// Whether a subscription is consuming right now: set once it is subscribed, cleared while it
/// is lost or being replaced. A clone watches the same subscription (readiness reads it:
/// `ops::Readiness::consuming`, feature `service`).
#[derive(Debug, Clone, Default)]
pub struct Consuming(Arc<AtomicBool>);

impl Consuming {
    /// Whether the subscription is consuming now.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
    }
}

/// Longest an ack or a nack may take; past it the channel is taken as lost, and the broker
/// redelivers what it had not settled.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Acks `delivery` (and, with `multiple`, every earlier one of its channel), bounded by
/// [`SETTLE_TIMEOUT`]. An acker whose channel is gone is no error: its deliveries come back.
pub async fn ack(delivery: &Delivery, multiple: bool) -> Result<()> {
    let acking = delivery.acker.ack(BasicAckOptions { multiple });
    settled(timeout(SETTLE_TIMEOUT, acking).await)
}

/// Hands `delivery` back to the queue (nack with requeue), bounded like [`ack`].
pub async fn nack(delivery: &Delivery) -> Result<()> {
    let nacking = delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false });
    settled(timeout(SETTLE_TIMEOUT, nacking).await)
}

/// Hands `deliveries` back one by one, stopping at the first that fails: its channel is then
/// taken as lost, and the broker redelivers the rest when it closes. (Going on would cost a
/// [`SETTLE_TIMEOUT`] per delivery on a dead connection: minutes for one batch.)
pub async fn nack_all(deliveries: &[&Delivery]) {
    for d in deliveries {
        if let Err(e) = nack(d).await {
            tracing::warn!(error = %e, "handing deliveries back failed; the broker redelivers them");
            return;
        }
    }
}

fn settled(result: std::result::Result<lapin::Result<bool>, tokio::time::error::Elapsed>) -> Result<()> {
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Error::Timeout(SETTLE_TIMEOUT)),
    }
}

/// One queue, consumed across reconnects: [`Subscription::next_batch`] hands out batches of
/// deliveries, which the caller settles with [`ack`] and [`nack`].
pub struct Subscription {
    publisher: Publisher,
    config: SubscriptionConfig,
    channel: Channel,
    deliveries: Consumer,
}

impl Subscription {
    /// Subscribes on a new channel of `publisher`'s connection, with `config.prefetch`.
    pub async fn new(publisher: Publisher, config: SubscriptionConfig) -> Result<Self> {
        let (channel, deliveries) = subscribe(&publisher, &config).await?;
        config.consuming.set(true);
        Ok(Self { publisher, config, channel, deliveries })
    }

    /// The next batch (in delivery-tag order), or `None` once `shutdown` is
    /// cancelled. Deliveries of one batch all come from one channel, so the
    /// last one's `ack(multiple)` settles them all. `Err` when the subscription was lost and
    /// could not be made again within `give_up_after`.
    pub async fn next_batch(&mut self, shutdown: &CancellationToken) -> Result<Option<Vec<Delivery>>> {
        let recovery = self.publisher.config().recovery_timeout;
        // When the channel was first seen down with nothing on the stream to say so.
        let mut down_since: Option<Instant> = None;
        let first = loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                next = self.deliveries.next() => next,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    // lapin may never report a connection whose recovery stalled.
                    if self.channel.status().connected() {
                        down_since = None;
                        self.config.consuming.set(true);
                    } else {
                        self.config.consuming.set(false);
                        if down_since.get_or_insert_with(Instant::now).elapsed() > recovery {
                            if !self.resubscribe(shutdown).await? {
                                return Ok(None);
                            }
                            down_since = None;
                        }
                    }
                    continue;
                }
            };
            let resubscribed = match next {
                Some(Ok(d)) => break d,
                Some(Err(e)) => {
                    tracing::warn!(queue = %self.config.queue, error = %e, "consumer interrupted");
                    self.config.consuming.set(false);
                    if matches!(timeout(recovery, self.channel.wait_for_recovery(e)).await, Ok(Ok(()))) {
                        self.config.consuming.set(true);
                        continue;
                    }
                    self.resubscribe(shutdown).await?
                }
                // The broker cancelled the consumer (queue deleted, node down): start over.
                None => {
                    self.config.consuming.set(false);
                    self.resubscribe(shutdown).await?
                }
            };
            if !resubscribed {
                return Ok(None);
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
        Ok(Some(batch))
    }

    /// A new channel and consumer, on a new connection if the old one is gone; retries until it
    /// works (`true`), `shutdown` (`false`), or `give_up_after` (`Err` with the last error).
    async fn resubscribe(&mut self, shutdown: &CancellationToken) -> Result<bool> {
        self.config.consuming.set(false);
        let give_up = Instant::now() + self.config.give_up_after;
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
                _ = shutdown.cancelled() => return Ok(false),
                attempt = timeout(within, attempt) => attempt.unwrap_or(Err(Error::Timeout(within))),
            };
            match attempt {
                Ok((channel, deliveries)) => {
                    tracing::info!(queue = %self.config.queue, "consuming again");
                    let old = std::mem::replace(&mut self.channel, channel);
                    self.deliveries = deliveries;
                    self.config.consuming.set(true);
                    // If lapin brings the old channel back, its consumer would take a share of
                    // the queue (up to the prefetch) that nobody reads: close it whenever it is up.
                    let status = old.status().clone();
                    crate::broker::connection::retire_when_up(
                        move || status.connected(),
                        move || {
                            let old = old.clone();
                            async move {
                                let _ = old.close(200, "resubscribed".into()).await;
                            }
                        },
                    );
                    return Ok(true);
                }
                Err(e) if Instant::now() + backoff >= give_up => {
                    tracing::error!(queue = %self.config.queue, error = %e, "could not consume again; giving up");
                    return Err(e);
                }
                Err(e) => tracing::warn!(queue = %self.config.queue, error = %e, ?backoff, "resubscribing"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Stops consuming; unacked deliveries go back to the queue.
    pub async fn close(self) {
        self.config.consuming.set(false);
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
