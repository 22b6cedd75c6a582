//! Deciding one open check up to its RPC: the state machine's branches (terminal, a taken
//! attempt, unknown producer, resend cap, deferral). What is left needs the hook: a [`Call`],
//! which `resend.rs` gates, claims and sends with the delivery's other calls.

use std::{sync::atomic::Ordering, time::Duration};

use recheck::{
    message::{Check, now_ms},
    telemetry,
};

use super::{Plan, Reconciler, millis};
use crate::{
    failure::HandleError,
    store::{AttemptOutcome, MessageRow, Status},
};

/// One check that needs the hook: its attempt is still to claim.
pub(super) struct Call<'a> {
    pub check: &'a Check,
    pub row: MessageRow,
    /// The check's `reconcile` span ([`span`]): its claim, RPC and answer run in it.
    pub span: tracing::Span,
}

/// Where [`Reconciler::prepare`] leaves a check.
pub(super) enum Step<'a> {
    Decided(Plan),
    Call(Call<'a>),
}

impl Reconciler {
    /// Decides one check from its row as read (`None`: no row yet), short of the RPC: a
    /// [`Step::Call`] if the message is unconfirmed and its attempt still open. Runs in the
    /// check's `reconcile` span, `span`.
    pub(super) async fn prepare<'a>(
        &self,
        producer: &str,
        check: &'a Check,
        row: Option<MessageRow>,
        span: tracing::Span,
    ) -> Result<Step<'a>, HandleError> {
        let row = self.store.record_check_read(producer, check, row).await?;
        if row.status.is_terminal() {
            return Ok(Step::Decided(Plan::Done));
        }
        let n = check.attempt;
        // Also while the attempt before is claimed but its outcome not yet recorded: this may be
        // the next CHECK its claimer published first, arriving before the claimer's `finish`
        // (a batch records hundreds of outcomes after one RPC). Claiming now would read the old
        // resend count and send the hook the same resend number twice.
        if row.attempt > n || row.scheduled_attempt < row.attempt {
            return Ok(Step::Decided(self.duplicate(&row, check)));
        }
        if self.registry.client(producer).is_none() {
            let reason = format!("unknown producer {producer:?}");
            return Ok(Step::Decided(Plan::Finish { attempt: n, outcome: failed(reason), next: None }));
        }
        if row.resend_count >= self.policy.max_resends {
            let reason = format!("no confirm after {} resends (max_resends)", row.resend_count);
            return Ok(Step::Decided(Plan::Finish { attempt: n, outcome: failed(reason), next: None }));
        }
        if let Some(plan) = self.defer(check).await {
            return Ok(Step::Decided(plan));
        }
        Ok(Step::Call(Call { check, row, span }))
    }

    /// Defers a check whose consumer is behind, for at most `max_deferral` after the message was
    /// prepared or after its queue was last seen stalled (no consumer, or growing): see
    /// `backlog.rs`.
    pub(super) async fn defer(&self, check: &Check) -> Option<Plan> {
        let backlog = self.backlog.as_ref()?;
        let age = Duration::from_millis(u64::try_from(now_ms() - check.published_at).unwrap_or(0));
        let behind = backlog.behind(check.expect.as_deref(), age, self.policy.max_deferral).await?;
        let (queue, depth) = (behind.queue, behind.depth);
        self.counters.deferred.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::CHECKS_DEFERRED, "reason" => "backlog").increment(1);
        tracing::debug!(message_id = %check.message_id, %queue, depth, "consumer behind; check deferred");
        // Back off with the message's age (no state to keep): a long backlog is
        // looked at less and less often, within the deferral bound.
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
}

/// The span of one check: it continues the trace of the producer's `prepare` (the check's
/// `traceparent`), and the hook call made for it
/// carries it on to the producer's hook (gRPC metadata, or its `ResendBatch` entry's `traceparent`).
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

pub(super) fn failed(reason: String) -> AttemptOutcome {
    AttemptOutcome::Terminal { status: Status::Failed, reason }
}

pub(super) fn or_default(reason: String, default: &str) -> String {
    if reason.is_empty() { default.to_owned() } else { reason }
}
