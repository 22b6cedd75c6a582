//! Check processing: for each due check, decide from the store (DESIGN.md
//! state machine), call the producer's `ResendHook` if nobody confirmed,
//! publish the next CHECK (broker-confirmed), record the outcome, then ack.
//!
//! Each check runs: record → claim attempt `n` (conditional update) → RPC with
//! attempt `n + 1` → publish next CHECK → finish (conditional on `n + 1`) → ack. The RPC is
//! one `ResendBatch` for all the claimed checks of a delivery (`resend.rs`).
//! A crash anywhere leaves a redelivered check that either finds its attempt
//! taken and scheduled (nothing to do), or taken and never scheduled: after a
//! lease it publishes the missing next CHECK itself.

mod decide;
mod resend;

use decide::{Step, span};

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use lapin::message::Delivery;
use recheck::{
    Publisher, Subscription, SubscriptionConfig, Topology,
    broker::control::publish_checks,
    message::{Check, CheckBatch, Limits, now_ms},
    parking::park_and_ack,
    retry::{self, Settled},
    subscription, telemetry,
};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    backlog::Backlog,
    breaker::Breakers,
    failure::HandleError,
    registry::ProducerRegistry,
    store::{AttemptOutcome, MessageRow, Status, Store},
};

/// The state machine's knobs.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_resends: u32,
    /// Failing RPCs for this long since the first failure → `failed("producer unreachable")`.
    pub unreachable_deadline: Duration,
    pub rpc_timeout: Duration,
    pub max_rpcs_per_producer: usize,
    /// Longest a check is deferred because its consumer is behind.
    pub max_deferral: Duration,
    /// Checks decided at once, over all deliveries: what bounds memory in a backlog.
    pub max_checks_in_flight: usize,
    /// A delivery's unconfirmed checks go to their producer as one `ResendBatch` (else one
    /// `Resend` each): `--resend-batch`.
    pub resend_batch: bool,
}

/// Counters since start.
#[derive(Debug)]
pub struct CheckCounters {
    pub started: std::time::Instant,
    pub checks: AtomicU64,
    pub rpcs: AtomicU64,
    pub parked: AtomicU64,
    pub deferred: AtomicU64,
    /// Checks deferred because their producer's circuit was open.
    pub circuit_deferred: AtomicU64,
}

impl Default for CheckCounters {
    fn default() -> Self {
        Self {
            started: std::time::Instant::now(),
            checks: 0.into(),
            rpcs: 0.into(),
            parked: 0.into(),
            deferred: 0.into(),
            circuit_deferred: 0.into(),
        }
    }
}

pub struct Reconciler {
    pub store: Arc<Store>,
    pub publisher: Publisher,
    pub topology: Topology,
    pub registry: Arc<ProducerRegistry>,
    pub policy: Policy,
    pub limits: Limits,
    pub counters: Arc<CheckCounters>,
    /// Consumer queue depths, when consumer → queue is configured.
    pub backlog: Option<Backlog>,
    /// Producers whose hook keeps failing are backed off as a whole.
    pub breakers: Breakers,
    /// One slow producer uses up only its own slots.
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Producers whose hook answered `ResendBatch` with `UNIMPLEMENTED`, and since when.
    batch_unimplemented: Mutex<HashMap<String, std::time::Instant>>,
    /// One permit per check being decided ([`Policy::max_checks_in_flight`]).
    checks_in_flight: Semaphore,
}

/// What to do with one check once it is decided.
#[derive(Debug)]
enum Plan {
    /// Nothing: settled, or a duplicate of an attempt already handled.
    Done,
    /// This check found the confirms its `expect` needs (they came first) and confirmed the message.
    Confirmed,
    /// Publish `next` after `delay`, then record `outcome` for `attempt`.
    Finish { attempt: u32, outcome: AttemptOutcome, next: Option<(Check, Duration)> },
    /// The attempt was claimed by a process that did not schedule the next
    /// check in time: publish it on its behalf.
    Takeover { next: Check, delay: Duration },
    /// Another process is working on the attempt: look again shortly.
    Watch { check: Check },
    /// The consumer has a backlog: look again later, without resending.
    Defer { check: Check, delay: Duration },
}

impl Reconciler {
    pub fn new(
        store: Arc<Store>,
        publisher: Publisher,
        topology: Topology,
        registry: Arc<ProducerRegistry>,
        mut policy: Policy,
        limits: Limits,
        breakers: Breakers,
    ) -> Self {
        // What a semaphore can count; the deliveries' permits are taken against the same bound.
        policy.max_checks_in_flight = policy.max_checks_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            checks_in_flight: Semaphore::new(policy.max_checks_in_flight),
            breakers,
            store,
            publisher,
            topology,
            registry,
            policy,
            limits,
            counters: Arc::default(),
            backlog: None,
            slots: Mutex::default(),
            batch_unimplemented: Mutex::default(),
        }
    }

    /// Consumes the checks queue until `shutdown`; every delivery in hand is
    /// finished (RPCs included) before it returns.
    pub async fn run(
        self: Arc<Self>,
        subscription: SubscriptionConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut checks = Subscription::new(self.publisher.clone(), subscription).await?;
        let in_flight = TaskTracker::new();
        while let Some(batch) = checks.next_batch(&shutdown).await? {
            for delivery in batch {
                let this = self.clone();
                let shutdown = shutdown.clone();
                in_flight.spawn(async move { this.settle(&delivery, &shutdown).await });
            }
        }
        in_flight.close();
        in_flight.wait().await;
        checks.close().await;
        Ok(())
    }

    /// One CHECK delivery to its end: handled, then acked; poison parked; a transient failure
    /// tried again in place ([`retry::until_settled`]); handed back only at shutdown.
    pub async fn settle(&self, delivery: &Delivery, shutdown: &CancellationToken) {
        let queue = self.topology.checks_queue();
        match retry::until_settled(&queue, shutdown, || self.handle_delivery(delivery)).await {
            Settled::Done(()) => {
                // Not acked, it comes back: every step it repeats is a no-op the second time.
                if let Err(e) = subscription::ack(delivery, false).await {
                    tracing::warn!(error = %e, "ack of a handled check failed; it will be redelivered");
                }
            }
            Settled::Poison(e) => {
                if park_and_ack(&self.publisher, &self.topology, &queue, delivery, &e).await {
                    self.counters.parked.fetch_add(1, Ordering::Relaxed);
                }
            }
            Settled::Stopped(e) => {
                tracing::info!(error = %e, "shutting down; check handed back for redelivery");
                let _ = subscription::nack(delivery).await;
            }
            Settled::Abandoned => {
                tracing::info!("shutting down mid-check; handed back for redelivery");
                let _ = subscription::nack(delivery).await;
            }
        }
    }

    /// One CHECK message: every check in it decided, the next checks published, the outcomes
    /// recorded; the caller acks. A malformed body is an error to park ([`HandleError::Decode`]).
    pub async fn handle_delivery(&self, delivery: &Delivery) -> Result<(), HandleError> {
        let content_type = delivery.properties.content_type().as_ref().map(|c| c.as_str());
        let batch = CheckBatch::decode(&delivery.data, content_type, self.limits)?;
        metrics::histogram!(telemetry::RECONCILE_BATCH_SIZE).record(batch.checks.len() as f64);
        if batch.release {
            // Reserved ids the producer never handed out: recorded `unused`, so their reserved
            // CHECKs, due later, find them settled and make no hook call.
            let released = self.store.release(&batch.producer, &batch.checks).await?;
            metrics::counter!(telemetry::CHECKS, "result" => "released").increment(released);
            tracing::debug!(producer = %batch.producer, released, "reservations released");
            return Ok(());
        }
        // The deliveries are bounded by the prefetch, their checks here; a delivery bigger than
        // the bound takes all of it and goes alone.
        let permits = batch.checks.len().min(self.policy.max_checks_in_flight);
        let permits = u32::try_from(permits).unwrap_or(u32::MAX);
        let _permits = self.checks_in_flight.acquire_many(permits).await?;
        let plans = self.plans(&batch).await?;

        // Next checks first (grouped per delay into one CHECK message), then the store.
        let mut next_by_delay: HashMap<Duration, Vec<Check>> = HashMap::new();
        // Checks republished with no attempt of their own to record: their due time, for the sweeper.
        let mut due_by_delay: HashMap<Duration, Vec<String>> = HashMap::new();
        for plan in &plans {
            let (check, delay) = match plan {
                Plan::Finish { next: Some((check, delay)), .. } => (check, *delay),
                Plan::Takeover { next, delay } => (next, *delay),
                Plan::Watch { check } => (check, self.shortest_tier()),
                Plan::Defer { check, delay } => (check, *delay),
                _ => continue,
            };
            let tier = self.topology.tier_for(delay);
            if matches!(plan, Plan::Watch { .. } | Plan::Defer { .. }) {
                due_by_delay.entry(tier).or_default().push(check.message_id.to_string());
            }
            next_by_delay.entry(tier).or_default().push(check.clone());
        }
        for (delay, checks) in next_by_delay {
            publish_checks(
                &self.publisher,
                &self.topology,
                &CheckBatch::new(batch.producer.clone(), checks),
                delay,
            )
            .await?;
        }
        for (delay, ids) in due_by_delay {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            self.store.reschedule(&ids, now_ms() + millis(delay)).await?;
        }
        for (check, plan) in batch.checks.iter().zip(&plans) {
            let id = check.message_id.to_string();
            match plan {
                Plan::Finish { attempt, outcome, .. } => {
                    self.store.finish(&id, *attempt, outcome).await?;
                    if let AttemptOutcome::Terminal { status: Status::Failed, reason } = outcome {
                        tracing::error!(message_id = %id, %reason, "message failed");
                    }
                }
                Plan::Takeover { next, delay } => {
                    self.store.mark_scheduled(&id, next.attempt, now_ms() + millis(*delay)).await?;
                }
                Plan::Done | Plan::Confirmed | Plan::Watch { .. } | Plan::Defer { .. } => {}
            }
        }
        for plan in &plans {
            metrics::counter!(telemetry::CHECKS, "result" => plan.result()).increment(1);
        }
        Ok(())
    }

    /// Every check of the batch decided, in order. The rows are read at once; those that lack
    /// their CHECK take it in one transaction, which also confirms the messages whose confirms
    /// came first; a check its row settles as it stands (confirmed, terminal, an attempt already
    /// taken) is decided here.
    async fn plans(&self, batch: &CheckBatch) -> Result<Vec<Plan>, HandleError> {
        let producer = &batch.producer;
        let ids: Vec<String> = batch.checks.iter().map(|c| c.message_id.to_string()).collect();
        let mut rows = self.store.get_many(&ids).await?;
        let first: Vec<&Check> = batch
            .checks
            .iter()
            .zip(&ids)
            .filter(|(_, id)| rows.get(*id).is_none_or(|row| !row.checked()))
            .map(|(check, _)| check)
            .collect();
        let mut confirmed_now = std::collections::HashSet::new();
        if !first.is_empty() {
            for (id, row) in self.store.record_first_checks(producer, &first).await? {
                let before = rows.get(&id).map(|r| r.status);
                if row.status == Status::Confirmed && before != Some(Status::Confirmed) {
                    confirmed_now.insert(id.clone());
                }
                rows.insert(id, row);
            }
        }
        let mut plans: Vec<Option<Plan>> = Vec::with_capacity(batch.checks.len());
        let mut open = Vec::new();
        for (check, id) in batch.checks.iter().zip(&ids) {
            self.counters.checks.fetch_add(1, Ordering::Relaxed);
            let row = rows.remove(id);
            let plan = if confirmed_now.contains(id) {
                Some(Plan::Confirmed)
            } else {
                row.as_ref().and_then(|row| self.settled(row, check))
            };
            if plan.is_none() {
                open.push((plans.len(), check, row));
            }
            plans.push(plan);
        }
        let steps = futures_util::future::try_join_all(open.into_iter().map(|(i, check, row)| {
            let span = span(producer, check);
            let prepare = self.prepare(producer, check, row, span.clone()).instrument(span);
            async move { Ok::<_, HandleError>((i, prepare.await?)) }
        }))
        .await?;
        // What is left needs the hook: the delivery's calls go together (one `ResendBatch`).
        let mut calls = Vec::new();
        for (i, step) in steps {
            match step {
                Step::Decided(plan) => plans[i] = Some(plan),
                Step::Call(call) => calls.push((i, call)),
            }
        }
        for (i, plan) in self.resend_all(producer, calls).await? {
            plans[i] = Some(plan);
        }
        Ok(plans.into_iter().map(|p| p.expect("every check decided")).collect())
    }

    /// The plan of a check whose row needs no write and no RPC, as [`Reconciler::decide`] would
    /// find it; `None` when the check needs more.
    fn settled(&self, row: &MessageRow, check: &Check) -> Option<Plan> {
        if !row.recorded_for(check) {
            return None;
        }
        if row.status.is_terminal() {
            return Some(Plan::Done);
        }
        (row.attempt > check.attempt).then(|| self.duplicate(row, check))
    }
}

impl Plan {
    /// The `result` label of `recheck_checks_total`.
    fn result(&self) -> &'static str {
        match self {
            Plan::Done => "done",
            Plan::Confirmed => "confirmed",
            Plan::Finish { outcome: AttemptOutcome::Resent { .. }, .. } => "resent",
            Plan::Finish { outcome: AttemptOutcome::Retry { .. }, .. } => "retry",
            Plan::Finish { outcome: AttemptOutcome::Terminal { status, .. }, .. } => status.as_str(),
            Plan::Takeover { .. } => "takeover",
            Plan::Watch { .. } => "watch",
            Plan::Defer { .. } => "deferred",
        }
    }
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
