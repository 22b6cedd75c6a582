//! What every Recheck service binary shares (feature `service`): the broker
//! settings as clap arguments, and connecting + declaring the topology.
//!
//! A service whose broker user may not declare the shared topology (a producer's or a
//! consumer's least-privilege user, see `compose/rabbitmq-definitions.json`) is refused
//! (ACCESS_REFUSED) and waits instead until the topology exists: the callback service, which
//! owns it, declares it.

use std::time::Duration;

use tokio::time::{Instant, sleep};

use crate::broker::publisher::split_urls;
use crate::{
    broker::{
        publisher::{Publisher, PublisherConfig},
        topology::{Topology, parse_tiers},
    },
    error::Result,
    security::{secret::SecretUrl, tls::AmqpTlsArgs},
};

/// How long a service that may not declare the topology waits for it to appear.
pub const TOPOLOGY_WAIT: Duration = Duration::from_secs(120);

/// The broker settings of a service; `#[command(flatten)]` them into its config.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL (the vhost is the URL-encoded path); for a cluster, one URL per node,
    /// comma-separated: a lost connection is replaced by one to the next node.
    #[arg(
        long,
        env = "RECHECK_AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: SecretUrl,

    /// Prefix of every exchange and queue name.
    #[arg(long, env = "RECHECK_PREFIX", default_value = "recheck")]
    pub prefix: String,

    /// Delay tiers of the check delay queues, comma-separated (`ms`, `s`, `m`, `h`).
    #[arg(long, env = "RECHECK_DELAY_TIERS", default_value = "5s,30s,2m,10m,1h", value_parser = parse_tiers)]
    // The full path keeps clap from treating the field as a list of single values.
    pub delay_tiers: ::std::vec::Vec<Duration>,

    /// TLS for `amqps://` URLs.
    // Not help text: clap ignores the doc comment of a flattened field.
    #[command(flatten)]
    pub tls: AmqpTlsArgs,
}

impl BrokerArgs {
    /// The topology these settings name: prefix and delay tiers, the default delivery limit.
    pub fn topology(&self) -> Topology {
        Topology::new(self.prefix.clone(), self.delay_tiers.clone())
    }

    /// The broker URLs of `amqp_url`.
    pub fn amqp_urls(&self) -> Vec<String> {
        split_urls(&self.amqp_url)
    }

    /// The publisher settings: every URL, and TLS for `amqps://` ones.
    pub fn publisher_config(&self, name: &str) -> Result<PublisherConfig> {
        let mut config = PublisherConfig::with_urls(self.amqp_urls(), name);
        config.tls = self.tls.load()?;
        Ok(config)
    }

    /// Connects a publisher named `name` and declares the whole topology (or, refused the
    /// permission, waits until it exists).
    pub async fn connect(&self, name: &str) -> Result<Publisher> {
        let config = self.publisher_config(name)?;
        // lapin retries an unreachable broker with backoff (minutes) before it fails.
        tracing::info!(brokers = %self.amqp_url, tls = ?config.tls, "connecting to RabbitMQ");
        let publisher = Publisher::connect(config).await?;
        let topology = self.topology();
        let channel = publisher.create_channel().await?;
        match topology.declare(&channel).await {
            Ok(()) => {
                channel.close(200, "topology declared".into()).await?;
                return Ok(publisher);
            }
            Err(e) if e.amqp_code() == Some(ACCESS_REFUSED) => {
                tracing::info!(error = %e, "no permission to declare the topology: waiting until it exists");
            }
            Err(e) => return Err(e),
        }
        await_topology(&publisher, &topology, Instant::now() + TOPOLOGY_WAIT).await?;
        Ok(publisher)
    }
}

const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;

/// Verifies the topology until it exists (each miss closes the channel: a new one per round).
async fn await_topology(publisher: &Publisher, topology: &Topology, deadline: Instant) -> Result<()> {
    for round in 0.. {
        let channel = publisher.create_channel().await?;
        match topology.verify(&channel).await {
            Ok(()) => {
                channel.close(200, "topology verified".into()).await?;
                return Ok(());
            }
            Err(e) if e.amqp_code() == Some(NOT_FOUND) && Instant::now() < deadline => {
                if round % 10 == 0 {
                    tracing::info!(error = %e, "waiting for the topology to be declared (by the callback service)");
                }
                sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}
