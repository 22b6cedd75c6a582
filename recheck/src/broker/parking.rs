//! Parking: where a message that cannot be processed goes, with the reason in
//! its headers. Nothing is dropped silently and nothing is requeued forever.

use lapin::{message::Delivery, types::AMQPValue};

use crate::{
    broker::{
        publisher::{Outgoing, Publisher},
        topology::Topology,
    },
    error::Result,
    security::signing::SignatureError,
    telemetry,
    wire::message::{DecodeError, HEADER_PARK_REASON, HEADER_PARK_SOURCE},
};

/// Why a message is parked: the full text goes into its header, the short class into the
/// `reason` label of `recheck_parked_total`.
pub trait ParkReason: std::fmt::Display {
    /// A short, fixed class (`invalid_json`, `other`, …): the metric's `reason` label.
    fn class(&self) -> &'static str;
}

impl ParkReason for DecodeError {
    fn class(&self) -> &'static str {
        DecodeError::class(self)
    }
}

impl ParkReason for SignatureError {
    fn class(&self) -> &'static str {
        SignatureError::class(self)
    }
}

impl ParkReason for str {
    fn class(&self) -> &'static str {
        "other"
    }
}

impl ParkReason for String {
    fn class(&self) -> &'static str {
        "other"
    }
}

/// Publishes a copy of `delivery` (body and properties kept) to the parking
/// exchange; the caller acks the original once this returns.
pub async fn park(
    publisher: &Publisher,
    topology: &Topology,
    source_queue: &str,
    delivery: &Delivery,
    reason: &(impl ParkReason + ?Sized),
) -> Result<()> {
    tracing::warn!(queue = source_queue, %reason, "parking a message");
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(HEADER_PARK_REASON.into(), AMQPValue::LongString(reason.to_string().into()));
    headers.insert(HEADER_PARK_SOURCE.into(), AMQPValue::LongString(source_queue.into()));
    let exchange = topology.parking_exchange();
    publisher
        .publish(Outgoing {
            exchange: &exchange,
            routing_key: delivery.routing_key.as_str(),
            body: &delivery.data,
            properties: delivery.properties.clone().with_headers(headers),
        })
        .await?;
    metrics::counter!(telemetry::PARKED, "queue" => source_queue.to_owned(), "reason" => reason.class())
        .increment(1);
    Ok(())
}

/// Parks `delivery` and acks it; if parking fails, hands it back instead (nack), to be parked
/// when it comes again. `true` when it was parked. Every queue reader settles poison this way.
pub async fn park_and_ack(
    publisher: &Publisher,
    topology: &Topology,
    source_queue: &str,
    delivery: &Delivery,
    reason: &(impl ParkReason + ?Sized),
) -> bool {
    if let Err(e) = park(publisher, topology, source_queue, delivery, reason).await {
        tracing::warn!(queue = source_queue, error = %e, "parking failed; redelivering");
        let _ = crate::broker::subscription::nack(delivery).await;
        return false;
    }
    // A failed ack is no loss: the broker redelivers, and the copy is parked again.
    if let Err(e) = crate::broker::subscription::ack(delivery, false).await {
        tracing::warn!(queue = source_queue, error = %e, "ack after parking failed");
    }
    true
}
