//! What every Recheck service binary shares (feature `service`): the broker
//! settings as clap arguments, and connecting + declaring the topology.

use std::time::Duration;

use crate::publisher::{redact, split_urls};
use crate::{Publisher, PublisherConfig, Result, Topology, topology::parse_tiers};

/// The broker settings of a service; `#[command(flatten)]` them into its config.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL (the vhost is the URL-encoded path); for a cluster, one URL per node,
    /// comma-separated: a lost connection is replaced by one to the next node.
    #[arg(long, env = "RECHECK_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name.
    #[arg(long, env = "RECHECK_PREFIX", default_value = "recheck")]
    pub prefix: String,

    /// Delay tiers of the check delay queues, comma-separated (`ms`, `s`, `m`, `h`).
    #[arg(long, env = "RECHECK_DELAY_TIERS", default_value = "5s,30s,2m,10m,1h", value_parser = parse_tiers)]
    // The full path keeps clap from treating the field as a list of single values.
    pub delay_tiers: ::std::vec::Vec<Duration>,
}

impl BrokerArgs {
    pub fn topology(&self) -> Topology {
        Topology::new(self.prefix.clone(), self.delay_tiers.clone())
    }

    /// The broker URLs of `amqp_url`.
    pub fn amqp_urls(&self) -> Vec<String> {
        split_urls(&self.amqp_url)
    }

    /// Connects a publisher named `name` and declares the whole topology.
    pub async fn connect(&self, name: &str) -> Result<Publisher> {
        let urls = self.amqp_urls();
        // lapin retries an unreachable broker with backoff (minutes) before it fails.
        let brokers: Vec<String> = urls.iter().map(|url| redact(url)).collect();
        tracing::info!(?brokers, "connecting to RabbitMQ");
        let publisher = Publisher::connect(PublisherConfig::with_urls(urls, name)).await?;
        let channel = publisher.create_channel().await?;
        self.topology().declare(&channel).await?;
        channel.close(200, "topology declared".into()).await?;
        Ok(publisher)
    }
}
