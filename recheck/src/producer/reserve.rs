//! Reserved CHECKs: message ids whose CHECK is already durable in the delay tier before any
//! transaction holds them, so [`Producer::prepare`](crate::producer::Producer::prepare) hands one out with
//! no broker round trip. A pool per event type (routing key + `expect`) is refilled in the
//! background, in large CHECK batches, to about [`ReserveConfig::ahead`] of the recent prepare
//! rate; ids that age past [`ReserveConfig::max_age`] in the pool, and the whole pool at
//! [`Producer::close`](crate::producer::Producer::close), are given back in one RELEASE message.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::{
    broker::{control::publish_checks, group_commit::json_len, publisher::Publisher, topology::Topology},
    telemetry,
    wire::message::{Check, CheckBatch, now_ms},
};

/// The shortest window a prepare rate is measured over.
pub(crate) const RATE_WINDOW: Duration = Duration::from_millis(100);

/// How the pool of reserved CHECKs behaves; [`ReserveConfig::default`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ReserveConfig {
    /// A reservation older than this (since its CHECK was published) is never handed out.
    /// The rule `max_age + grace ≤ check_delay` leaves every transaction that takes one at least
    /// its grace before the check can find it missing (default 15 s).
    pub max_age: Duration,
    /// The pool holds about this long's prepares at the recent rate (default 1 s): a quiet
    /// producer holds few or none, a burst beyond it falls back to the group commit.
    pub ahead: Duration,
    /// Most reservations held per event type (default 2 000).
    pub max_pool: usize,
}

impl Default for ReserveConfig {
    fn default() -> Self {
        Self { max_age: Duration::from_secs(15), ahead: Duration::from_secs(1), max_pool: 2_000 }
    }
}

/// An event type: reservations carry its routing key and `expect` in their CHECK.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Kind {
    pub routing_key: String,
    pub expect: Option<Vec<String>>,
}

/// One reserved id, its CHECK broker-confirmed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reservation {
    pub id: Uuid,
    /// ms since the epoch, as its CHECK carries it.
    pub published_at: i64,
    /// When its CHECK's publish began: the delay tier's clock started no earlier.
    pub born: Instant,
}

#[derive(Debug, Default)]
struct Slot {
    ready: VecDeque<Reservation>,
    /// Prepares of this kind since the last [`Pool::plan`], hits and misses alike.
    demand: u64,
    /// Prepares per second, smoothed.
    rate: f64,
    /// A refill is on its way: never two at once per kind.
    refilling: bool,
}

/// What the refiller does next: reservations to publish, per kind, and ids to give back.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub refill: Vec<(Kind, usize)>,
    pub release: Vec<(Kind, Reservation)>,
}

/// The pools of one producer. Handing out is a lock and a pop; all I/O is the refiller's.
#[derive(Debug)]
pub(crate) struct Pool {
    config: ReserveConfig,
    slots: Mutex<HashMap<Kind, Slot>>,
    /// Wakes the refiller when a pool runs low.
    pub wake: Notify,
    last_plan: Mutex<Instant>,
}

impl Pool {
    pub fn new(config: ReserveConfig) -> Self {
        Self { config, slots: Mutex::default(), wake: Notify::new(), last_plan: Mutex::new(Instant::now()) }
    }

    /// A fresh reservation of `kind`, or `None` (the caller falls back to the group commit).
    /// Reservations too old to hand out stay for the refiller to give back.
    pub fn take(&self, kind: &Kind) -> Option<Reservation> {
        let mut slots = self.slots.lock().expect("reserve pool lock");
        let slot = match slots.get_mut(kind) {
            Some(slot) => slot,
            None => slots.entry(kind.clone()).or_default(),
        };
        slot.demand += 1;
        let now = Instant::now();
        // Oldest first, so ids are used before they age out; an expired one is at the front.
        let fresh = slot.ready.iter().position(|r| now.duration_since(r.born) <= self.config.max_age);
        let taken = fresh.and_then(|i| slot.ready.remove(i));
        if slot.ready.len() * 2 < self.target(slot.rate) && !slot.refilling {
            self.wake.notify_one();
        }
        taken
    }

    /// How many reservations a kind should hold at `rate` prepares per second.
    fn target(&self, rate: f64) -> usize {
        // Rounded down: a producer preparing less than one per `ahead` holds none.
        let want = (rate * self.config.ahead.as_secs_f64()).floor();
        (want as usize).min(self.config.max_pool)
    }

    /// Updates the rates, takes the expired reservations out and says which kinds to refill
    /// (marking them refilling until [`Pool::refilled`]).
    pub fn plan(&self) -> Plan {
        let now = Instant::now();
        // The rate is sampled over at least RATE_WINDOW: a wake-up right after a plan would
        // otherwise turn one prepare into a huge rate.
        let elapsed = {
            let mut last = self.last_plan.lock().expect("reserve clock lock");
            let elapsed = now.duration_since(*last);
            (elapsed >= RATE_WINDOW).then(|| {
                *last = now;
                elapsed.as_secs_f64()
            })
        };
        let mut plan = Plan::default();
        let mut slots = self.slots.lock().expect("reserve pool lock");
        slots.retain(|kind, slot| {
            if let Some(elapsed) = elapsed {
                let sample = slot.demand as f64 / elapsed;
                slot.demand = 0;
                // Rises at once with a burst, decays over a few seconds when it ends.
                let decay = (-elapsed / 2.0).exp();
                slot.rate = sample.max(slot.rate * decay + sample * (1.0 - decay));
            }
            while slot.ready.front().is_some_and(|r| now.duration_since(r.born) > self.config.max_age) {
                let r = slot.ready.pop_front().expect("front exists");
                plan.release.push((kind.clone(), r));
            }
            let target = self.target(slot.rate);
            if !slot.refilling && slot.ready.len() * 2 < target {
                slot.refilling = true;
                plan.refill.push((kind.clone(), target - slot.ready.len()));
            }
            // A kind nobody prepares any more is forgotten once its pool is empty.
            slot.rate >= 0.01 || !slot.ready.is_empty() || slot.refilling
        });
        plan
    }

    /// A refill of `kind` ended: its reservations (none if the publish failed) join the pool.
    pub fn refilled(&self, kind: &Kind, reservations: Vec<Reservation>) {
        let mut slots = self.slots.lock().expect("reserve pool lock");
        let slot = slots.entry(kind.clone()).or_default();
        slot.refilling = false;
        slot.ready.extend(reservations);
    }

    /// Empties every pool: the reservations to give back at shutdown.
    pub fn drain(&self) -> Vec<(Kind, Reservation)> {
        let mut slots = self.slots.lock().expect("reserve pool lock");
        slots
            .iter_mut()
            .flat_map(|(kind, slot)| slot.ready.drain(..).map(move |r| (kind.clone(), r)))
            .collect()
    }

    /// Reservations held now, over all kinds.
    pub fn len(&self) -> usize {
        self.slots.lock().expect("reserve pool lock").values().map(|s| s.ready.len()).sum()
    }
}

/// Where a producer's reservations are published: its CHECK delay, and its batch caps.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub publisher: Publisher,
    pub topology: Topology,
    pub producer: String,
    pub check_delay: Duration,
    pub max_ids: usize,
    pub max_bytes: usize,
}

/// The refiller: every [`RATE_WINDOW`] (or when a pool runs low) it refills the pools that are
/// low and gives back the expired reservations; at `stop` it lets refills end and gives back
/// the whole pool in one RELEASE.
pub(crate) async fn refill_loop(pool: std::sync::Arc<Pool>, target: Target, stop: CancellationToken) {
    let refills = TaskTracker::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = pool.wake.notified() => {}
            () = tokio::time::sleep(RATE_WINDOW) => {}
        }
        let plan = pool.plan();
        if !plan.release.is_empty() {
            release(&target, plan.release).await;
        }
        for (kind, n) in plan.refill {
            let (pool, target) = (pool.clone(), target.clone());
            refills.spawn(async move {
                let reservations = refill(&target, &kind, n).await;
                pool.refilled(&kind, reservations);
            });
        }
    }
    refills.close();
    refills.wait().await;
    release(&target, pool.drain()).await;
}

/// Publishes the CHECKs of `n` new ids of `kind`: the reservations, once broker-confirmed.
async fn refill(target: &Target, kind: &Kind, n: usize) -> Vec<Reservation> {
    let born = Instant::now();
    let published_at = now_ms();
    let checks: Vec<Check> = (0..n).map(|_| reserved_check(kind, Uuid::now_v7(), published_at)).collect();
    let mut reservations = Vec::with_capacity(n);
    for chunk in chunks(target, checks, false) {
        let ids: Vec<Uuid> = chunk.checks.iter().map(|c| c.message_id).collect();
        match publish_checks(&target.publisher, &target.topology, &chunk, target.check_delay).await {
            Ok(()) => reservations.extend(ids.into_iter().map(|id| Reservation { id, published_at, born })),
            // Not handed out: if the broker kept them after all, their checks settle them unused.
            Err(e) => {
                tracing::warn!(error = %e, n = ids.len(), "reserving checks failed; prepares fall back to the group commit")
            }
        }
    }
    metrics::counter!(telemetry::RESERVED, "producer" => target.producer.clone())
        .increment(reservations.len() as u64);
    reservations
}

/// Gives `reservations` back in RELEASE messages through the shortest delay tier: the producer
/// may publish only to the delay exchange, and the shortest tier arrives well before any reserved
/// check (`max_age + grace ≤ check_delay`), so none of them costs a hook call.
async fn release(target: &Target, reservations: Vec<(Kind, Reservation)>) {
    if reservations.is_empty() {
        return;
    }
    let n = reservations.len();
    let checks =
        reservations.into_iter().map(|(kind, r)| reserved_check(&kind, r.id, r.published_at)).collect();
    let shortest = target.topology.tiers.first().copied().unwrap_or(Duration::ZERO);
    for chunk in chunks(target, checks, true) {
        if let Err(e) = publish_checks(&target.publisher, &target.topology, &chunk, shortest).await {
            // Their reserved checks still settle them unused, by a hook call each.
            tracing::warn!(error = %e, n = chunk.checks.len(), "releasing reservations failed");
        }
    }
    metrics::counter!(telemetry::RELEASED, "producer" => target.producer.clone()).increment(n as u64);
    tracing::debug!(n, "reservations released");
}

fn reserved_check(kind: &Kind, message_id: Uuid, published_at: i64) -> Check {
    Check {
        message_id,
        routing_key: kind.routing_key.clone(),
        business_key: String::new(),
        attempt: 0,
        published_at,
        expect: kind.expect.clone(),
        traceparent: None,
        reserved: true,
    }
}

/// Splits `checks` into CHECK messages of `target`'s producer within its batch caps (ids and
/// encoded bytes).
fn chunks(target: &Target, checks: Vec<Check>, release: bool) -> Vec<CheckBatch> {
    split(&target.producer, target.max_ids, target.max_bytes, checks, release)
}

fn split(
    producer: &str,
    max_ids: usize,
    max_bytes: usize,
    mut checks: Vec<Check>,
    release: bool,
) -> Vec<CheckBatch> {
    // Entries of one kind encode to the same length but for `published_at`'s digits (20 bytes
    // spare cover them); a RELEASE mixes kinds, so each run of one kind is measured once and
    // the longest counts.
    let same_kind = |a: &Check, b: &Check| a.routing_key == b.routing_key && a.expect == b.expect;
    let Some(longest) = checks.chunk_by(same_kind).map(|run| json_len(&run[0])).max() else {
        return Vec::new();
    };
    let per_id = longest + 21;
    let envelope = json_len(&CheckBatch { release, ..CheckBatch::new(producer, Vec::new()) });
    let size = (max_bytes.saturating_sub(envelope) / per_id).min(max_ids).max(1);
    let mut batches = Vec::with_capacity(checks.len().div_ceil(size));
    while !checks.is_empty() {
        let rest = checks.split_off(checks.len().min(size));
        batches.push(CheckBatch { release, ..CheckBatch::new(producer, checks) });
        checks = rest;
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind() -> Kind {
        Kind { routing_key: "order.created".into(), expect: Some(vec!["points".into()]) }
    }

    fn reservations(n: usize) -> Vec<Reservation> {
        (0..n).map(|_| Reservation { id: Uuid::now_v7(), published_at: 0, born: Instant::now() }).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_past_its_max_age_is_never_handed_out_and_is_released() {
        let pool = Pool::new(ReserveConfig { max_age: Duration::from_secs(15), ..ReserveConfig::default() });
        pool.refilled(&kind(), reservations(2));
        assert!(pool.take(&kind()).is_some(), "fresh: handed out");
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(pool.take(&kind()).is_some(), "exactly max_age old: still handed out");
        pool.refilled(&kind(), reservations(1));
        tokio::time::advance(Duration::from_millis(15_001)).await;
        assert!(pool.take(&kind()).is_none(), "one ms past max_age: refused");
        let plan = pool.plan();
        assert_eq!(plan.release.len(), 1, "the expired one is given back");
        assert_eq!(pool.len(), 0);
    }

    /// A RELEASE mixes kinds: its messages fit the byte cap whichever kind comes first.
    #[test]
    fn a_release_of_mixed_kinds_stays_within_the_byte_cap() {
        let short = Kind { routing_key: "o".into(), expect: None };
        let long = Kind {
            routing_key: "order.created.with.a.long.name".into(),
            expect: Some(vec!["p".repeat(200)]),
        };
        let mut checks = vec![reserved_check(&short, Uuid::now_v7(), 1)];
        checks.extend((0..50).map(|_| reserved_check(&long, Uuid::now_v7(), now_ms())));
        let batches = split("orders", 5_000, 4_096, checks, true);
        assert!(batches.len() > 1);
        for batch in &batches {
            let len = json_len(batch);
            assert!(len <= 4_096, "{len} bytes over the cap");
        }
        assert_eq!(batches.iter().map(|b| b.checks.len()).sum::<usize>(), 51);
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_follows_the_prepare_rate() {
        let pool = Pool::new(ReserveConfig::default());
        // 500 prepares in one second, all misses: the pool asks for about a second of them.
        for _ in 0..500 {
            assert!(pool.take(&kind()).is_none());
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let plan = pool.plan();
        assert_eq!(plan.refill, vec![(kind(), 500)]);
        assert!(pool.plan().refill.is_empty(), "no second refill while one is on its way");
        pool.refilled(&kind(), reservations(500));
        // Quiet for a minute: the rate decays, nothing more is reserved, and the idle ids age out.
        for _ in 0..60 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(pool.plan().refill.is_empty());
        }
        assert_eq!(pool.len(), 0, "a quiet producer holds none");
    }
}
