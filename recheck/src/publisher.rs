//! Broker-confirmed publishing that survives connection loss.
//!
//! lapin's auto-recover reconnects and replays topology, but it does not
//! republish what was in flight: a publish whose confirm never came back is
//! republished here (at-least-once; consumers dedupe by message id). Many
//! publishes stay in flight at once — each caller awaits only its own confirm.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Duration;

use futures_util::future::try_join_all;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio::time::{Instant, sleep, timeout, timeout_at};

use crate::{Error, Result};

/// How a [`Publisher`] connects and how long it keeps trying.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub amqp_url: String,
    /// Shown in the broker's connection list.
    pub connection_name: String,
    /// Channels publishes are spread over (each with confirms on).
    pub channels: usize,
    /// Longest wait for one broker confirm before the message is republished.
    pub confirm_timeout: Duration,
    /// Longest a publish keeps retrying (through reconnects) before it fails.
    pub publish_timeout: Duration,
}

impl PublisherConfig {
    pub fn new(amqp_url: impl Into<String>, connection_name: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            connection_name: connection_name.into(),
            channels: 2,
            confirm_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(60),
        }
    }
}

/// One message to publish: always persistent and mandatory.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

/// A connection with a few confirm-mode channels. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    channels: Vec<Mutex<Channel>>,
    next: AtomicUsize,
    config: PublisherConfig,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("config", &self.inner.config).finish()
    }
}

/// Connects with lapin auto-recover on; every component uses this one way in.
pub async fn connect(amqp_url: &str, connection_name: &str) -> Result<Connection> {
    let props =
        ConnectionProperties::default().with_connection_name(connection_name.into()).enable_auto_recover();
    Ok(Connection::connect(amqp_url, props).await?)
}

impl Publisher {
    pub async fn connect(config: PublisherConfig) -> Result<Self> {
        let connection = connect(&config.amqp_url, &config.connection_name).await?;
        let mut channels = Vec::with_capacity(config.channels.max(1));
        for _ in 0..config.channels.max(1) {
            channels.push(Mutex::new(confirm_channel(&connection).await?));
        }
        Ok(Self { inner: Arc::new(Inner { connection, channels, next: AtomicUsize::new(0), config }) })
    }

    /// The underlying connection, for declaring topology or opening consumer channels.
    pub fn connection(&self) -> &Connection {
        &self.inner.connection
    }

    pub fn config(&self) -> &PublisherConfig {
        &self.inner.config
    }

    /// Publishes and waits for the broker's confirm, republishing across
    /// reconnects, nacks and confirm timeouts until `publish_timeout`.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<()> {
        let deadline = Instant::now() + self.inner.config.publish_timeout;
        let slot = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.channels.len();
        let mut backoff = Duration::from_millis(50);
        loop {
            let channel = self.channel(slot).await?;
            let error = match self.publish_once(&channel, &msg).await {
                Ok(()) => return Ok(()),
                Err(Error::Amqp(e)) => {
                    tracing::warn!(exchange = msg.exchange, error = %e, "publish interrupted; waiting for recovery");
                    match timeout_at(deadline, channel.wait_for_recovery(e)).await {
                        Ok(Ok(())) => continue,
                        // Not a recoverable error for lapin: the channel may be reopened below.
                        Ok(Err(e)) => Error::Amqp(e),
                        Err(_) => return Err(Error::ConfirmTimeout(self.inner.config.publish_timeout)),
                    }
                }
                Err(e @ Error::Unroutable { .. }) => return Err(e),
                Err(e) => e,
            };
            if Instant::now() + backoff >= deadline {
                return Err(error);
            }
            tracing::warn!(exchange = msg.exchange, error = %error, ?backoff, "republishing");
            sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Publishes all messages concurrently; fails if any one fails.
    pub async fn publish_all(&self, msgs: Vec<Outgoing<'_>>) -> Result<()> {
        try_join_all(msgs.into_iter().map(|m| self.publish(m))).await?;
        Ok(())
    }

    async fn publish_once(&self, channel: &Channel, msg: &Outgoing<'_>) -> Result<()> {
        let confirm = channel
            .basic_publish(
                msg.exchange.into(),
                msg.routing_key.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                msg.body,
                msg.properties.clone().with_delivery_mode(2),
            )
            .await?;
        let wait = self.inner.config.confirm_timeout;
        match timeout(wait, confirm).await {
            Err(_) => Err(Error::ConfirmTimeout(wait)),
            Ok(Err(e)) => Err(Error::Amqp(e)),
            Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(Error::Unroutable {
                exchange: msg.exchange.to_owned(),
                routing_key: msg.routing_key.to_owned(),
            }),
            Ok(Ok(Confirmation::Nack(_))) => Err(Error::Nacked { exchange: msg.exchange.to_owned() }),
        }
    }

    /// The slot's channel, reopened if the broker closed it (lapin only recovers
    /// channels as part of a connection recovery, not after a channel-level error).
    async fn channel(&self, slot: usize) -> Result<Channel> {
        let current = self.inner.channels[slot].lock().expect("channel slot poisoned").clone();
        let state = current.status();
        if state.connected() || state.reconnecting() || !self.inner.connection.status().connected() {
            return Ok(current);
        }
        tracing::info!(slot, "reopening a closed publisher channel");
        let fresh = confirm_channel(&self.inner.connection).await?;
        *self.inner.channels[slot].lock().expect("channel slot poisoned") = fresh.clone();
        Ok(fresh)
    }

    /// Closes the connection after in-flight publishes returned.
    pub async fn close(&self) {
        if let Err(e) = self.inner.connection.close(200, "bye".into()).await {
            tracing::debug!(error = %e, "closing publisher connection");
        }
    }
}

async fn confirm_channel(connection: &Connection) -> Result<Channel> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}
