//! CHECKs and CONFIRMs the broker parked by the delivery limit, brought back. The checks and
//! confirms queues dead-letter a message to `recheck.parking` once it was handed back more than
//! `x-delivery-limit` times (the service killed or cut off while holding it, over and over). A
//! CHECK parked so before the store recorded its rows leaves nothing the sweeper can find: the
//! store knows no producer to ask, or nothing at all. So the sweeper also reads the parking
//! queue: a message whose latest death is the delivery limit on the checks (confirms) queue, with
//! a body that still decodes, is republished to the shortest delay tier (the confirms exchange)
//! and acked. Everything else stays parked: what the service itself parked carries
//! `x-recheck-park-reason`, and a message recovered [`MAX_RECOVERIES`] times is left for an
//! operator (something kills every process that holds it).
//!
//! AMQP cannot peek, so a pass takes each parked message and, when it is not one to recover,
//! publishes an unchanged copy back to parking before acking it (it moves to the tail). A nack
//! would keep the order but counts as a delivery on RabbitMQ 4.0–4.2, whose quorum queues drop a
//! message after 20 (parking has no dead-letter target). A pass runs only when the parking
//! queue's depth changed since the last one, or after `every`; it takes at most
//! [`MAX_PER_PASS`] messages.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use lapin::{
    Channel,
    message::Delivery,
    options::{BasicGetOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use recheck::{
    Outgoing, Publisher, Topology,
    message::{CheckBatch, ConfirmBatch, HEADER_PARK_REASON, Limits},
    subscription, telemetry,
};

/// Header on a recovered message: how many times it was recovered.
pub const HEADER_RECOVERED: &str = "x-recheck-recovered";
/// Recoveries of one message before it is left parked.
pub const MAX_RECOVERIES: i64 = 3;
/// Parked messages taken in one pass.
pub const MAX_PER_PASS: u32 = 1_000;
/// Longest pass: a stalled connection must not stop the sweeper.
const PASS_TIMEOUT: Duration = Duration::from_secs(60);
/// The dead-letter reason of a message handed back more than `x-delivery-limit` times.
const DELIVERY_LIMIT: &str = "delivery_limit";
/// The header a quorum queue adds to each delivery: not part of the message.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// CHECK messages republished, and the checks in them.
    pub checks: usize,
    pub check_ids: usize,
    /// CONFIRM messages republished.
    pub confirms: usize,
    /// Parked messages looked at and left parked.
    pub left: usize,
}

pub struct ParkingRecovery {
    publisher: Publisher,
    topology: Topology,
    limits: Limits,
    /// A pass at least this often, even when the depth looks unchanged.
    every: Duration,
    /// The parking queue's depth after the last pass, and when it ended.
    last: Mutex<Option<(u32, Instant)>>,
}

/// Where a recovered message goes.
struct Target {
    exchange: String,
    routing_key: String,
    /// Checks in a CHECK message; `None` for a CONFIRM.
    checks: Option<usize>,
}

impl ParkingRecovery {
    pub fn new(publisher: Publisher, topology: Topology, limits: Limits, every: Duration) -> Self {
        Self { publisher, topology, limits, every, last: Mutex::new(None) }
    }

    /// One pass over the parking queue, if due, on a channel of its own (closed after, which hands
    /// back whatever a failed pass still held).
    pub async fn recover(&self) -> Result<Recovered, recheck::Error> {
        let channel = self.publisher.create_channel().await?;
        let result = tokio::time::timeout(PASS_TIMEOUT, self.pass(&channel))
            .await
            .unwrap_or(Err(recheck::Error::Timeout(PASS_TIMEOUT)));
        let closing = channel.close(200, "parking pass done".into());
        let _ = tokio::time::timeout(subscription::SETTLE_TIMEOUT, closing).await;
        result
    }

    async fn pass(&self, channel: &Channel) -> Result<Recovered, recheck::Error> {
        let parking = self.topology.parking_queue();
        let depth = depth(channel, &parking).await?;
        let mut done = Recovered::default();
        if !self.due(depth) {
            return Ok(done);
        }
        // The depth at the start bounds the pass: copies put back go behind it.
        for _ in 0..depth.min(MAX_PER_PASS) {
            let options = BasicGetOptions { no_ack: false };
            let Some(got) = channel.basic_get(parking.as_str().into(), options).await? else { break };
            let delivery = got.delivery;
            match self.target(&delivery) {
                Some(target) => {
                    self.republish(&delivery, &target).await?;
                    match target.checks {
                        Some(n) => {
                            done.checks += 1;
                            done.check_ids += n;
                            metrics::counter!(telemetry::CHECKS_SWEPT).increment(n as u64);
                        }
                        None => done.confirms += 1,
                    }
                }
                None => {
                    self.put_back(&delivery).await?;
                    done.left += 1;
                }
            }
            subscription::ack(&delivery, false).await?;
        }
        let left = depth_after(channel, &parking).await;
        *self.last.lock().expect("parking lock") = Some((left, Instant::now()));
        Ok(done)
    }

    /// Whether a pass is due: something is parked and the depth changed since the last pass (or
    /// `every` has gone by).
    fn due(&self, depth: u32) -> bool {
        let last = *self.last.lock().expect("parking lock");
        depth > 0 && last.is_none_or(|(left, at)| left != depth || at.elapsed() >= self.every)
    }

    /// Where `delivery` goes back to, if it is a CHECK or CONFIRM parked by the delivery limit.
    fn target(&self, delivery: &Delivery) -> Option<Target> {
        let headers = delivery.properties.headers().as_ref()?;
        if headers.contains_key(HEADER_PARK_REASON) {
            return None;
        }
        let (queue, reason) = last_death(headers)?;
        if reason != DELIVERY_LIMIT {
            return None;
        }
        let recovered = headers.inner().get(HEADER_RECOVERED).and_then(int).unwrap_or(0);
        if recovered >= MAX_RECOVERIES {
            tracing::error!(%queue, recovered, "a message parked by the delivery limit again; left parked");
            return None;
        }
        let content_type = delivery.properties.content_type().as_ref().map(|c| c.as_str());
        let body = &delivery.data;
        if queue == self.topology.checks_queue() {
            let batch = CheckBatch::decode(body, content_type, self.limits).ok()?;
            let tier = self.topology.tiers.first().copied().unwrap_or_default();
            Some(Target {
                exchange: self.topology.delay_exchange(),
                routing_key: self.topology.tier_routing_key(tier),
                checks: Some(batch.checks.len()),
            })
        } else if queue == self.topology.confirms_queue() {
            ConfirmBatch::decode(body, content_type, self.limits).ok()?;
            Some(Target {
                exchange: self.topology.confirms_exchange(),
                routing_key: String::new(),
                checks: None,
            })
        } else {
            None
        }
    }

    /// Publishes `delivery` (body, properties) to `target` without its dead-lettering headers,
    /// counting the recovery; confirmed before the caller acks.
    async fn republish(&self, delivery: &Delivery, target: &Target) -> Result<(), recheck::Error> {
        let old = delivery.properties.headers().clone().unwrap_or_default();
        let recovered = old.inner().get(HEADER_RECOVERED).and_then(int).unwrap_or(0) + 1;
        let mut headers = without(&old, is_death_header);
        headers.insert(HEADER_RECOVERED.into(), AMQPValue::LongLongInt(recovered));
        tracing::warn!(exchange = %target.exchange, checks = ?target.checks, recovered, "republishing a message parked by the delivery limit");
        self.publisher
            .publish(Outgoing {
                exchange: &target.exchange,
                routing_key: &target.routing_key,
                body: &delivery.data,
                properties: delivery.properties.clone().with_headers(headers),
            })
            .await
    }

    /// An unchanged copy of `delivery` back to parking (less `x-delivery-count`, which the
    /// broker adds to each delivery from a quorum queue).
    async fn put_back(&self, delivery: &Delivery) -> Result<(), recheck::Error> {
        let exchange = self.topology.parking_exchange();
        let mut properties = delivery.properties.clone();
        if let Some(headers) = delivery.properties.headers() {
            properties = properties.with_headers(without(headers, |k| k == DELIVERY_COUNT));
        }
        self.publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: delivery.routing_key.as_str(),
                body: &delivery.data,
                properties,
            })
            .await
    }
}

/// Ready messages in `queue` (a passive declare).
async fn depth(channel: &Channel, queue: &str) -> Result<u32, recheck::Error> {
    let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
    Ok(channel.queue_declare(queue.into(), passive, FieldTable::default()).await?.message_count())
}

/// The depth after a pass; unknown counts as changed (`u32::MAX`), so the next pass runs.
async fn depth_after(channel: &Channel, queue: &str) -> u32 {
    depth(channel, queue).await.unwrap_or(u32::MAX)
}

/// The queue and reason of a message's latest dead-lettering: `x-last-death-*` (RabbitMQ 3.13+),
/// else the first `x-death` entry (the latest comes first).
fn last_death(headers: &FieldTable) -> Option<(String, String)> {
    let h = headers.inner();
    if let (Some(queue), Some(reason)) =
        (h.get("x-last-death-queue").and_then(text), h.get("x-last-death-reason").and_then(text))
    {
        return Some((queue, reason));
    }
    let AMQPValue::FieldArray(deaths) = h.get("x-death")? else { return None };
    let AMQPValue::FieldTable(latest) = deaths.as_slice().first()? else { return None };
    let latest = latest.inner();
    Some((latest.get("queue").and_then(text)?, latest.get("reason").and_then(text)?))
}

/// `headers` less the ones `drop` names.
fn without(headers: &FieldTable, drop: impl Fn(&str) -> bool) -> FieldTable {
    let kept = headers.inner().iter().filter(|(k, _)| !drop(k.as_str()));
    kept.map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<ShortString, AMQPValue>>().into()
}

/// Headers the broker writes when it dead-letters or delivers; a recovered message starts
/// without them.
fn is_death_header(name: &str) -> bool {
    name == "x-death"
        || name == DELIVERY_COUNT
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn int(value: &AMQPValue) -> Option<i64> {
    match *value {
        AMQPValue::ShortShortInt(n) => Some(n.into()),
        AMQPValue::ShortShortUInt(n) => Some(n.into()),
        AMQPValue::ShortInt(n) => Some(n.into()),
        AMQPValue::ShortUInt(n) => Some(n.into()),
        AMQPValue::LongInt(n) => Some(n.into()),
        AMQPValue::LongUInt(n) => Some(n.into()),
        AMQPValue::LongLongInt(n) => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn s(text: &str) -> AMQPValue {
        AMQPValue::LongString(text.into())
    }

    fn death(queue: &str, reason: &str) -> AMQPValue {
        AMQPValue::FieldTable(table(&[("queue", s(queue)), ("reason", s(reason))]))
    }

    /// RabbitMQ 3.13+ also writes `x-last-death-*`: they win over `x-death` (the kit's 3.10 does
    /// not write them, so only this test sees that branch).
    #[test]
    fn the_latest_death_is_read_from_x_last_death_or_else_the_first_x_death_entry() {
        let deaths = AMQPValue::FieldArray(
            vec![death("recheck.checks", "delivery_limit"), death("recheck.checks.delay.5s", "expired")]
                .into(),
        );
        let broker_3_10 = table(&[("x-death", deaths.clone())]);
        assert_eq!(last_death(&broker_3_10), Some(("recheck.checks".into(), "delivery_limit".into())));
        let broker_4 = table(&[
            ("x-death", deaths),
            ("x-last-death-queue", s("recheck.confirms")),
            ("x-last-death-reason", s("rejected")),
        ]);
        assert_eq!(last_death(&broker_4), Some(("recheck.confirms".into(), "rejected".into())));
        assert_eq!(last_death(&table(&[("x-first-death-reason", s("delivery_limit"))])), None);
    }

    #[test]
    fn a_recovered_message_loses_the_broker_s_headers_and_keeps_the_rest() {
        let headers = table(&[
            ("x-death", AMQPValue::FieldArray(Vec::new().into())),
            ("x-first-death-queue", s("q")),
            ("x-last-death-reason", s("delivery_limit")),
            ("x-delivery-count", AMQPValue::LongLongInt(11)),
            ("x-recheck-signature", s("v1=00")),
            (HEADER_RECOVERED, AMQPValue::LongInt(2)),
        ]);
        let kept = without(&headers, is_death_header);
        let names: Vec<&str> = kept.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-recheck-recovered", "x-recheck-signature"]);
        assert_eq!(kept.inner().get(HEADER_RECOVERED).and_then(int), Some(2));
    }
}
