//! Check processing: for each due check, decide from the store (DESIGN.md
//! state machine), call the producer's `ResendHook` if nobody confirmed,
//! publish the next CHECK (broker-confirmed), record the outcome, then ack.
//!
//! Each check runs: record → claim attempt `n` (conditional update) → RPC with
//! attempt `n + 1` → publish next CHECK → finish (conditional on `n + 1`) → ack.
//! A crash anywhere leaves a redelivered check that either finds its attempt
//! taken and scheduled (nothing to do), or taken and never scheduled: after a
//! lease it publishes the missing next CHECK itself.

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
    message::{Check, CheckBatch, Limits, now_ms},
    parking::park_and_ack,
    producer::publish_checks,
    retry::{self, Settled},
    subscription, telemetry,
};
use recheck_proto::v1::{ResendOutcome, ResendRequest, ResendResponse};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    backlog::Backlog,
    breaker::{Breakers, Gate},
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
        }
    }

    /// One CHECK message: every check in it decided, the next checks published, the outcomes
    /// recorded; the caller acks. A malformed body is an error to park ([`HandleError::Decode`]).
    pub async fn handle_delivery(&self, delivery: &Delivery) -> Result<(), HandleError> {
        let content_type = delivery.properties.content_type().as_ref().map(|c| c.as_str());
        let batch = CheckBatch::decode(&delivery.data, content_type, self.limits)?;
        metrics::histogram!(telemetry::RECONCILE_BATCH_SIZE).record(batch.checks.len() as f64);
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
        let decided = futures_util::future::try_join_all(open.into_iter().map(|(i, check, row)| {
            let decide = self.decide(producer, check, row).instrument(span(producer, check));
            async move { Ok::<_, HandleError>((i, decide.await?)) }
        }))
        .await?;
        for (i, plan) in decided {
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

    /// Decides one check from its row as read (`None`: no row yet); makes the RPC if the message
    /// is unconfirmed and this process won the attempt. Runs in the check's `reconcile` span
    /// ([`span`]).
    async fn decide(
        &self,
        producer: &str,
        check: &Check,
        row: Option<MessageRow>,
    ) -> Result<Plan, HandleError> {
        let row = self.store.record_check_read(producer, check, row).await?;
        if row.status.is_terminal() {
            return Ok(Plan::Done);
        }
        let n = check.attempt;
        if row.attempt > n {
            return Ok(self.duplicate(&row, check));
        }
        let Some(client) = self.registry.client(producer) else {
            let reason = format!("unknown producer {producer:?}");
            return Ok(Plan::Finish { attempt: n, outcome: failed(reason), next: None });
        };
        if row.resend_count >= self.policy.max_resends {
            let reason = format!("no confirm after {} resends (max_resends)", row.resend_count);
            return Ok(Plan::Finish { attempt: n, outcome: failed(reason), next: None });
        }
        if let Some(plan) = self.defer(check).await {
            return Ok(plan);
        }
        // The slot before the gate: a check that waited for a slot while the circuit opened
        // (a hook that accepts and never answers times out one call per slot) defers instead of
        // adding its own timeout, so an open circuit stops the checks already in flight too.
        let slot = self.slot(producer).acquire_owned().await?;
        if let Gate::Open { retry_in, failing_since } = self.breakers.gate(producer) {
            if now_ms() - failing_since >= millis(self.policy.unreachable_deadline) {
                let reason = format!("producer unreachable: circuit open since {failing_since} (ms)");
                return Ok(Plan::Finish { attempt: n, outcome: failed(reason), next: None });
            }
            self.counters.circuit_deferred.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(telemetry::CHECKS_DEFERRED, "reason" => "circuit").increment(1);
            // No claim: the attempt and the resend budget stay untouched while the producer is down.
            return Ok(Plan::Defer { check: check.clone(), delay: retry_in.max(self.shortest_tier()) });
        }
        let Some(resends) = self.store.claim(&row.message_id, n).await? else {
            return Ok(Plan::Done);
        };

        let attempt = n + 1;
        // The hook's `attempt` is the resend number (1 = first resend): resends done so far, as
        // the claim read them, plus one. A RETRY_LATER or a failed call does not count, so the
        // next call repeats that number; the check's own attempt counts every re-check.
        let request = ResendRequest {
            message_id: row.message_id.clone(),
            producer: producer.to_owned(),
            routing_key: check.routing_key.clone(),
            business_key: check.business_key.clone(),
            attempt: resends.saturating_add(1),
            published_at: check.published_at,
        };
        self.counters.rpcs.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let answer = client.resend(request, self.policy.rpc_timeout).await;
        drop(slot);
        record_rpc(producer, started.elapsed(), &answer);
        match &answer {
            Ok(_) => self.breakers.success(producer),
            Err(_) => self.breakers.failure(producer),
        }
        let next = Check { attempt, ..check.clone() };
        let delay = self.backoff(attempt);
        let next_check_at = now_ms() + millis(delay);
        let reason = match answer {
            Ok(r) if r.outcome() == ResendOutcome::Resent => {
                tracing::info!(message_id = %row.message_id, attempt, "resent");
                return Ok(Plan::Finish {
                    attempt,
                    outcome: AttemptOutcome::Resent { next_check_at },
                    next: Some((next, delay)),
                });
            }
            Ok(r) if r.outcome() == ResendOutcome::NotFound => {
                let outcome = AttemptOutcome::Terminal {
                    status: Status::Void,
                    reason: or_default(r.reason, "not found"),
                };
                return Ok(Plan::Finish { attempt, outcome, next: None });
            }
            Ok(r) => format!("{}: {}", r.outcome().as_str_name(), r.reason),
            Err(status) => format!("rpc {:?}: {}", status.code(), status.message()),
        };
        let failing_since = row.first_failure_at.unwrap_or_else(now_ms);
        if now_ms() - failing_since >= millis(self.policy.unreachable_deadline) {
            return Ok(Plan::Finish {
                attempt,
                outcome: failed(format!("producer unreachable: {reason}")),
                next: None,
            });
        }
        tracing::warn!(message_id = %row.message_id, attempt, %reason, "resend not done; re-checking later");
        Ok(Plan::Finish {
            attempt,
            outcome: AttemptOutcome::Retry { reason, next_check_at },
            next: Some((next, delay)),
        })
    }

    /// Defers a check whose consumer is behind, for at most `max_deferral`
    /// after the message was prepared.
    async fn defer(&self, check: &Check) -> Option<Plan> {
        let backlog = self.backlog.as_ref()?;
        if now_ms() - check.published_at >= millis(self.policy.max_deferral) {
            return None;
        }
        let (queue, depth) = backlog.behind(check.expect.as_deref()).await?;
        self.counters.deferred.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::CHECKS_DEFERRED, "reason" => "backlog").increment(1);
        tracing::debug!(message_id = %check.message_id, %queue, depth, "consumer behind; check deferred");
        // Back off with the message's age (no state to keep): a long backlog is
        // looked at less and less often, within the deferral bound.
        let age = Duration::from_millis(u64::try_from(now_ms() - check.published_at).unwrap_or(0));
        let delay = self.topology.tier_for(age).max(self.backoff(check.attempt + 1));
        Some(Plan::Defer { check: check.clone(), delay })
    }

    /// A check for an attempt the row has moved past.
    fn duplicate(&self, row: &MessageRow, check: &Check) -> Plan {
        if row.scheduled_attempt >= row.attempt {
            return Plan::Done;
        }
        // Claimed but its next check never published: whoever claimed it has
        // had the RPC deadline and then some.
        let lease = millis(self.policy.rpc_timeout) * 2 + 5_000;
        if now_ms() - row.updated_at > lease {
            let next = Check { attempt: row.attempt, ..check.clone() };
            return Plan::Takeover { next, delay: self.backoff(row.attempt) };
        }
        Plan::Watch { check: check.clone() }
    }

    /// Backoff over the configured tiers: the a-th re-check waits tier a-1 (capped).
    fn backoff(&self, attempt: u32) -> Duration {
        let tiers = &self.topology.tiers;
        let i = (attempt.saturating_sub(1) as usize).min(tiers.len().saturating_sub(1));
        tiers.get(i).copied().unwrap_or(Duration::from_secs(30))
    }

    fn shortest_tier(&self) -> Duration {
        self.topology.tiers.first().copied().unwrap_or(Duration::from_secs(5))
    }

    fn slot(&self, producer: &str) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().expect("slots lock");
        slots
            .entry(producer.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.policy.max_rpcs_per_producer)))
            .clone()
    }
}

/// The span of one check: it continues the trace of the producer's `prepare` (the check's
/// `traceparent`), and the `Resend` RPC made in it carries it on to the producer's hook.
fn span(producer: &str, check: &Check) -> tracing::Span {
    let span = tracing::info_span!(
        "reconcile",
        %producer,
        message_id = %check.message_id,
        attempt = check.attempt
    );
    recheck::trace::set_parent_from_traceparent(&span, check.traceparent.as_deref());
    span
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

/// `recheck_hook_rpc_seconds` and `recheck_resends_total` for one `Resend` RPC.
fn record_rpc(producer: &str, took: Duration, answer: &Result<ResendResponse, tonic::Status>) {
    let outcome = match answer {
        Ok(r) => match r.outcome() {
            ResendOutcome::Resent => "resent",
            ResendOutcome::NotFound => "not_found",
            ResendOutcome::RetryLater => "retry_later",
            ResendOutcome::Unspecified => "unspecified",
        }
        .to_owned(),
        Err(status) => telemetry::code_label(status.code()),
    };
    metrics::histogram!(telemetry::HOOK_RPC_SECONDS, "producer" => producer.to_owned())
        .record(took.as_secs_f64());
    metrics::counter!(telemetry::RESENDS, "producer" => producer.to_owned(), "outcome" => outcome)
        .increment(1);
}

fn failed(reason: String) -> AttemptOutcome {
    AttemptOutcome::Terminal { status: Status::Failed, reason }
}

fn or_default(reason: String, default: &str) -> String {
    if reason.is_empty() { default.to_owned() } else { reason }
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
