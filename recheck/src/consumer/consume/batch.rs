//! One micro-batch in one transaction. The happy path is set-based: one inbox claim statement,
//! one read of earlier outcomes (none when there are no duplicates), one
//! [`Effect::apply_batch`], commit. When the effect fails, the transaction is rolled back and
//! the batch redone message by message, each in a savepoint, so a failure costs only its own
//! message: a transient one is held for a retry in place (`held`), a poison one parked.

use std::collections::HashMap;

use lapin::message::Delivery;
use sqlx::{Acquire, Any, AnyConnection, Transaction};
use tracing::{Instrument, Span};
use uuid::Uuid;

use super::{
    Applied, BatchReport, ConsumerLoop, Effect, Incoming, Transient, held::Held, message_span,
    per_message_spans,
};
use crate::{
    broker::{parking::park_and_ack, subscription},
    consumer::inbox::Prior,
    error::Result,
    retry::{self, Classify, Disposition, Settled},
    telemetry,
    wire::message::{BusinessHeaders, Confirm, DecodeError, Outcome, now_ms},
};

/// A delivery and the Recheck headers read from it.
type Pending = (Delivery, BusinessHeaders);

/// What one try of the batch leaves: the deliveries still to confirm and ack, what the
/// committed transaction did, and the messages whose effect failed (out of `pending`).
#[derive(Default)]
struct Tries {
    pending: Vec<Pending>,
    committed: BatchReport,
    poison: Vec<(Delivery, String)>,
    held: Vec<Held>,
}

impl<E: Effect> ConsumerLoop<E> {
    /// The batch's transaction, CONFIRM and acks; the deliveries whose effect failed
    /// transiently are returned unacked, to be retried in place (`settle_held`).
    #[tracing::instrument(skip_all, fields(consumer = %self.config.consumer, n = deliveries.len()))]
    pub(super) async fn batch(
        &self,
        deliveries: Vec<Delivery>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(BatchReport, Vec<Held>)> {
        let mut report = BatchReport::default();
        metrics::histogram!(telemetry::CONSUMER_BATCH_SIZE, "consumer" => self.config.consumer.clone())
            .record(deliveries.len() as f64);
        let mut pending = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            match self.validate(&d) {
                Ok(h) if self.drop_message.as_ref().is_some_and(|drop| drop(&h)) => {
                    if let Err(e) = subscription::ack(&d, false).await {
                        tracing::warn!(error = %e, "acking a dropped message failed; it comes back");
                    }
                }
                Ok(h) => pending.push((d, h)),
                Err(e) => {
                    if park_and_ack(&self.publisher, &self.topology, &self.config.queue, &d, &e).await {
                        report.parked += 1;
                    }
                }
            }
        }
        // Each try takes the batch (and counts afresh: only the try that succeeds is reported).
        let tries = tokio::sync::Mutex::new(Tries { pending, ..Tries::default() });
        let settled = retry::until_settled(&self.config.queue, shutdown, || async {
            let mut guard = tries.lock().await;
            let t = &mut *guard;
            t.committed = BatchReport::default();
            let mut confirms = self.commit(t).await?;
            // Committed: the effects are durable whatever becomes of the CONFIRM (a retry finds
            // them claimed and confirms them as duplicates).
            if let Some(drop) = &self.drop_confirm {
                confirms.retain(|c| !drop(c));
            }
            self.confirmer.confirm_all(confirms).await
        })
        .await;
        let Tries { pending, committed, poison, held } = tries.into_inner();
        let e = match settled {
            Settled::Done(()) => {
                report += committed;
                report.retried += held.len();
                report.record(&self.config.consumer);
                // Before the ack: parked and acked one by one, never settled unparked by it.
                for (d, reason) in &poison {
                    if park_and_ack(&self.publisher, &self.topology, &self.config.queue, d, reason).await {
                        report.parked += 1;
                    }
                }
                self.held.fetch_add(held.len(), std::sync::atomic::Ordering::SeqCst);
                if let Err(e) = self.ack(&pending).await {
                    // The channel is gone: the broker redelivers, the inbox confirms duplicates.
                    tracing::warn!(error = %e, "acking the batch failed");
                }
                return Ok((report, held));
            }
            Settled::Poison(e) | Settled::Stopped(e) => e,
            Settled::Abandoned => crate::error::Error::Timeout(retry::IN_FLIGHT_GRACE),
        };
        // Collected first: an iterator of closures held across the await would not be `Send`.
        let unsettled: Vec<&Delivery> = (pending.iter().map(|(d, _)| d))
            .chain(poison.iter().map(|(d, _)| d))
            .chain(held.iter().map(|h| &h.delivery))
            .collect();
        subscription::nack_all(&unsettled).await;
        Err(e)
    }

    /// What the SDK can tell is wrong with a delivery before the effect sees it.
    fn validate(&self, d: &Delivery) -> Result<BusinessHeaders, DecodeError> {
        let headers = BusinessHeaders::from_properties(&d.properties)?;
        match self.config.max_body_bytes {
            Some(max) if d.data.len() > max => Err(DecodeError::TooLarge(d.data.len(), max)),
            _ => Ok(headers),
        }
    }

    /// One transaction for the batch: the set-based path, or, when the effect failed, a rollback
    /// and the redo message by message. The failed messages leave `pending` only once the
    /// transaction committed: a retry of the whole try must see them again.
    async fn commit(&self, t: &mut Tries) -> Result<Vec<Confirm>> {
        let spans = per_message_spans();
        let mut tx = self.pool.begin().await?;
        let mut done = BatchReport::default();
        let (confirms, failed) = match self.apply_all(&mut tx, &t.pending, spans, &mut done).await? {
            Ok(confirms) => (confirms, Vec::new()),
            Err(e) => {
                tracing::debug!(error = %e, "the batch's effect failed; redoing it message by message");
                tx.rollback().await?;
                tx = self.pool.begin().await?;
                done = BatchReport::default();
                self.apply_each(&mut tx, &t.pending, spans, &mut done).await?
            }
        };
        tx.commit().await?;
        t.committed += done;
        for (i, e) in failed.into_iter().rev() {
            let (delivery, headers) = t.pending.remove(i);
            match e.disposition() {
                Disposition::Poison => t.poison.push((delivery, format!("effect failed: {e}"))),
                Disposition::Transient => t.held.push(Held { delivery, headers }),
            }
        }
        Ok(confirms)
    }

    /// The happy path: all claims in one statement, the prior outcomes of duplicates in one
    /// read, the effects of the first-seen messages in one [`Effect::apply_batch`].
    /// `Err`: the effect failed; the caller rolls back.
    async fn apply_all(
        &self,
        tx: &mut AnyConnection,
        pending: &[Pending],
        spans: bool,
        report: &mut BatchReport,
    ) -> Result<Result<Vec<Confirm>, Transient>> {
        let ids: Vec<Uuid> = pending.iter().map(|(_, h)| h.message_id).collect();
        let mut first = self.inbox.claim_many(tx, &ids).await?;
        // Ids claimed by an earlier batch: how they ended, in one read (none on the happy path).
        let earlier: Vec<Uuid> = ids.iter().filter(|id| !first.contains(id)).copied().collect();
        let mut prior =
            if earlier.is_empty() { HashMap::new() } else { self.inbox.prior_many(tx, &earlier).await? };
        // The first copy of a first-seen id applies the effect; later copies are duplicates.
        let fresh: Vec<usize> = (0..pending.len()).filter(|&i| first.remove(&ids[i])).collect();
        let msgs: Vec<Incoming<'_>> = fresh.iter().map(|&i| incoming(&pending[i].0, &pending[i].1)).collect();
        let applied = match self.effect.apply_batch(tx, &msgs).await {
            Ok(applied) if applied.len() == msgs.len() => applied,
            Ok(applied) => {
                let n = (applied.len(), msgs.len());
                tracing::warn!(
                    outcomes = n.0,
                    messages = n.1,
                    "apply_batch answered the wrong number of outcomes"
                );
                return Ok(Err(format!("apply_batch gave {} outcomes for {} messages", n.0, n.1).into()));
            }
            Err(e) => return Ok(Err(e)),
        };
        let mut applied = fresh.into_iter().zip(applied).peekable();
        let now = now_ms();
        let mut confirms = Vec::with_capacity(pending.len());
        for (i, (d, h)) in pending.iter().enumerate() {
            let id = h.message_id;
            let (outcome, detail) = match applied.next_if(|(j, _)| *j == i) {
                Some((_, Applied::Processed)) => {
                    report.processed += 1;
                    (Outcome::Processed, None)
                }
                Some((_, Applied::Rejected(reason))) => {
                    self.inbox.mark_rejected(tx, id, &reason).await?;
                    report.rejected += 1;
                    // A later copy in this batch re-confirms the rejection, as a later batch would.
                    prior.insert(id, Prior { outcome: Outcome::Rejected, detail: Some(reason.clone()) });
                    (Outcome::Rejected, Some(reason))
                }
                None => duplicate(prior.get(&id).cloned(), report),
            };
            message_span(d, h, spans)
                .in_scope(|| tracing::debug!(outcome = outcome.as_str(), "message handled"));
            confirms.push(Confirm { message_id: id, outcome, detail, processed_at: now });
        }
        Ok(Ok(confirms))
    }

    /// The redo after the batch's effect failed: every message in its own savepoint, through
    /// [`Effect::apply`]. Returns the confirms and the failed messages' indices and errors.
    async fn apply_each(
        &self,
        tx: &mut Transaction<'static, Any>,
        pending: &[Pending],
        spans: bool,
        report: &mut BatchReport,
    ) -> Result<(Vec<Confirm>, Vec<(usize, Transient)>)> {
        let mut confirms = Vec::with_capacity(pending.len());
        let mut failed = Vec::new();
        for (i, (d, h)) in pending.iter().enumerate() {
            let span = message_span(d, h, spans);
            let mut one = tx.begin().await?;
            match self.claim_and_apply(&mut one, d, h, &span, report).await? {
                Ok((outcome, detail)) => {
                    one.commit().await?;
                    let processed_at = now_ms();
                    confirms.push(Confirm { message_id: h.message_id, outcome, detail, processed_at });
                }
                Err(e) => {
                    one.rollback().await?;
                    failed.push((i, e));
                }
            }
        }
        Ok((confirms, failed))
    }

    /// One message inside `tx` (a savepoint, or a held delivery's own transaction): claimed, then
    /// its effect if first-seen, or its earlier outcome. `Err(Transient)`: the effect failed,
    /// nothing counted (logged here); the caller rolls back.
    pub(super) async fn claim_and_apply(
        &self,
        tx: &mut AnyConnection,
        d: &Delivery,
        h: &BusinessHeaders,
        span: &Span,
        report: &mut BatchReport,
    ) -> Result<Result<(Outcome, Option<String>), Transient>> {
        let done = if !self.inbox.claim(tx, h.message_id).await? {
            duplicate(self.inbox.prior(tx, h.message_id).await?, report)
        } else {
            match self.effect.apply(tx, &incoming(d, h)).instrument(span.clone()).await {
                Ok(Applied::Processed) => {
                    report.processed += 1;
                    (Outcome::Processed, None)
                }
                Ok(Applied::Rejected(reason)) => {
                    self.inbox.mark_rejected(tx, h.message_id, &reason).await?;
                    report.rejected += 1;
                    (Outcome::Rejected, Some(reason))
                }
                Err(e) => {
                    failed(d, h, span.clone(), &e);
                    return Ok(Err(e));
                }
            }
        };
        span.in_scope(|| tracing::debug!(outcome = done.0.as_str(), "message handled"));
        Ok(Ok(done))
    }
}

/// The confirm of a message claimed before: a rejection is confirmed again as one, anything
/// else as `duplicate`.
fn duplicate(prior: Option<Prior>, report: &mut BatchReport) -> (Outcome, Option<String>) {
    report.duplicates += 1;
    match prior {
        Some(p) if p.outcome == Outcome::Rejected => (Outcome::Rejected, p.detail),
        _ => (Outcome::Duplicate, None),
    }
}

fn incoming<'a>(d: &'a Delivery, h: &'a BusinessHeaders) -> Incoming<'a> {
    Incoming { headers: h, routing_key: d.routing_key.as_str(), body: &d.data, redelivered: d.redelivered }
}

/// Logs an effect failure in the message's trace (a span made now if there was none: rare).
fn failed(d: &Delivery, h: &BusinessHeaders, span: Span, e: &Transient) {
    let span = if span.is_none() { message_span(d, h, true) } else { span };
    let next = match e.disposition() {
        Disposition::Poison => "parking it",
        Disposition::Transient => "retrying it in place",
    };
    span.in_scope(|| tracing::warn!(message_id = %h.message_id, error = %e, "effect failed; {next}"));
}
