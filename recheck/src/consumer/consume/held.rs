//! A delivery whose effect failed transiently: kept unacked and tried again in place, in a
//! transaction of its own, with [`crate::retry`]'s growing delay, until it commits (ack), turns
//! out poison (parked), or shutdown comes (nack: handed back). Requeued at once instead, it
//! would burn the queue's delivery limit before RabbitMQ 4.3 and loop hot from 4.3.

use std::time::Duration;

use lapin::message::Delivery;

use super::{BatchReport, ConsumerLoop, Effect, Transient, message_span, per_message_spans};
use crate::{
    broker::{parking::park_and_ack, subscription},
    error::Error,
    retry::{self, Classify, Disposition, Settled},
    telemetry,
    wire::message::{BusinessHeaders, Confirm, now_ms},
};

/// A delivery held for a retry in place.
pub(crate) struct Held {
    pub(super) delivery: Delivery,
    pub(super) headers: BusinessHeaders,
}

/// Why one try of a held delivery failed: the SDK's own work, or the effect.
#[derive(Debug)]
enum Failure {
    Sdk(Error),
    Effect(Transient),
    /// Shutdown came before the first try.
    Stopped,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Sdk(e) => e.fmt(f),
            Failure::Effect(e) => write!(f, "effect failed: {e}"),
            Failure::Stopped => f.write_str("stopped"),
        }
    }
}

impl Classify for Failure {
    fn disposition(&self) -> Disposition {
        match self {
            Failure::Sdk(e) => e.disposition(),
            Failure::Effect(e) => e.disposition(),
            Failure::Stopped => Disposition::Transient,
        }
    }
}

impl<E: Into<Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Sdk(e.into())
    }
}

impl<E: Effect> ConsumerLoop<E> {
    /// Tries `held` until it settles; what its successful try did.
    pub(super) async fn settle_held(
        &self,
        held: Held,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> BatchReport {
        let Held { delivery: d, headers: h } = held;
        // It has just failed (in its batch and alone): wait before the first try, as between two.
        metrics::counter!(telemetry::DELIVERY_RETRIES, "queue" => self.config.queue.clone()).increment(1);
        let first = retry::backoff().next().unwrap_or(Duration::from_millis(100));
        let settled = tokio::select! {
            _ = shutdown.cancelled() => Settled::Stopped(Failure::Stopped),
            _ = tokio::time::sleep(first) => {
                retry::until_settled(&self.config.queue, shutdown, || self.try_held(&d, &h)).await
            }
        };
        let mut report = BatchReport::default();
        match settled {
            Settled::Done(done) => {
                report = done;
                report.record(&self.config.consumer);
                // A failed ack is no loss: the copy comes back and is confirmed as a duplicate.
                if let Err(e) = subscription::ack(&d, false).await {
                    tracing::warn!(message_id = %h.message_id, error = %e, "ack after a retry failed");
                }
            }
            Settled::Poison(e) => {
                if park_and_ack(&self.publisher, &self.topology, &self.config.queue, &d, &e.to_string()).await
                {
                    report.parked += 1;
                }
            }
            Settled::Stopped(_) | Settled::Abandoned => {
                let _ = subscription::nack(&d).await;
            }
        }
        self.held.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        report
    }

    /// One try: claim and effect in a transaction of their own, commit, then the CONFIRM.
    async fn try_held(&self, d: &Delivery, h: &BusinessHeaders) -> Result<BatchReport, Failure> {
        let span = message_span(d, h, per_message_spans());
        let mut report = BatchReport::default();
        let mut tx = self.pool.begin().await?;
        let (outcome, detail) = match self.claim_and_apply(&mut tx, d, h, &span, &mut report).await? {
            Ok(done) => done,
            Err(e) => {
                tx.rollback().await?;
                return Err(Failure::Effect(e));
            }
        };
        tx.commit().await?;
        let confirm = Confirm { message_id: h.message_id, outcome, detail, processed_at: now_ms() };
        if !self.drop_confirm.as_ref().is_some_and(|drop| drop(&confirm)) {
            self.confirmer.confirm_all(vec![confirm]).await?;
        }
        Ok(report)
    }
}
