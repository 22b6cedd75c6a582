//! The hook calls of one CHECK delivery. Its open checks go to their producer together: one
//! `ResendBatch` per [`MAX_BATCH_IDS`] checks when the producer serves it, one `Resend` per
//! check otherwise (`--resend-batch=false`, or a hook that answered `UNIMPLEMENTED`: remembered
//! per producer and asked again after [`REPROBE_AFTER`]). Either way every check first claims its
//! attempt (the conditional update), so no (message, attempt) reaches the hook twice; every call
//! holds one of the producer's RPC slots and passes its circuit breaker, and counts once in it.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use futures_util::future::try_join_all;
use recheck::{
    message::{Check, now_ms},
    telemetry,
};
use recheck_proto::v1::{ResendBatchEntry, ResendOutcome, ResendRequest, ResendResponse};
use tokio::sync::Semaphore;
use tonic::{Code, Status};
use tracing::Instrument;

use super::{
    Plan, Reconciler,
    decide::{Call, failed, or_default},
    millis,
};
use crate::{
    breaker::Gate,
    failure::HandleError,
    registry::ProducerClient,
    store::{AttemptOutcome, Status as RowStatus},
};

/// Most ids in one `ResendBatch`: a bound on one call's work at the hook within `--rpc-timeout`
/// (the SDK's hook takes up to 5 000).
pub(super) const MAX_BATCH_IDS: usize = 1000;

/// How long a producer whose hook answered `ResendBatch` with `UNIMPLEMENTED` is called per id
/// before a batch is tried again (it may have been upgraded).
pub(super) const REPROBE_AFTER: Duration = Duration::from_secs(600);

/// A claimed check: attempt `check.attempt + 1` is ours, `resends` done before it.
struct Claimed<'a> {
    index: usize,
    call: Call<'a>,
    resends: u32,
}

impl Reconciler {
    /// Sends the delivery's `calls` (all of `producer`) and decides each from its answer; the
    /// plans keep the index each call came with.
    pub(super) async fn resend_all(
        &self,
        producer: &str,
        calls: Vec<(usize, Call<'_>)>,
    ) -> Result<Vec<(usize, Plan)>, HandleError> {
        let Some(client) = self.registry.client(producer) else {
            // `prepare` already answered these; kept total so a registry change cannot panic.
            let plans = calls.into_iter().map(|(i, call)| {
                let reason = format!("unknown producer {producer:?}");
                (i, Plan::Finish { attempt: call.check.attempt, outcome: failed(reason), next: None })
            });
            return Ok(plans.collect());
        };
        let mut groups: Vec<Vec<(usize, Call)>> = Vec::new();
        if calls.len() > 1 && self.batching(producer) {
            let mut calls = calls.into_iter().peekable();
            while calls.peek().is_some() {
                groups.push(calls.by_ref().take(MAX_BATCH_IDS).collect());
            }
        } else {
            groups.extend(calls.into_iter().map(|call| vec![call]));
        }
        let client = &client;
        let plans = try_join_all(groups.into_iter().map(|group| self.resend_group(producer, client, group)));
        Ok(plans.await?.into_iter().flatten().collect())
    }

    /// One RPC's worth of checks: slot, gate, claims, the call, the plans.
    async fn resend_group(
        &self,
        producer: &str,
        client: &ProducerClient,
        group: Vec<(usize, Call<'_>)>,
    ) -> Result<Vec<(usize, Plan)>, HandleError> {
        // The slot before the gate: checks that waited for a slot while the circuit opened (a
        // hook that accepts and never answers times out one call per slot) defer instead of
        // adding their own timeout, so an open circuit stops the checks already in flight too.
        let slot = self.slot(producer).acquire_owned().await?;
        let mut group = group;
        let mut plans = Vec::with_capacity(group.len());
        match self.breakers.gate(producer) {
            Gate::Open { retry_in, failing_since } => {
                let open = group.into_iter();
                let open = open.map(|(i, call)| (i, self.circuit_open(call.check, retry_in, failing_since)));
                return Ok(open.collect());
            }
            // A half-open circuit's probe is one check: a hook still down then costs one id an
            // attempt (and a longer backoff), not a whole batch; the others wait one round.
            Gate::Pass { probe: true } if group.len() > 1 => {
                for (i, call) in group.drain(1..) {
                    plans.push((i, self.circuit_deferred(call.check, self.shortest_tier())));
                }
            }
            Gate::Pass { .. } => {}
        }
        let claims = try_join_all(group.into_iter().map(|(index, call)| async move {
            let claim = self.store.claim(&call.row.message_id, call.check.attempt);
            Ok::<_, HandleError>((index, claim.instrument(call.span.clone()).await?, call))
        }))
        .await?;
        let mut claimed = Vec::with_capacity(claims.len());
        for (index, resends, call) in claims {
            match resends {
                Some(resends) => claimed.push(Claimed { index, call, resends }),
                // Another check, instance or redelivery took the attempt first.
                None => plans.push((index, Plan::Done)),
            }
        }
        let answers = match claimed.len() {
            0 => Vec::new(),
            1 => vec![self.call_one(producer, client, &claimed[0]).await],
            _ => self.call_batch(producer, client, &claimed, slot).await?,
        };
        for (claimed, answer) in claimed.iter().zip(answers) {
            plans.push((claimed.index, self.answered(&claimed.call, answer)));
        }
        Ok(plans)
    }

    /// One `Resend`, in the check's span (its trace context goes out as gRPC metadata).
    async fn call_one(
        &self,
        producer: &str,
        client: &ProducerClient,
        claimed: &Claimed<'_>,
    ) -> Result<ResendResponse, Status> {
        let Claimed { call, resends, .. } = claimed;
        // The hook's `attempt` is the resend number (1 = first resend): resends done so far, as
        // the claim read them, plus one. A RETRY_LATER or a failed call does not count, so the
        // next call repeats that number; the check's own attempt counts every re-check.
        let request = ResendRequest {
            message_id: call.row.message_id.clone(),
            producer: producer.to_owned(),
            routing_key: call.check.routing_key.clone(),
            business_key: call.check.business_key.clone(),
            attempt: resends.saturating_add(1),
            published_at: call.check.published_at,
        };
        self.counters.rpcs.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let answer = client.resend(request, self.policy.rpc_timeout).instrument(call.span.clone()).await;
        record_rpc(producer, started.elapsed());
        record_answer(producer, &answer);
        match &answer {
            Ok(_) => self.breakers.success(producer),
            Err(_) => self.breakers.failure(producer),
        }
        answer
    }

    /// One `ResendBatch` for every claimed check (the answers in their order); `UNIMPLEMENTED`
    /// falls back to one `Resend` each, each in a slot of its own.
    async fn call_batch(
        &self,
        producer: &str,
        client: &ProducerClient,
        claimed: &[Claimed<'_>],
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Vec<Result<ResendResponse, Status>>, HandleError> {
        let entries = claimed
            .iter()
            .map(|Claimed { call, resends, .. }| ResendBatchEntry {
                message_id: call.row.message_id.clone(),
                producer: producer.to_owned(),
                routing_key: call.check.routing_key.clone(),
                business_key: call.check.business_key.clone(),
                attempt: resends.saturating_add(1),
                published_at: call.check.published_at,
                // One trace per id: the metadata of one call could carry only one.
                traceparent: call.span.in_scope(recheck::trace::current_traceparent).unwrap_or_default(),
            })
            .collect();
        self.counters.rpcs.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let answer = client.resend_batch(entries, self.policy.rpc_timeout).await;
        record_rpc(producer, started.elapsed());
        let results = match answer {
            Ok(response) => {
                self.breakers.success(producer);
                self.batch_served(producer);
                let mut by_id: HashMap<String, ResendResponse> = response
                    .results
                    .into_iter()
                    .map(|r| (r.message_id, ResendResponse { outcome: r.outcome, reason: r.reason }))
                    .collect();
                let missing = || ResendResponse {
                    outcome: ResendOutcome::Unspecified.into(),
                    reason: "no result for this id in the ResendBatch answer".into(),
                };
                claimed
                    .iter()
                    .map(|c| Ok(by_id.remove(&c.call.row.message_id).unwrap_or_else(missing)))
                    .collect()
            }
            Err(status) if status.code() == Code::Unimplemented => {
                // Nothing was resent: each claimed attempt still gets its one call, per id.
                self.batch_unimplemented(producer, &status);
                drop(slot);
                let singles = claimed.iter().map(|c| async move {
                    let _slot = self.slot(producer).acquire_owned().await?;
                    // The circuit may have opened while this id waited for a slot (a hook that
                    // hangs): claimed already, it is answered as a failed call without one, and
                    // checked again after the backoff (not a resend, no breaker count).
                    if let Gate::Open { .. } = self.breakers.gate(producer) {
                        return Ok(Err(Status::unavailable("the producer's circuit is open; not called")));
                    }
                    Ok::<_, HandleError>(self.call_one(producer, client, c).await)
                });
                return try_join_all(singles).await;
            }
            Err(status) => {
                self.breakers.failure(producer);
                claimed.iter().map(|_| Err(status.clone())).collect::<Vec<_>>()
            }
        };
        for answer in &results {
            record_answer(producer, answer);
        }
        Ok(results)
    }

    /// What a claimed check's answer becomes, decided in its span.
    fn answered(&self, call: &Call<'_>, answer: Result<ResendResponse, Status>) -> Plan {
        let _span = call.span.enter();
        let (check, row) = (call.check, &call.row);
        let attempt = check.attempt + 1;
        let next = Check { attempt, ..check.clone() };
        let delay = self.backoff(attempt);
        let next_check_at = now_ms() + millis(delay);
        let reason = match answer {
            Ok(r) if r.outcome() == ResendOutcome::Resent => {
                tracing::info!(message_id = %row.message_id, attempt, "resent");
                return Plan::Finish {
                    attempt,
                    outcome: AttemptOutcome::Resent { next_check_at },
                    next: Some((next, delay)),
                };
            }
            Ok(r) if r.outcome() == ResendOutcome::NotFound => {
                // A reserved id the hook does not know was never used: not a failure.
                let status = if check.reserved { RowStatus::Unused } else { RowStatus::Void };
                let outcome = AttemptOutcome::Terminal { status, reason: or_default(r.reason, "not found") };
                return Plan::Finish { attempt, outcome, next: None };
            }
            Ok(r) => format!("{}: {}", r.outcome().as_str_name(), r.reason),
            Err(status) => format!("rpc {:?}: {}", status.code(), status.message()),
        };
        let failing_since = row.first_failure_at.unwrap_or_else(now_ms);
        if now_ms() - failing_since >= millis(self.policy.unreachable_deadline) {
            return Plan::Finish {
                attempt,
                outcome: failed(format!("producer unreachable: {reason}")),
                next: None,
            };
        }
        tracing::warn!(message_id = %row.message_id, attempt, %reason, "resend not done; re-checking later");
        Plan::Finish {
            attempt,
            outcome: AttemptOutcome::Retry { reason, next_check_at },
            next: Some((next, delay)),
        }
    }

    /// A check whose producer's circuit is open: deferred without a claim (the attempt and the
    /// resend budget stay untouched while the producer is down), or failed past the deadline.
    fn circuit_open(&self, check: &Check, retry_in: Duration, failing_since: i64) -> Plan {
        if now_ms() - failing_since >= millis(self.policy.unreachable_deadline) {
            let reason = format!("producer unreachable: circuit open since {failing_since} (ms)");
            return Plan::Finish { attempt: check.attempt, outcome: failed(reason), next: None };
        }
        self.circuit_deferred(check, retry_in.max(self.shortest_tier()))
    }

    fn circuit_deferred(&self, check: &Check, delay: Duration) -> Plan {
        self.counters.circuit_deferred.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::CHECKS_DEFERRED, "reason" => "circuit").increment(1);
        Plan::Defer { check: check.clone(), delay }
    }

    /// Whether `producer`'s checks go out as `ResendBatch` now.
    fn batching(&self, producer: &str) -> bool {
        if !self.policy.resend_batch {
            return false;
        }
        let unimplemented = self.batch_unimplemented.lock().expect("batch lock");
        unimplemented.get(producer).is_none_or(|since| since.elapsed() >= REPROBE_AFTER)
    }

    fn batch_unimplemented(&self, producer: &str, status: &Status) {
        let mut unimplemented = self.batch_unimplemented.lock().expect("batch lock");
        if unimplemented.insert(producer.to_owned(), Instant::now()).is_none() {
            tracing::info!(
                %producer,
                message = status.message(),
                "the producer's hook does not serve ResendBatch; calling Resend per id, asking again in {REPROBE_AFTER:?}"
            );
        }
    }

    fn batch_served(&self, producer: &str) {
        let mut unimplemented = self.batch_unimplemented.lock().expect("batch lock");
        if unimplemented.remove(producer).is_some() {
            tracing::info!(%producer, "the producer's hook serves ResendBatch now");
        }
    }

    pub(super) fn slot(&self, producer: &str) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().expect("slots lock");
        slots
            .entry(producer.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.policy.max_rpcs_per_producer)))
            .clone()
    }
}

/// `recheck_hook_rpc_seconds` for one RPC (`Resend` or `ResendBatch`).
fn record_rpc(producer: &str, took: Duration) {
    metrics::histogram!(telemetry::HOOK_RPC_SECONDS, "producer" => producer.to_owned())
        .record(took.as_secs_f64());
}

/// `recheck_resends_total` for one id's answer.
fn record_answer(producer: &str, answer: &Result<ResendResponse, Status>) {
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
    metrics::counter!(telemetry::RESENDS, "producer" => producer.to_owned(), "outcome" => outcome)
        .increment(1);
}
