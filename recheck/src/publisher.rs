//! Broker-confirmed publishing that survives connection loss.
//!
//! lapin's auto-recover reconnects and replays topology, but it does not
//! republish what was in flight: a publish whose confirm never came back is
//! republished here (at-least-once; consumers dedupe by message id). Many
//! publishes stay in flight at once — each caller awaits only its own confirm.

use std::sync::{
    Arc, Mutex, RwLock,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Duration;

use futures_util::future::try_join_all;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio::time::{Instant, sleep, timeout};

use crate::{Error, Result, telemetry};

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
    /// Longest wait for lapin's auto-recover before the connection is replaced.
    pub recovery_timeout: Duration,
}

impl PublisherConfig {
    pub fn new(amqp_url: impl Into<String>, connection_name: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            connection_name: connection_name.into(),
            channels: 2,
            confirm_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(60),
            recovery_timeout: Duration::from_secs(15),
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
    config: PublisherConfig,
    link: RwLock<Arc<Link>>,
    /// One reconnect at a time; the others wait and use its result.
    reconnecting: tokio::sync::Mutex<()>,
    next: AtomicUsize,
}

/// One broker connection and its channels. Replaced whole when lapin's own
/// recovery does not finish in time (seen with lapin 4.12: a connection reset
/// racing the broker's CONNECTION_FORCED close can leave recovery waiting forever).
struct Link {
    generation: u64,
    connection: Connection,
    channels: Vec<Mutex<Channel>>,
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
        let link = Link::open(&config, 0).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                link: RwLock::new(Arc::new(link)),
                reconnecting: tokio::sync::Mutex::new(()),
                next: AtomicUsize::new(0),
            }),
        })
    }

    pub fn config(&self) -> &PublisherConfig {
        &self.inner.config
    }

    /// A new channel on the current connection, for declaring topology or consuming.
    pub async fn create_channel(&self) -> Result<Channel> {
        Ok(self.link().connection.create_channel().await?)
    }

    /// Which connection is current; changes when the publisher reconnected.
    pub fn generation(&self) -> u64 {
        self.link().generation
    }

    /// Publishes and waits for the broker's confirm, republishing across
    /// reconnects, nacks and confirm timeouts until `publish_timeout`.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<()> {
        let deadline = Instant::now() + self.inner.config.publish_timeout;
        let slot = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let mut backoff = Duration::from_millis(50);
        loop {
            let link = self.link();
            let channel = link.channel(slot).await?;
            let error = match self.publish_once(&channel, &msg).await {
                Ok(()) => return Ok(()),
                Err(e @ Error::Unroutable { .. }) => return Err(e),
                Err(e) => e,
            };
            if Instant::now() + backoff >= deadline {
                return Err(error);
            }
            tracing::warn!(exchange = msg.exchange, error = %error, "publish failed; republishing");
            match error {
                Error::Amqp(e) => {
                    if !self.recovered(&channel, e).await {
                        self.reconnect(link.generation, deadline).await?;
                    }
                }
                _ if !self.wait_connected(&link).await => self.reconnect(link.generation, deadline).await?,
                _ => {
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Publishes all messages concurrently; fails if any one fails.
    pub async fn publish_all(&self, msgs: Vec<Outgoing<'_>>) -> Result<()> {
        try_join_all(msgs.into_iter().map(|m| self.publish(m))).await?;
        Ok(())
    }

    /// One attempt, bounded by `confirm_timeout` as a whole: with a stalled
    /// connection even handing the frame to lapin may never finish.
    async fn publish_once(&self, channel: &Channel, msg: &Outgoing<'_>) -> Result<()> {
        let wait = self.inner.config.confirm_timeout;
        let attempt = async {
            let confirm = channel
                .basic_publish(
                    msg.exchange.into(),
                    msg.routing_key.into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    msg.body,
                    msg.properties.clone().with_delivery_mode(2),
                )
                .await?;
            confirm.await
        };
        match timeout(wait, attempt).await {
            Err(_) => Err(Error::ConfirmTimeout(wait)),
            Ok(Err(e)) => Err(Error::Amqp(e)),
            Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(Error::Unroutable {
                exchange: msg.exchange.to_owned(),
                routing_key: msg.routing_key.to_owned(),
    /// Index in `config().amqp_urls` of the broker the current connection went to.
    pub fn address(&self) -> usize {
        self.link().address
    }

            }),
            Ok(Ok(Confirmation::Nack(_))) => Err(Error::Nacked { exchange: msg.exchange.to_owned() }),
        }
        let (started, exchange) = (Instant::now(), msg.exchange.to_owned());
        let result = self.publish_until_confirmed(msg).await;
        let outcome = if result.is_ok() { "confirmed" } else { "failed" };
        if result.is_ok() {
            metrics::histogram!(telemetry::PUBLISH_SECONDS, "exchange" => exchange.clone())
                .record(started.elapsed().as_secs_f64());
        }
        metrics::counter!(telemetry::PUBLISHES, "exchange" => exchange, "outcome" => outcome).increment(1);
        result
    }

    async fn publish_until_confirmed(&self, msg: Outgoing<'_>) -> Result<()> {
    }

    /// Waits (bounded) for lapin's auto-recover; `false` if it did not happen.
    async fn recovered(&self, channel: &Channel, e: lapin::Error) -> bool {
        let wait = self.inner.config.recovery_timeout;
        matches!(timeout(wait, channel.wait_for_recovery(e)).await, Ok(Ok(())))
    }

    /// Waits (bounded) until the link's connection is up again.
    async fn wait_connected(&self, link: &Link) -> bool {
        let until = Instant::now() + self.inner.config.recovery_timeout;
        while !link.connection.status().connected() {
            if Instant::now() >= until {
                return false;
            }
            sleep(Duration::from_millis(100)).await;
        }
        true
    }

    /// Whether the current connection is up.
    pub fn is_connected(&self) -> bool {
        self.link().connection.status().connected()
    }

    /// Makes sure there is a live connection: waits for lapin's recovery, then
    /// replaces the connection if it did not come back.
    pub async fn ensure_connected(&self, deadline: Instant) -> Result<()> {
        let link = self.link();
        if self.wait_connected(&link).await {
            return Ok(());
        }
        self.reconnect(link.generation, deadline).await
    }

    /// Replaces the connection that failed (unless another caller already did),
    /// retrying with backoff until `deadline`.
    async fn reconnect(&self, failed: u64, deadline: Instant) -> Result<()> {
        let _one_at_a_time = self.inner.reconnecting.lock().await;
        if self.link().generation != failed {
            return Ok(());
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            match Link::open(&self.inner.config, failed + 1).await {
                Ok(link) => {
                    tracing::warn!(
                        generation = failed + 1,
                        "replaced a broker connection that did not recover"
                    );
                    let old =
                        std::mem::replace(&mut *self.inner.link.write().expect("link lock"), Arc::new(link));
                    // Closing a stuck connection may itself hang: never wait on it.
                    tokio::spawn(async move {
                        let _ = timeout(Duration::from_secs(5), old.connection.close(200, "replaced".into()))
                            .await;
                    });
                    return Ok(());
                }
                Err(e) if Instant::now() + backoff < deadline => {
                    tracing::warn!(error = %e, ?backoff, "reconnecting to the broker");
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn link(&self) -> Arc<Link> {
        self.inner.link.read().expect("link lock").clone()
    }

    /// Closes the connection after in-flight publishes returned.
    pub async fn close(&self) {
        if let Err(e) = self.link().connection.close(200, "bye".into()).await {
            tracing::debug!(error = %e, "closing publisher connection");
        }
    }
}

impl Link {
    async fn open(config: &PublisherConfig, generation: u64) -> Result<Self> {
        let connection = connect(&config.amqp_url, &config.connection_name).await?;
        let mut channels = Vec::with_capacity(config.channels.max(1));
        for _ in 0..config.channels.max(1) {
            channels.push(Mutex::new(confirm_channel(&connection).await?));
        }
        Ok(Self { generation, connection, channels })
    }

    /// The slot's channel, reopened if the broker closed it (lapin recovers
    /// channels only as part of a connection recovery, not after a channel error).
    async fn channel(&self, slot: usize) -> Result<Channel> {
        let slot = &self.channels[slot % self.channels.len()];
        let current = slot.lock().expect("channel slot").clone();
        let state = current.status();
        if state.connected() || state.reconnecting() || !self.connection.status().connected() {
            return Ok(current);
        }
        tracing::info!("reopening a closed publisher channel");
        let fresh = confirm_channel(&self.connection).await?;
        *slot.lock().expect("channel slot") = fresh.clone();
        Ok(fresh)
    }
}

async fn confirm_channel(connection: &Connection) -> Result<Channel> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}
