//! Broker-confirmed publishing that survives connection loss.
//!
//! lapin's auto-recover reconnects and replays topology, but it does not
//! republish what was in flight: a publish whose confirm never came back is
//! republished here (at-least-once; consumers dedupe by message id). Many
//! publishes stay in flight at once — each caller awaits only its own confirm.
//!
//! Given several broker addresses (the nodes of a cluster), a replacement
//! connection goes to the next address after the one that failed, so a dead
//! node is left behind instead of retried.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Duration;

use futures_util::future::try_join_all;
use lapin::{BasicProperties, Channel, Confirmation, options::BasicPublishOptions};
use tokio::time::{Instant, sleep, timeout};

use super::connection::{Link, open_with_retry, retire};
pub use super::connection::{connect, connect_with_tls};
use crate::security::secret::SecretUrl;
use crate::security::tls::AmqpTls;
use crate::{
    error::{Error, Result},
    telemetry,
};

/// How a [`Publisher`] connects and how long it keeps trying.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Broker URLs (the vhost is the URL-encoded path): one, or one per cluster node, tried in
    /// turn. Never logged with their passwords.
    pub amqp_urls: Vec<SecretUrl>,
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
    /// With several URLs, the longest one may take to connect before the next is tried.
    pub connect_timeout: Duration,
    /// TLS for `amqps://` URLs (ignored for `amqp://`).
    pub tls: AmqpTls,
}

impl PublisherConfig {
    /// One broker.
    pub fn new(amqp_url: impl Into<SecretUrl>, connection_name: impl Into<String>) -> Self {
        Self::with_urls([amqp_url], connection_name)
    }

    /// Several brokers, e.g. every node of a cluster; the first one is tried first.
    pub fn with_urls(
        amqp_urls: impl IntoIterator<Item = impl Into<SecretUrl>>,
        connection_name: impl Into<String>,
    ) -> Self {
        Self {
            amqp_urls: amqp_urls.into_iter().map(Into::into).collect(),
            connection_name: connection_name.into(),
            channels: 2,
            confirm_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(60),
            recovery_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            tls: AmqpTls::default(),
        }
    }
}

/// Splits a comma-separated list of broker URLs (`RECHECK_AMQP_URL`), ignoring blanks.
pub fn split_urls(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|url| !url.is_empty()).map(str::to_owned).collect()
}

/// One message to publish: always persistent and mandatory.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// The exchange to publish to.
    pub exchange: &'a str,
    /// Its routing key.
    pub routing_key: &'a str,
    /// The body.
    pub body: &'a [u8],
    /// The AMQP properties; the delivery mode is set to persistent whatever they say.
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

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("config", &self.inner.config).finish()
    }
}

impl Publisher {
    /// Connects to the first broker address that answers. With one address, lapin retries it
    /// (minutes, with backoff); with several, each is tried for `connect_timeout`, in rounds,
    /// until `publish_timeout`.
    pub async fn connect(config: PublisherConfig) -> Result<Self> {
        let link = if config.amqp_urls.len() > 1 {
            let deadline = Instant::now() + config.publish_timeout;
            open_with_retry(&config, None, 0, deadline).await?
        } else {
            Link::open(&config, None, 0).await?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                link: RwLock::new(Arc::new(link)),
                reconnecting: tokio::sync::Mutex::new(()),
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// The settings it was made with.
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

    /// Index in `config().amqp_urls` of the broker the current connection went to.
    pub fn address(&self) -> usize {
        self.link().address
    }

    /// Publishes and waits for the broker's confirm, republishing across
    /// reconnects, nacks and confirm timeouts until `publish_timeout`.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<()> {
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
        let deadline = Instant::now() + self.inner.config.publish_timeout;
        let slot = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let mut backoff = Duration::from_millis(50);
        loop {
            let link = self.link();
            let channel = link.channel(slot).await?;
            let error = match self.publish_once(&link, &channel, &msg).await {
                Ok(()) => return Ok(()),
                Err(e @ Error::Unroutable { .. }) => return Err(e),
                Err(e) => e,
            };
            if Instant::now() + backoff >= deadline {
                return Err(error);
            }
            tracing::warn!(exchange = msg.exchange, error = %error, "publish failed; republishing");
            metrics::counter!(telemetry::REPUBLISHES, "exchange" => msg.exchange.to_owned()).increment(1);
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
    /// connection even handing the frame to lapin may never finish. Cut short
    /// when the connection is lost: lapin settles pending confirms only once
    /// its recovery reconnects, and against a dead node that is never.
    async fn publish_once(&self, link: &Link, channel: &Channel, msg: &Outgoing<'_>) -> Result<()> {
        let (wait, started) = (self.inner.config.confirm_timeout, Instant::now());
        let mut up = link.up.clone();
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
        let attempt = async {
            tokio::select! {
                result = attempt => Some(result),
                _ = up.wait_for(|up| !*up) => None,
            }
        };
        match timeout(wait, attempt).await {
            Err(_) => Err(Error::ConfirmTimeout(wait)),
            Ok(None) => {
                tracing::debug!("connection lost while awaiting a confirm");
                Err(Error::ConfirmTimeout(started.elapsed()))
            }
            Ok(Some(result)) => Self::settle(result, msg),
        }
    }

    fn settle(result: lapin::Result<Confirmation>, msg: &Outgoing<'_>) -> Result<()> {
        match result {
            Err(e) => Err(Error::Amqp(e)),
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
            Ok(Confirmation::Ack(Some(_))) => Err(Error::Unroutable {
                exchange: msg.exchange.to_owned(),
                routing_key: msg.routing_key.to_owned(),
            }),
            Ok(Confirmation::Nack(_)) => Err(Error::Nacked { exchange: msg.exchange.to_owned() }),
        }
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
            let status = link.connection.status();
            // lapin gave up (or the connection was closed): no point in waiting.
            if Instant::now() >= until || status.errored() || status.closed() {
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
    /// starting with the address after the failed one, retrying with backoff until `deadline`.
    async fn reconnect(&self, failed: u64, deadline: Instant) -> Result<()> {
        let _one_at_a_time = self.inner.reconnecting.lock().await;
        let current = self.link();
        if current.generation != failed {
            return Ok(());
        }
        let link = open_with_retry(&self.inner.config, Some(current.address), failed + 1, deadline).await?;
        tracing::warn!(generation = failed + 1, "replaced a broker connection that did not recover");
        let old = std::mem::replace(&mut *self.inner.link.write().expect("link lock"), Arc::new(link));
        retire(old);
        Ok(())
    }

    fn link(&self) -> Arc<Link> {
        self.inner.link.read().expect("link lock").clone()
    }

    /// Closes the connection after in-flight publishes returned. Bounded: closing a connection
    /// whose recovery is stuck can wait forever, and a service must still exit on SIGTERM.
    pub async fn close(&self) {
        match timeout(Duration::from_secs(5), self.link().connection.close(200, "bye".into())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "closing publisher connection"),
            Err(_) => tracing::warn!("the broker connection did not close within 5 s; leaving it"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_url_lists() {
        assert_eq!(split_urls("amqp://a:1/v"), ["amqp://a:1/v"]);
        assert_eq!(split_urls(" amqp://a:1/v, amqp://b:2/v ,"), ["amqp://a:1/v", "amqp://b:2/v"]);
        assert!(split_urls("").is_empty());
    }

    #[test]
    fn one_url_or_several() {
        assert_eq!(PublisherConfig::new("amqp://a", "n").amqp_urls, ["amqp://a"]);
        let config = PublisherConfig::with_urls(["amqp://a", "amqp://b"], "n");
        assert_eq!(config.amqp_urls, ["amqp://a", "amqp://b"]);
    }
}
