//! Deciding one open check: the state machine's branches (unknown producer, resend cap,
//! deferral, circuit, claim), the `Resend` RPC, and what its answer becomes.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use recheck::{
    message::{Check, now_ms},
    telemetry,
};
use recheck_proto::v1::{ResendOutcome, ResendRequest, ResendResponse};
use tokio::sync::Semaphore;

use super::{Plan, Reconciler, millis};
use crate::{
    breaker::Gate,
    failure::HandleError,
    store::{AttemptOutcome, MessageRow, Status},
};

impl Reconciler {
    /// Decides one check from its row as read (`None`: no row yet); makes the RPC if the message
    /// is unconfirmed and this process won the attempt. Runs in the check's `reconcile` span
    /// ([`span`]).
    pub(super) async fn decide(
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
    pub(super) async fn defer(&self, check: &Check) -> Option<Plan> {
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
    pub(super) fn duplicate(&self, row: &MessageRow, check: &Check) -> Plan {
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
    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let tiers = &self.topology.tiers;
        let i = (attempt.saturating_sub(1) as usize).min(tiers.len().saturating_sub(1));
        tiers.get(i).copied().unwrap_or(Duration::from_secs(30))
    }

    pub(super) fn shortest_tier(&self) -> Duration {
        self.topology.tiers.first().copied().unwrap_or(Duration::from_secs(5))
    }

    pub(super) fn slot(&self, producer: &str) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().expect("slots lock");
        slots
            .entry(producer.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.policy.max_rpcs_per_producer)))
            .clone()
    }
}

/// The span of one check: it continues the trace of the producer's `prepare` (the check's
/// `traceparent`), and the `Resend` RPC made in it carries it on to the producer's hook.
pub(super) fn span(producer: &str, check: &Check) -> tracing::Span {
    let span = tracing::info_span!(
        "reconcile",
        %producer,
        message_id = %check.message_id,
        attempt = check.attempt
    );
    recheck::trace::set_parent_from_traceparent(&span, check.traceparent.as_deref());
    span
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
