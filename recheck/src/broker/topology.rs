//! Every exchange and queue of the wire contract (see `docs/contract.md` in the repository),
//! declared by one function that every component calls. Declaring is idempotent as long as the
//! configuration is the same; a changed argument makes the broker refuse (PRECONDITION_FAILED),
//! which is the signal that a queue must be migrated, not silently redefined.

use std::time::Duration;

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

use crate::error::Result;

/// Names and delay tiers of one Recheck installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Prefix of every name, `recheck` by default.
    pub prefix: String,
    /// Fixed delay tiers, ascending. A check is delayed by the smallest tier ≥ its delay.
    pub tiers: Vec<Duration>,
    /// Redeliveries of one message on a callback queue before it is parked.
    pub delivery_limit: u32,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            prefix: "recheck".into(),
            tiers: [5, 30, 120, 600, 3600].map(Duration::from_secs).to_vec(),
            delivery_limit: 10,
        }
    }
}

impl Topology {
    /// The topology of `prefix` with `tiers` (sorted, repeats dropped) and the default delivery
    /// limit. Give every service the same tiers (`RECHECK_DELAY_TIERS`): a CHECK routed to a
    /// tier with no queue is unroutable.
    pub fn new(prefix: impl Into<String>, mut tiers: Vec<Duration>) -> Self {
        tiers.sort();
        tiers.dedup();
        Self { prefix: prefix.into(), tiers, ..Self::default() }
    }

    /// Business messages, routed by event type (`order.created`).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    /// Where a CHECK is published: a direct exchange routing by tier
    /// ([`Self::tier_routing_key`]) into that tier's delay queue.
    pub fn delay_exchange(&self) -> String {
        format!("{}.checks.delay", self.prefix)
    }
    /// The delay queue of `tier`: a CHECK waits there for the tier, then is dead-lettered to the
    /// checks exchange.
    pub fn tier_queue(&self, tier: Duration) -> String {
        format!("{}.checks.delay.{}", self.prefix, tier_name(tier))
    }
    /// Fanout exchange of the CHECKs whose delay has passed.
    pub fn checks_exchange(&self) -> String {
        format!("{}.checks", self.prefix)
    }
    /// The queue of the checks exchange (same name); the callback service reads it.
    pub fn checks_queue(&self) -> String {
        self.checks_exchange()
    }
    /// Fanout exchange consumers publish their CONFIRMs to.
    pub fn confirms_exchange(&self) -> String {
        format!("{}.confirms", self.prefix)
    }
    /// The queue of the confirms exchange (same name); the callback service reads it.
    pub fn confirms_queue(&self) -> String {
        self.confirms_exchange()
    }
    /// Fanout exchange poison messages are parked to, the reason in their headers.
    pub fn parking_exchange(&self) -> String {
        format!("{}.parking", self.prefix)
    }
    /// The queue of the parking exchange (same name): it keeps what it gets, no limit.
    pub fn parking_queue(&self) -> String {
        self.parking_exchange()
    }

    /// The tier a delay rounds up to (the largest tier when the delay exceeds them all).
    pub fn tier_for(&self, delay: Duration) -> Duration {
        self.tiers
            .iter()
            .copied()
            .find(|t| *t >= delay)
            .or_else(|| self.tiers.last().copied())
            .unwrap_or(delay)
    }

    /// Routing key on the delay exchange that selects a tier's queue.
    pub fn tier_routing_key(&self, tier: Duration) -> String {
        tier_name(tier)
    }

    /// Declares every exchange and queue. Safe to call from every component at start.
    pub async fn declare(&self, channel: &Channel) -> Result<()> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for (name, kind) in [
            (self.events_exchange(), ExchangeKind::Topic),
            (self.delay_exchange(), ExchangeKind::Direct),
            (self.checks_exchange(), ExchangeKind::Fanout),
            (self.confirms_exchange(), ExchangeKind::Fanout),
            (self.parking_exchange(), ExchangeKind::Fanout),
        ] {
            channel.exchange_declare(name.into(), kind, durable, FieldTable::default()).await?;
        }

        // Parking keeps what it gets: no limit, no dead-lettering.
        self.declare_bound(channel, &self.parking_queue(), &self.parking_exchange(), "", quorum()).await?;
        for queue in [self.checks_queue(), self.confirms_queue()] {
            let exchange = queue.clone();
            self.declare_bound(channel, &queue, &exchange, "", self.poison_guarded()).await?;
        }
        for &tier in &self.tiers {
            let mut args = quorum();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(millis(tier)));
            dead_letter_to(&mut args, &self.checks_exchange());
            self.declare_bound(
                channel,
                &self.tier_queue(tier),
                &self.delay_exchange(),
                &self.tier_routing_key(tier),
                args,
            )
            .await?;
        }
        Ok(())
    }

    /// Checks that every exchange and queue [`Topology::declare`] declares exists, with passive
    /// declares (which need no permission): what a service runs whose broker user may not
    /// declare the shared topology. A missing one fails with NOT_FOUND (404) and closes the
    /// channel. Bindings cannot be checked this way; the declaring service makes them.
    pub async fn verify(&self, channel: &Channel) -> Result<()> {
        let passive = ExchangeDeclareOptions { passive: true, durable: true, ..Default::default() };
        for exchange in [
            self.events_exchange(),
            self.delay_exchange(),
            self.checks_exchange(),
            self.confirms_exchange(),
            self.parking_exchange(),
        ] {
            // The kind is not compared on a passive declare.
            channel
                .exchange_declare(exchange.into(), ExchangeKind::Direct, passive, FieldTable::default())
                .await?;
        }
        let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
        let tiers = self.tiers.iter().map(|&tier| self.tier_queue(tier));
        for queue in
            [self.parking_queue(), self.checks_queue(), self.confirms_queue()].into_iter().chain(tiers)
        {
            channel.queue_declare(queue.into(), passive, FieldTable::default()).await?;
        }
        Ok(())
    }

    /// A consumer's own queue for business messages: quorum, bound to the events
    /// exchange by the given routing keys, poison messages parked after the limit.
    pub async fn declare_consumer_queue(
        &self,
        channel: &Channel,
        queue: &str,
        routing_keys: &[&str],
    ) -> Result<()> {
        for key in routing_keys {
            self.declare_bound(channel, queue, &self.events_exchange(), key, self.poison_guarded()).await?;
        }
        Ok(())
    }

    /// Quorum queue arguments that park a message redelivered `delivery_limit` times.
    fn poison_guarded(&self) -> FieldTable {
        let mut args = quorum();
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(self.delivery_limit.into()));
        dead_letter_to(&mut args, &self.parking_exchange());
        args
    }

    async fn declare_bound(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        args: FieldTable,
    ) -> Result<()> {
        channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), args).await?;
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

/// At-least-once dead-lettering: the message leaves the source queue only once
/// the target confirmed it. RabbitMQ requires `reject-publish` overflow for it.
fn dead_letter_to(args: &mut FieldTable, exchange: &str) {
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(exchange.into()));
    args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `1500ms`, `5s`, `2m`, `1h`: a tier's name, readable in the management UI.
fn tier_name(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0ms".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// Parses a tier list such as `1s,30s,2m,1h` (also `1500ms`).
pub fn parse_tiers(s: &str) -> std::result::Result<Vec<Duration>, String> {
    s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(parse_duration).collect()
}

/// Parses `250ms`, `5s`, `2m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let scale: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s, m, h or d)")),
    };
    n.checked_mul(scale).map(Duration::from_millis).ok_or_else(|| format!("duration {s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_round_up_and_cap() {
        let t = Topology::new("x", parse_tiers("30s,1s,2m").unwrap());
        assert_eq!(t.tier_for(Duration::from_millis(10)), Duration::from_secs(1));
        assert_eq!(t.tier_for(Duration::from_secs(31)), Duration::from_secs(120));
        assert_eq!(t.tier_for(Duration::from_secs(9999)), Duration::from_secs(120));
        assert_eq!(t.tier_queue(Duration::from_millis(1500)), "x.checks.delay.1500ms");
        assert_eq!(t.tier_queue(Duration::from_secs(120)), "x.checks.delay.2m");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("3w").unwrap_err().contains("or d"));
        assert!(parse_duration("99999999999999999d").is_err());
    }
}
