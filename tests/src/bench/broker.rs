//! The little AMQP the bench needs beside the SDK: queue depths, a plain quorum queue, pre-filling
//! a queue with many messages.

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{StreamExt, TryStreamExt, stream};
use lapin::{
    BasicProperties, Channel,
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
};
use recheck::{Outgoing, Publisher, PublisherConfig};
use tokio::time::Instant;

/// Ready (not delivered) messages in `queue`, by a passive declare.
pub async fn ready(channel: &Channel, queue: &str) -> Result<u64> {
    let options = QueueDeclareOptions { passive: true, ..Default::default() };
    let queue = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .with_context(|| format!("passive declare of {queue}"))?;
    Ok(u64::from(queue.message_count()))
}

/// Waits until every queue in `queues` has no ready message, or fails at `deadline`.
pub async fn wait_drained(channel: &Channel, queues: &[String], deadline: Instant) -> Result<()> {
    for queue in queues {
        loop {
            let left = ready(channel, queue).await?;
            if left == 0 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{queue} still holds {left} ready messages");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// A durable quorum queue (the broker settings of every scenario).
pub async fn declare_quorum(channel: &Channel, queue: &str) -> Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), args).await?;
    Ok(())
}

/// A publisher on its own connection.
pub async fn publisher(amqp_url: &str, name: &str) -> Result<Publisher> {
    Ok(Publisher::connect(PublisherConfig::new(amqp_url, name)).await?)
}

/// Publishes every body (broker-confirmed, `window` in flight) to `exchange`.
pub async fn fill(
    publisher: &Publisher,
    exchange: &str,
    routing_key: &str,
    bodies: &[Vec<u8>],
    properties: BasicProperties,
    window: usize,
) -> Result<()> {
    stream::iter(bodies)
        .map(|body| {
            publisher.publish(Outgoing { exchange, routing_key, body, properties: properties.clone() })
        })
        .buffer_unordered(window.max(1))
        .try_collect::<()>()
        .await?;
    Ok(())
}
