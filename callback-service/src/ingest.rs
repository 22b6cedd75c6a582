//! Confirm ingest: CONFIRM messages in batches, one store transaction per
//! batch, `ack(multiple)` only after the commit. Malformed bodies go to parking
//! with the reason, acked and counted.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use lapin::message::Delivery;
use recheck::{
    Publisher, Subscription, SubscriptionConfig, Topology,
    message::{Confirm, ConfirmBatch, Limits, Outcome},
    parking::{ParkReason, park},
    signing::{ConfirmKeys, SignatureError},
    subscription, telemetry,
};
use tokio_util::sync::CancellationToken;

use crate::store::{IngestReport, Store};

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
            if let Err(e) = self.ingest(batch).await {
                tracing::warn!(error = %e, "confirm batch failed; redelivering");
            }
        }
        confirms.close().await;
        Ok(())
    }

    /// One batch of CONFIRM deliveries: park the malformed, store the rest in one
    /// transaction, then ack. On a store error the stored part is nacked.
    #[tracing::instrument(skip_all, fields(n = deliveries.len()))]
    pub async fn ingest(&self, deliveries: Vec<Delivery>) -> anyhow::Result<IngestReport> {
        let mut good: Vec<Delivery> = Vec::with_capacity(deliveries.len());
        let mut confirms: Vec<(String, Confirm)> = Vec::new();
        for d in deliveries {
            self.counters.messages.fetch_add(1, Ordering::Relaxed);
            let content_type = d.properties.content_type().as_ref().map(|c| c.as_str());
            let checked = ConfirmBatch::decode(&d.data, content_type, self.limits)
                .map_err(Refused::Decode)
                .and_then(|batch| match self.keys.verify(&batch.consumer, &d.data, &d.properties) {
                    Ok(()) => Ok(batch),
                    Err(e) => Err(Refused::Signature(e)),
                });
            match checked {
                Ok(batch) => {
                    confirms.extend(batch.confirms.into_iter().map(|c| (batch.consumer.clone(), c)));
                    good.push(d);
                }
                Err(e) => {
                    let queue = self.topology.confirms_queue();
                    if let Err(e) = park(&self.publisher, &self.topology, &queue, &d, &e).await {
                        // Not parked, so not acked: it comes back and is parked then.
                        tracing::warn!(error = %e, "parking failed; redelivering");
                        let _ = subscription::nack(&d).await;
                        continue;
                    }
                    subscription::ack(&d, false).await?;
                    self.counters.parked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if good.is_empty() {
            return Ok(IngestReport::default());
        }
        match self.store.ingest_confirms(&confirms).await {
            Ok(report) => {
                self.counters.confirms.fetch_add(confirms.len() as u64, Ordering::Relaxed);
                record(&confirms, &report);
                let last = good.iter().max_by_key(|d| d.delivery_tag).expect("not empty");
                subscription::ack(last, true).await?;
                Ok(report)
            }
            Err(e) => {
                for d in &good {
                    let _ = subscription::nack(d).await;
                }
                Err(e.into())
            }
        }
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
