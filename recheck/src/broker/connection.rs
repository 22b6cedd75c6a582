//! One broker connection and its confirm-mode channels (a [`Link`]): connecting with lapin's
//! auto-recover (and TLS, and several addresses in turn), reopening a channel the broker closed,
//! and retiring a connection replaced because its recovery was stuck. The [`Publisher`] publishes
//! over the current link and replaces it; this module never publishes.
//!
//! [`Publisher`]: super::publisher::Publisher

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::{Channel, Connection, ConnectionProperties, options::ConfirmSelectOptions};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout, timeout_at};

use super::publisher::PublisherConfig;
use crate::{
    error::Result,
    security::{
        secret::{SecretUrl, redact_url},
        tls::AmqpTls,
    },
};

/// Connects with lapin auto-recover on; every component uses this one way in.
pub async fn connect(amqp_url: &str, connection_name: &str) -> Result<Connection> {
    connect_with_tls(amqp_url, connection_name, &AmqpTls::default()).await
}

/// [`connect`], with `tls` for an `amqps://` URL.
pub async fn connect_with_tls(amqp_url: &str, connection_name: &str, tls: &AmqpTls) -> Result<Connection> {
    connect_with(amqp_url, properties(connection_name), tls).await
}

async fn connect_with(amqp_url: &str, props: ConnectionProperties, tls: &AmqpTls) -> Result<Connection> {
    let runtime = lapin::runtime::default_runtime()?;
    Ok(Connection::connect_with_config(amqp_url, props, tls.lapin(), runtime).await?)
}

fn properties(connection_name: &str) -> ConnectionProperties {
    ConnectionProperties::default().with_connection_name(connection_name.into()).enable_auto_recover()
}

/// One broker connection and its channels. Replaced whole when lapin's own
/// recovery does not finish in time (seen with lapin 4.12: a connection reset
/// racing the broker's CONNECTION_FORCED close can leave recovery waiting forever;
/// and with several addresses, lapin keeps retrying the one that died).
pub(super) struct Link {
    pub(super) generation: u64,
    /// Index of the URL in `amqp_urls` this connection went to.
    pub(super) address: usize,
    pub(super) connection: Connection,
    /// Whether `connection` is up, polled (lapin has no event for a connection it is recovering).
    pub(super) up: watch::Receiver<bool>,
    pub(super) channels: Vec<Mutex<Channel>>,
}

/// Closes a replaced connection — now if it is up, or once lapin's recovery brings it back:
/// a stale connection that recovers would replay its channels and consumers, and deliveries
/// to a consumer nobody reads stay unacked for as long as the process lives.
pub(super) fn retire(old: Arc<Link>) {
    let status = old.connection.status().clone();
    retire_when_up(
        move || status.connected(),
        move || {
            let old = old.clone();
            async move {
                let _ = old.connection.close(200, "replaced".into()).await;
            }
        },
    );
}

/// Watches something lapin may still be recovering (a connection or a channel given up on) and
/// closes it whenever it is up, for lapin's whole recovery window.
pub(crate) fn retire_when_up<C, F, Fut>(up: C, close: F)
where
    C: Fn() -> bool + Send + 'static,
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    // lapin's default recovery gives up after 16 attempts, backoff capped at 60 s. The whole
    // window, not until a first close or error: lapin's state is no reliable end of recovery.
    const WATCH: Duration = Duration::from_secs(20 * 60);
    tokio::spawn(async move {
        let until = Instant::now() + WATCH;
        while Instant::now() < until {
            if up() {
                // Closing may itself hang on a half-dead connection: bounded.
                let _ = timeout(Duration::from_secs(5), close()).await;
            }
            sleep(Duration::from_secs(1)).await;
        }
    });
}

/// A flag that follows the connection's state until the link is dropped.
fn watch_connection(connection: &Connection) -> watch::Receiver<bool> {
    let status = connection.status().clone();
    let (tx, rx) = watch::channel(status.connected());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = sleep(Duration::from_millis(100)) => {}
            }
            let up = status.connected();
            tx.send_if_modified(|current| std::mem::replace(current, up) != up);
        }
    });
    rx
}

/// [`Link::open`] until it works or `deadline` (a pass over every address each time).
pub(super) async fn open_with_retry(
    config: &PublisherConfig,
    after: Option<usize>,
    generation: u64,
    deadline: Instant,
) -> Result<Link> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let error = match timeout_at(deadline, Link::open(config, after, generation)).await {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(lapin::Error::from(std::io::Error::from(std::io::ErrorKind::TimedOut)).into());
            }
        };
        if Instant::now() + backoff >= deadline {
            return Err(error);
        }
        tracing::warn!(error = %error, ?backoff, "reconnecting to the broker");
        sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

impl Link {
    /// Connects to the address after `after` (the first one if `None`), then the ones after it,
    /// round the list; the first that answers wins.
    pub(super) async fn open(
        config: &PublisherConfig,
        after: Option<usize>,
        generation: u64,
    ) -> Result<Self> {
        let urls = &config.amqp_urls;
        let count = urls.len().max(1);
        let start = after.map_or(0, |i| i + 1);
        let mut last_error = None;
        for address in (start..start + count).map(|i| i % count) {
            // An empty list fails in lapin's URL parser, with its message.
            let url = urls.get(address).map_or("", SecretUrl::expose);
            match Self::connect_one(config, url).await {
                Ok(connection) => {
                    tracing::info!(broker = %redact_url(url), generation, "connected to RabbitMQ");
                    let mut channels = Vec::with_capacity(config.channels.max(1));
                    for _ in 0..config.channels.max(1) {
                        channels.push(Mutex::new(confirm_channel(&connection).await?));
                    }
                    let up = watch_connection(&connection);
                    return Ok(Self { generation, address, connection, up, channels });
                }
                Err(e) => {
                    if count > 1 {
                        tracing::warn!(broker = %redact_url(url), error = %e, "broker unavailable, trying the next");
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.expect("at least one address tried"))
    }

    /// One address. With several to choose from, a dead node must not hold us: lapin's retries
    /// against it are cut short (its auto-recover then fails fast and the publisher moves on),
    /// and a black-holed one is given up after `connect_timeout`.
    async fn connect_one(config: &PublisherConfig, url: &str) -> Result<Connection> {
        if config.amqp_urls.len() <= 1 {
            return connect_with_tls(url, &config.connection_name, &config.tls).await;
        }
        let props = properties(&config.connection_name).configure_backoff(|b| b.with_max_times(2));
        match timeout(config.connect_timeout, connect_with(url, props, &config.tls)).await {
            Ok(connection) => Ok(connection?),
            Err(_) => Err(lapin::Error::from(std::io::Error::from(std::io::ErrorKind::TimedOut)).into()),
        }
    }

    /// The slot's channel, reopened if the broker closed it (lapin recovers
    /// channels only as part of a connection recovery, not after a channel error).
    pub(super) async fn channel(&self, slot: usize) -> Result<Channel> {
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
