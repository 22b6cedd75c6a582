//! Confirm ingest: CONFIRM messages in batches, one store transaction per
//! batch, `ack(multiple)` only after the commit. Malformed bodies go to parking
//! with the reason, acked and counted; a store outage is waited out in place.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use lapin::message::Delivery;
use recheck::{
    Publisher, Subscription, SubscriptionConfig, Topology,
    message::{Confirm, ConfirmBatch, Limits, Outcome},
    parking::{ParkReason, park_and_ack},
    retry::{self, Settled},
    signing::{ConfirmKeys, SignatureError},
    subscription, telemetry,
};
use tokio_util::sync::CancellationToken;

use crate::{
    failure::HandleError,
    store::{IngestReport, Store},
};

/// Counters since start, for stats and tests.
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub messages: AtomicU64,
    pub confirms: AtomicU64,
    pub parked: AtomicU64,
}

pub struct ConfirmIngest {
    pub store: Arc<Store>,
    pub publisher: Publisher,
    pub topology: Topology,
    pub limits: Limits,
    pub counters: Arc<IngestCounters>,
    /// When not empty, only CONFIRMs signed with their consumer's key are ingested.
    pub keys: ConfirmKeys,
}

impl ConfirmIngest {
    /// Consumes the confirms queue until `shutdown`, finishing the batch in hand.
    pub async fn run(
        &self,
        subscription: SubscriptionConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut confirms = Subscription::new(self.publisher.clone(), subscription).await?;
        while let Some(batch) = confirms.next_batch(&shutdown).await? {
            self.ingest(batch, &shutdown).await;
        }
        confirms.close().await;
        Ok(())
    }

    /// One batch of CONFIRM deliveries: park the malformed, store the rest in one transaction,
    /// then ack. A store failure is classified once ([`HandleError`]): a transient one (an
    /// outage) is waited out with the batch in hand, so no redelivery counts toward the delivery
    /// limit; a poison one is isolated by storing each delivery alone, and only the one that
    /// fails is parked. At shutdown the batch still waiting is handed back.
    #[tracing::instrument(skip_all, fields(n = deliveries.len()))]
    pub async fn ingest(&self, deliveries: Vec<Delivery>, shutdown: &CancellationToken) -> IngestReport {
        let queue = self.topology.confirms_queue();
        // One flat list for the batch's transaction; each delivery keeps its range of it, for
        // the one-by-one fallback.
        let mut all: Vec<(String, Confirm)> = Vec::new();
        let mut good: Vec<(Delivery, std::ops::Range<usize>)> = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            self.counters.messages.fetch_add(1, Ordering::Relaxed);
            match self.decode(&d) {
                Ok(batch) => {
                    let start = all.len();
                    all.extend(batch.confirms.into_iter().map(|c| (batch.consumer.clone(), c)));
                    good.push((d, start..all.len()));
                }
                Err(e) => {
                    if park_and_ack(&self.publisher, &self.topology, &queue, &d, &e).await {
                        self.counters.parked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if good.is_empty() {
            return IngestReport::default();
        }
        match retry::until_settled(&queue, shutdown, || self.store(&all)).await {
            Settled::Done(report) => {
                let last = good.iter().map(|(d, _)| d).max_by_key(|d| d.delivery_tag).expect("not empty");
                settle_acked(subscription::ack(last, true).await);
                report
            }
            Settled::Stopped(_) | Settled::Abandoned => {
                let good: Vec<&Delivery> = good.iter().map(|(d, _)| d).collect();
                subscription::nack_all(&good).await;
                IngestReport::default()
            }
            Settled::Poison(e) => {
                tracing::warn!(error = %e, "confirm batch refused by the store; storing its messages one by one");
                let mut total = IngestReport::default();
                for (d, range) in &good {
                    match retry::until_settled(&queue, shutdown, || self.store(&all[range.clone()])).await {
                        Settled::Done(report) => {
                            total += report;
                            settle_acked(subscription::ack(d, false).await);
                        }
                        Settled::Poison(e) => {
                            if park_and_ack(&self.publisher, &self.topology, &queue, d, &e).await {
                                self.counters.parked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Settled::Stopped(_) | Settled::Abandoned => {
                            let _ = subscription::nack(d).await;
                        }
                    }
                }
                total
            }
        }
    }

    /// A CONFIRM delivery's batch, decoded and, when keys are configured, its signature checked.
    fn decode(&self, d: &Delivery) -> Result<ConfirmBatch, Refused> {
        let content_type = d.properties.content_type().as_ref().map(|c| c.as_str());
        let batch = ConfirmBatch::decode(&d.data, content_type, self.limits)?;
        self.keys.verify(&batch.consumer, &d.data, &d.properties)?;
        Ok(batch)
    }

    /// One store transaction for `confirms`, with its counters and metrics.
    async fn store(&self, confirms: &[(String, Confirm)]) -> Result<IngestReport, HandleError> {
        let report = self.store.ingest_confirms(confirms).await?;
        self.counters.confirms.fetch_add(confirms.len() as u64, Ordering::Relaxed);
        record(confirms, &report);
        Ok(report)
    }
}

/// An ack that failed after the commit is no loss: the confirms come again and are duplicates.
fn settle_acked(acked: recheck::Result<()>) {
    if let Err(e) = acked {
        tracing::warn!(error = %e, "ack of stored confirms failed; they will be redelivered");
    }
}

/// The metrics of one stored batch: confirms by consumer and outcome, the batch size, late
/// confirms recovered, and publish-to-confirmed for each first confirm (not `duplicate`s).
fn record(confirms: &[(String, Confirm)], report: &IngestReport) {
    let received = std::time::SystemTime::now();
    metrics::histogram!(telemetry::INGEST_BATCH_SIZE).record(confirms.len() as f64);
    metrics::counter!(telemetry::RECOVERED).increment(report.recovered as u64);
    for (consumer, confirm) in confirms {
        let outcome = confirm.outcome.as_str();
        metrics::counter!(telemetry::CONFIRMS, "consumer" => consumer.clone(), "outcome" => outcome)
            .increment(1);
        if confirm.outcome == Outcome::Duplicate {
            continue;
        }
        // The producer chose a UUIDv7 when it prepared the message: its time is `published_at`.
        let Some((secs, nanos)) = confirm.message_id.get_timestamp().map(|t| t.to_unix()) else { continue };
        let published = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
        if let Ok(latency) = received.duration_since(published) {
            metrics::histogram!(telemetry::CONFIRM_LATENCY_SECONDS, "consumer" => consumer.clone())
                .record(latency.as_secs_f64());
        }
    }
}

/// Why a CONFIRM delivery is parked instead of ingested.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    Decode(#[from] recheck::message::DecodeError),
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

impl ParkReason for Refused {
    fn class(&self) -> &'static str {
        match self {
            Refused::Decode(e) => e.class(),
            Refused::Signature(e) => e.class(),
        }
    }
}
