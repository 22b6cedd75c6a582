//! Recheck's own control messages on the broker: the properties every CHECK and CONFIRM batch
//! carries, and publishing a CHECK batch into its delay tier. Both roles use them (a producer's
//! first checks, the callback service's next ones, a consumer's CONFIRMs), so they live here and
//! not with either role.

use std::time::Duration;

use lapin::BasicProperties;
use uuid::Uuid;

use crate::{
    broker::{
        publisher::{Outgoing, Publisher},
        topology::Topology,
    },
    error::Result,
    telemetry,
    wire::message::{CONTENT_TYPE_JSON, CheckBatch, now_ms},
};

/// Publishes one CHECK message into the delay tier for `delay`: a producer's first checks and
/// reservations, and the callback service's next checks.
pub async fn publish_checks(
    publisher: &Publisher,
    topology: &Topology,
    batch: &CheckBatch,
    delay: Duration,
) -> Result<()> {
    let body = serde_json::to_vec(batch)?;
    let exchange = topology.delay_exchange();
    let routing_key = topology.tier_routing_key(topology.tier_for(delay));
    publisher
        .publish(Outgoing {
            exchange: &exchange,
            routing_key: &routing_key,
            body: &body,
            properties: json_properties(),
        })
        .await?;
    metrics::histogram!(telemetry::CHECK_BATCH_SIZE, "producer" => batch.producer.clone())
        .record(batch.checks.len() as f64);
    Ok(())
}

/// Properties of a CHECK / CONFIRM message: JSON, its own batch id.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE_JSON.into())
        .with_message_id(Uuid::now_v7().to_string().into())
        .with_timestamp(now_secs())
}

/// Now, in the whole seconds of an AMQP `timestamp` property.
pub fn now_secs() -> u64 {
    u64::try_from(now_ms() / 1000).unwrap_or_default()
}
