//! Confirm ingest: CONFIRM messages in batches, one store transaction per
//! batch, `ack(multiple)` only after the commit. Malformed bodies go to parking
//! with the reason, acked and counted.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
};
use recheck::{
    Publisher, Subscription, SubscriptionConfig, Topology,
    message::{Confirm, ConfirmBatch, Limits},
    parking::park,
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
}

impl ConfirmIngest {
    /// Consumes the confirms queue until `shutdown`, finishing the batch in hand.
    pub async fn run(
        &self,
        subscription: SubscriptionConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut confirms = Subscription::new(self.publisher.clone(), subscription).await?;
        while let Some(batch) = confirms.next_batch(&shutdown).await {
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
            match ConfirmBatch::decode(&d.data, content_type, self.limits) {
                Ok(batch) => {
                    confirms.extend(batch.confirms.into_iter().map(|c| (batch.consumer.clone(), c)));
                    good.push(d);
                }
                Err(e) => {
                    let queue = self.topology.confirms_queue();
                    if let Err(e) = park(&self.publisher, &self.topology, &queue, &d, &e.to_string()).await {
                        // Not parked, so not acked: it comes back and is parked then.
                        tracing::warn!(error = %e, "parking failed; redelivering");
                        let _ = d.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
                        continue;
                    }
                    d.acker.ack(BasicAckOptions::default()).await?;
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
                let last = good.iter().max_by_key(|d| d.delivery_tag).expect("not empty");
                last.acker.ack(BasicAckOptions { multiple: true }).await?;
                Ok(report)
            }
            Err(e) => {
                for d in &good {
                    let _ = d.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
                }
                Err(e.into())
            }
        }
    }
}
