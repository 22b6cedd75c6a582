//! Parking: where a message that cannot be processed goes, with the reason in
//! its headers. Nothing is dropped silently and nothing is requeued forever.

use lapin::{message::Delivery, types::AMQPValue};

use crate::{
    Outgoing, Publisher, Result, Topology,
    message::{HEADER_PARK_REASON, HEADER_PARK_SOURCE},
};

/// Publishes a copy of `delivery` (body and properties kept) to the parking
/// exchange; the caller acks the original once this returns.
pub async fn park(
    publisher: &Publisher,
    topology: &Topology,
    source_queue: &str,
    delivery: &Delivery,
    reason: &str,
) -> Result<()> {
    tracing::warn!(queue = source_queue, %reason, "parking a message");
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(HEADER_PARK_REASON.into(), AMQPValue::LongString(reason.into()));
    headers.insert(HEADER_PARK_SOURCE.into(), AMQPValue::LongString(source_queue.into()));
    let exchange = topology.parking_exchange();
    publisher
        .publish(Outgoing {
            exchange: &exchange,
            routing_key: delivery.routing_key.as_str(),
            body: &delivery.data,
            properties: delivery.properties.clone().with_headers(headers),
        })
        .await
}
